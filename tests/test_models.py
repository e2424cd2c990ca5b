"""MoE transformer: KV-cache consistency, padding, dispatch paths, checkpoint round trips."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from helpers import forward, make_mesh
from moe_relayfree_models import MoETransformer, init_cache
from moe_relayfree_models import checkpoint
from moe_relayfree_models.config import ModelConfig
from moe_relayfree_models.hf_config import from_hf_config, to_hf_config
from moe_relayfree_models.tensor_index import TensorIndex
from moe_relayfree.routing import RouterConfig


def tiny(arch="qwen3_moe", **kw):
    base = dict(arch=arch, vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                head_dim=8, d_ff=48, num_experts=8, k=2, d_ff_expert=24, moe_layers=(False, True))
    extra = {
        "qwen3_moe": dict(qk_norm="head"),
        "qwen2_moe": dict(qkv_bias=True, shared_d_ff=40, shared_gate=True,
                          router=RouterConfig(renormalize=False)),
        "mixtral": dict(moe_layers=(True, True), d_ff=24),  # all-MoE: HF has one FFN size
        "deepseek_v3": dict(head_dim=12, n_kv_heads=4, shared_d_ff=24, q_lora_rank=16,
                            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                            router=RouterConfig(method="sigmoid_grouped", n_group=4, topk_group=2,
                                                routed_scaling_factor=2.5, score_bias=True)),
        "olmoe": dict(qk_norm="full", moe_layers=(True, True), d_ff=24,
                      router=RouterConfig(renormalize=False)),
    }[arch]
    return ModelConfig(**{**base, **extra, **kw})


def build(cfg, mesh, **kw):
    return MoETransformer(cfg, mesh=mesh, rngs=nnx.Rngs(3), **kw)


@nnx.jit
def full_logits(model, tokens, pad):
    """One compiled forward from position 0 (op by op, the 8-device layers were slower)."""
    cache = init_cache(model.cfg, tokens.shape[0], tokens.shape[1], jnp.float32)
    return model(tokens, pad, cache, 0)[0]


TOKENS = jnp.array([[5, 9, 12, 3, 7, 1], [0, 0, 8, 2, 60, 33]], jnp.int32)
PAD = jnp.array([0, 2], jnp.int32)


# The two cache layouts (GQA, DeepSeek MLA); every family's cached greedy decoding is also
# checked against transformers in test_hf_parity.py.
@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_prefill_then_decode_matches_full_forward(arch):
    model = build(tiny(arch), make_mesh(8))
    want = full_logits(model, TOKENS, PAD)
    cache = init_cache(model.cfg, 2, 6, jnp.float32)
    logits, cache = forward(model, TOKENS[:, :4], PAD, cache, jnp.int32(0))
    steps = [logits]
    for i in (4, 5):
        logits, cache = forward(model, TOKENS[:, i : i + 1], PAD, cache, jnp.int32(i))
        steps.append(logits)
    got = jnp.concatenate(steps, axis=1)
    real = np.arange(6)[None, :] >= np.asarray(PAD)[:, None]  # outputs at padding are unused
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-4, rtol=2e-4)


def test_left_padding_does_not_change_a_row():
    model = build(tiny(), make_mesh(4))
    both = full_logits(model, TOKENS, PAD)
    alone = full_logits(model, TOKENS[1:, 2:], jnp.array([0]))
    np.testing.assert_allclose(both[1, 2:], alone[0], atol=2e-4, rtol=2e-4)


def test_dispatch_paths_agree():
    mesh = make_mesh(8)
    outs = {}
    for impl in ("relayfree", "ragged_baseline", "capacity_baseline"):
        outs[impl] = full_logits(build(tiny(), mesh, implementation=impl), TOKENS, PAD)
    for sched in ("prefill", "decode"):
        outs[sched] = full_logits(build(tiny(), mesh, schedule=sched), TOKENS, PAD)
    real = np.arange(6)[None, :] >= np.asarray(PAD)[:, None]
    for name, value in outs.items():
        np.testing.assert_allclose(np.asarray(value)[real], np.asarray(outs["relayfree"])[real],
                                   atol=2e-4, rtol=2e-4, err_msg=name)


def save_folder(path, cfg, tensors):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(to_hf_config(cfg)))
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path / "model.safetensors"))
    return str(path)


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3"])
@pytest.mark.parametrize("fused", [False, True])
def test_checkpoint_round_trip(tmp_path, arch, fused):
    mesh = make_mesh(2)
    cfg = tiny(arch)
    model = build(cfg, mesh)
    folder = save_folder(tmp_path / "ckpt", cfg, checkpoint.export_tensors(model, fused_experts=fused))
    assert from_hf_config(json.loads((tmp_path / "ckpt" / "config.json").read_text())) == cfg
    loaded = checkpoint.load_model(folder, mesh=mesh)
    np.testing.assert_array_equal(full_logits(loaded, TOKENS, PAD), full_logits(model, TOKENS, PAD))


def test_bf16_checkpoint_loads(tmp_path):
    mesh = make_mesh(2)
    cfg = tiny()
    model = build(cfg, mesh)
    import ml_dtypes

    tensors = checkpoint.export_tensors(model, dtype=ml_dtypes.bfloat16)
    folder = save_folder(tmp_path / "bf16", cfg, tensors)
    loaded = checkpoint.load_model(folder, mesh=mesh)  # bf16 stays bf16
    assert loaded.layers[1].mlp.w_up[...].dtype == jnp.bfloat16
    want = np.asarray(tensors["model.layers.1.mlp.experts.3.up_proj.weight"], np.float32).T
    np.testing.assert_array_equal(np.asarray(loaded.layers[1].mlp.w_up[...], np.float32)[3], want)
    # a replicated tensor is one host buffer shared by the process's CPU devices, not a copy each
    shards = loaded.embed[...].addressable_shards
    assert len(shards) == 2 and len({s.data.unsafe_buffer_pointer() for s in shards}) == 1
    as_f32 = checkpoint.load_model(folder, mesh=mesh, dtype=jnp.float32)  # unless asked
    assert as_f32.embed[...].dtype == jnp.float32
    want = full_logits(as_f32, TOKENS, PAD)
    # asked for f32 activations, bf16 parameters give the numbers of f32 parameters ...
    cache = init_cache(cfg, 2, 6, jnp.float32)
    as_asked = nnx.jit(lambda m: m(TOKENS, PAD, cache, 0, dtype=jnp.float32)[0])(loaded)
    np.testing.assert_array_equal(as_asked, want)
    # ... and by default the activations follow the parameters (bf16: close, not equal)
    assert loaded.compute_dtype == jnp.bfloat16 and as_f32.compute_dtype == jnp.float32
    got = full_logits(loaded, TOKENS, PAD)
    assert got.dtype == jnp.float32  # logits stay f32
    real = np.arange(6)[None, :] >= np.asarray(PAD)[:, None]
    diff = np.abs(np.asarray(got) - np.asarray(want))[real]
    assert 0 < diff.max() < 0.1, diff.max()


def test_checkpoint_errors(tmp_path):
    mesh = make_mesh(2)
    cfg = tiny()
    tensors = checkpoint.export_tensors(build(cfg, mesh))
    missing = dict(tensors)
    del missing["model.layers.1.mlp.experts.5.down_proj.weight"]
    with pytest.raises(checkpoint.CheckpointError, match="missing tensor 'model.layers.1.mlp.experts.5"):
        checkpoint.load_model(save_folder(tmp_path / "a", cfg, missing), mesh=mesh)
    wrong = dict(tensors, **{"model.norm.weight": np.ones(7, np.float32)})
    with pytest.raises(checkpoint.CheckpointError, match=r"'model.norm.weight' has shape \(7,\)"):
        checkpoint.load_model(save_folder(tmp_path / "b", cfg, wrong), mesh=mesh)
    extra = dict(tensors, **{"model.layers.0.mlp.bogus": np.ones(3, np.float32)})
    with pytest.raises(checkpoint.CheckpointError, match="1 checkpoint tensors were not used: model.layers.0.mlp.bogus"):
        checkpoint.load_model(save_folder(tmp_path / "c", cfg, extra), mesh=mesh)
    with pytest.raises(checkpoint.CheckpointError, match="no config.json"):
        checkpoint.load_model(str(tmp_path), mesh=mesh)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text(json.dumps(to_hf_config(cfg)))
    with pytest.raises(checkpoint.CheckpointError, match="no \\*.safetensors"):
        checkpoint.load_model(str(tmp_path / "d"), mesh=mesh)
    (tmp_path / "d" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(checkpoint.CheckpointError, match="model.safetensors is not a readable safetensors file"):
        checkpoint.load_model(str(tmp_path / "d"), mesh=mesh)
    # a file cut short: its header promises more bytes than are there
    good = save_folder(tmp_path / "e", cfg, tensors)
    blob = (tmp_path / "e" / "model.safetensors").read_bytes()
    (tmp_path / "e" / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="model.safetensors is not a readable safetensors file"):
        checkpoint.load_model(good, mesh=mesh)
    with pytest.raises(ValueError, match="unsupported model_type 'llama'"):
        from_hf_config({"model_type": "llama", "num_hidden_layers": 1, "num_attention_heads": 1,
                        "hidden_size": 8, "vocab_size": 4})


def test_sharded_checkpoint_with_index(tmp_path):
    """Several files found through model.safetensors.index.json load like one file; an index
    that lists a missing file or misplaces a tensor is an error naming it."""
    mesh = make_mesh(4)
    cfg = tiny()
    model = build(cfg, mesh)
    tensors = checkpoint.export_tensors(model)
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(to_hf_config(cfg)))
    names = sorted(tensors)
    parts = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in parts.items():
        save_file({k: np.ascontiguousarray(tensors[k]) for k in part}, str(folder / file))
    weight_map = {k: f for f, part in parts.items() for k in part}
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    stats = {}
    loaded = checkpoint.load_model(str(folder), mesh=mesh, stats=stats)
    np.testing.assert_array_equal(full_logits(loaded, TOKENS, PAD), full_logits(model, TOKENS, PAD))
    assert stats["bytes_read"] == stats["tensor_bytes"] == sum(v.nbytes for v in tensors.values())
    if os.path.exists("/proc/self/maps"):
        # a read maps its file only while it copies: pages of a file left mapped count in the
        # process's memory until the end of a load (2x the model at peak)
        reader = TensorIndex(str(folder))
        assert reader.read(names[0]).shape == reader.shape[names[0]]
        with open("/proc/self/maps") as fh:
            mapped = [line for line in fh if str(folder) in line]
        assert not mapped, mapped
    moved = dict(weight_map, **{names[0]: "model-00002-of-00002.safetensors"})
    index.write_text(json.dumps({"weight_map": moved}))
    with pytest.raises(checkpoint.CheckpointError, match=f"places 1 tensors in files that do not hold them: {names[0]}"):
        checkpoint.load_model(str(folder), mesh=mesh)
    index.write_text(json.dumps({"weight_map": dict(weight_map, extra="model-00003-of-00003.safetensors")}))
    with pytest.raises(checkpoint.CheckpointError, match="lists model-00003-of-00003.safetensors, which is not in"):
        checkpoint.load_model(str(folder), mesh=mesh)
