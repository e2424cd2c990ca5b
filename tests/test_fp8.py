"""Block-quantized FP8 checkpoints: loading equals the twin checkpoint dequantized by the rule
``W = fp8 * scale_inv`` per block (edge blocks partial), and bad ones are refused clearly."""

import json

import jax
import ml_dtypes
import numpy as np
import pytest

from helpers import make_mesh
from moe_relayfree_models import checkpoint, quant
from test_models import build, save_folder, tiny

BLOCK = [8, 16]  # the tiny models' dims (20, 24, 36, ...) are not multiples of it


def fp8_and_twin(tmp_path, cfg, fused=False):
    """(FP8 checkpoint folder, its twin with the dequantized values in f32, tensors)."""
    model = build(cfg, make_mesh(1))
    tensors = checkpoint.export_tensors(model, fused_experts=fused)
    q = quant.BlockFp8(tuple(BLOCK))
    stored, twin = {}, {}
    for name, w in tensors.items():
        if quant.quantizable(name):
            values, scale = quant.quantize(w, q)
            stored[name], stored[name + "_scale_inv"] = values, scale
            full = np.repeat(np.repeat(scale, BLOCK[0], -2), BLOCK[1], -1)
            twin[name] = values.astype(np.float32) * full[..., :w.shape[-2], :w.shape[-1]]
        else:
            stored[name] = twin[name] = w
    folder = save_folder(tmp_path / "fp8", cfg, stored)
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                     "activation_scheme": "dynamic", "weight_block_size": BLOCK}
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    return folder, save_folder(tmp_path / "twin", cfg, twin), stored


def params(model) -> dict:
    from flax import nnx

    return {str(p): np.asarray(v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("arch,fused,num_ranks", [
    ("deepseek_v3", False, 1), ("deepseek_v3", False, 8), ("qwen3_moe", False, 8),
    ("qwen3_moe", True, 2),
])
def test_loading_equals_the_dequantized_twin(tmp_path, arch, fused, num_ranks):
    cfg = tiny(arch, d_model=40, d_ff_expert=20, d_ff=36, **({"shared_d_ff": 20} if arch == "deepseek_v3" else {}))
    folder, twin, stored = fp8_and_twin(tmp_path, cfg, fused)
    assert sum(v.dtype == ml_dtypes.float8_e4m3fn for v in stored.values()) >= 6
    mesh = make_mesh(num_ranks)
    stats = {}
    got = params(checkpoint.load_model(folder, mesh=mesh, dtype=np.float32, stats=stats))
    want = params(checkpoint.load_model(twin, mesh=mesh, dtype=np.float32))
    assert got.keys() == want.keys()
    for name in got:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    # the FP8 bytes and their scales are what was read (a scale block under two devices'
    # slices is read by both), not a dequantized copy
    assert stats["bytes_read"] <= 1.05 * sum(v.nbytes for v in stored.values())


def test_bf16_by_default_and_slices_of_blocks(tmp_path):
    """The default dtype is the unquantized embedding's (bf16 here): weights are dequantized
    in f32 and rounded once; a slice starting inside a block reads that block's scale."""
    cfg = tiny("deepseek_v3", d_model=40, d_ff_expert=20, d_ff=36, shared_d_ff=20)
    folder, twin, stored = fp8_and_twin(tmp_path, cfg)
    import jax.numpy as jnp

    as_bf16 = {n: v.astype(ml_dtypes.bfloat16) if v.dtype == np.float32 else v
               for n, v in stored.items() if not n.endswith("_scale_inv")}
    (tmp_path / "fp8" / "model.safetensors").unlink()
    from safetensors.numpy import save_file

    keep = {n: v for n, v in stored.items() if n.endswith("_scale_inv")}
    save_file({**as_bf16, **keep}, str(tmp_path / "fp8" / "model.safetensors"))
    model = checkpoint.load_model(folder, mesh=make_mesh(2))
    assert model.layers[1].mlp.w_up[...].dtype == jnp.bfloat16
    index = checkpoint.TensorIndex(folder, quant.BlockFp8(tuple(BLOCK)))
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    whole = index.read(name)
    np.testing.assert_array_equal(index.read(name, (slice(5, 19), slice(3, 37))), whole[5:19, 3:37])


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    """One FP8 checkpoint (its config and tensors) that each refusal case changes a copy of."""
    path = tmp_path_factory.mktemp("fp8_refused")
    folder, _, stored = fp8_and_twin(path, tiny("deepseek_v3"))
    return json.loads((path / "fp8" / "config.json").read_text()), stored


@pytest.mark.parametrize("change,match", [
    ("drop_scale", "has no 'model.layers.1.mlp.experts.0.up_proj.weight_scale_inv'"),
    ("bad_scale", "_scale_inv' has shape"),
    ("no_config", "float8 tensors .* but config.json has no quantization_config"),
    ("gptq", "quant_method='gptq' is not supported"),
    ("static", "activation_scheme='static' is not supported"),
])
def test_bad_fp8_checkpoints_are_refused(tmp_path, fp8_checkpoint, change, match):
    from safetensors.numpy import save_file

    config, stored = json.loads(json.dumps(fp8_checkpoint[0])), dict(fp8_checkpoint[1])
    scale = "model.layers.1.mlp.experts.0.up_proj.weight_scale_inv"
    if change == "drop_scale":
        del stored[scale]
    elif change == "bad_scale":
        stored[scale] = stored[scale][:-1]
    elif change == "no_config":
        del config["quantization_config"]
    elif change == "gptq":
        config["quantization_config"]["quant_method"] = "gptq"
    else:
        config["quantization_config"]["activation_scheme"] = "static"
    folder = tmp_path / "fp8"
    folder.mkdir()
    save_file(stored, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        checkpoint.load_model(str(folder), mesh=make_mesh(1))


@pytest.mark.parametrize("arch,fused,num_ranks,dtype", [
    ("deepseek_v3", False, 8, "float32"), ("qwen3_moe", True, 2, "bfloat16"),
])
def test_fp8_experts_stay_fp8_on_the_devices(tmp_path, arch, fused, num_ranks, dtype):
    """``fp8_experts=True``: the routed experts keep their stored FP8 values and block scales
    (transposed like the weights), the logits equal those of the dequantized twin, and
    exporting gives back the stored tensors."""
    import jax.numpy as jnp

    from test_models import full_logits

    # f = 24 is a multiple of the 8-row blocks (a fused stack's gate and up halves must not
    # share blocks); d = 40 is not a multiple of the 16-column ones
    cfg = tiny(arch, d_model=40, d_ff_expert=24, d_ff=36,
               **({"shared_d_ff": 24} if arch == "deepseek_v3" else {}))
    folder, twin, stored = fp8_and_twin(tmp_path, cfg, fused)
    mesh = make_mesh(num_ranks)
    stats = {}
    model = checkpoint.load_model(folder, mesh=mesh, dtype=dtype, fp8_experts=True, stats=stats)
    assert stats["bytes_read"] <= 1.05 * sum(v.nbytes for v in stored.values())
    moe = model.layers[1].mlp
    assert moe.expert_block == (BLOCK[1], BLOCK[0])  # blocks of the transposed matrices
    assert moe.w_gate[...].dtype == jnp.float8_e4m3fn and moe.w_down_scale[...].dtype == jnp.float32
    assert moe.w_gate[...].sharding.spec == moe.w_gate_scale[...].sharding.spec
    assert model.layers[1].attn.wo[...].dtype == jnp.dtype(dtype)  # the rest is dequantized
    exported = checkpoint.export_tensors(model, fused_experts=fused)
    experts = [n for n in stored if ".experts." in n]
    assert len(experts) >= 4
    for name in experts:
        np.testing.assert_array_equal(np.asarray(exported[name]).view(np.uint8),
                                      stored[name].view(np.uint8), err_msg=name)
    twin_model = checkpoint.load_model(twin, mesh=mesh, dtype=dtype)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 6)), jnp.int32)
    pad = jnp.zeros((2,), jnp.int32)
    got, want = full_logits(model, tokens, pad), full_logits(twin_model, tokens, pad)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    jax.clear_caches()


def test_fp8_experts_need_an_fp8_checkpoint(tmp_path):
    cfg = tiny("qwen3_moe")
    folder = save_folder(tmp_path / "bf16", cfg, checkpoint.export_tensors(build(cfg, make_mesh(1))))
    with pytest.raises(ValueError, match="fp8_experts needs an FP8 checkpoint"):
        checkpoint.load_model(folder, mesh=make_mesh(1), fp8_experts=True)
