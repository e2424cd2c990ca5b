"""Hugging Face config.json mapping: transformers' defaults, every key accounted for, refusals."""

import json
import os

import numpy as np
import pytest

from moe_relayfree_models import checkpoint
from moe_relayfree_models.hf_config import FOREIGN, HARMLESS, _FAMILIES, from_hf_config, to_hf_config
from moe_relayfree_models.hf_defaults import DEFAULTS, TRANSFORMERS_VERSION

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
# 128 heads: every family's default num_key_value_heads divides it, as transformers needs.
SIZES = dict(vocab_size=64, hidden_size=256, num_hidden_layers=4, num_attention_heads=128,
             intermediate_size=48)


def minimal(model_type, **kw):
    return dict(model_type=model_type, **SIZES, **kw)


def test_defaults_table_is_the_fixtures_transformers_version():
    assert TRANSFORMERS_VERSION == json.load(open(os.path.join(FIXTURES, "manifest.json")))["transformers"]
    assert set(DEFAULTS) == set(_FAMILIES)


# Expected values from the transformers 5.23 config classes (their source), written out here so
# that a wrong generated table or a wrong derivation in the loader fails.
@pytest.mark.parametrize("model_type,expected", [
    ("qwen3_moe", dict(num_experts=128, k=8, d_ff_expert=768, renormalize=False, n_kv_heads=4,
                       head_dim=2, rope_theta=10000.0, rms_eps=1e-6, sliding_window=None,
                       moe_layers=(True,) * 4, qkv_bias=False, max_position=32768)),
    ("qwen2_moe", dict(num_experts=60, k=4, d_ff_expert=1408, renormalize=False, shared_d_ff=5632,
                       qkv_bias=True, n_kv_heads=16, sliding_window=None, moe_layers=(True,) * 4)),
    ("mixtral", dict(num_experts=8, k=2, d_ff_expert=48, renormalize=True, rope_theta=1e6,
                     rms_eps=1e-5, n_kv_heads=8, sliding_window=None, max_position=131072)),
    ("olmoe", dict(num_experts=64, k=8, renormalize=False, n_kv_heads=128, clip_qkv=None,
                   rms_eps=1e-5, qkv_bias=False)),
    ("deepseek_v3", dict(num_experts=256, k=8, n_group=8, topk_group=4, routed_scaling_factor=2.5,
                         renormalize=True, moe_layers=(False, False, False, True),
                         shared_d_ff=2048, kv_lora_rank=512, q_lora_rank=1536,
                         qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, head_dim=192)),
])
def test_missing_keys_take_transformers_defaults(model_type, expected):
    cfg = from_hf_config(minimal(model_type))
    router = cfg.router
    got = {k: getattr(router if k in ("renormalize", "n_group", "topk_group", "routed_scaling_factor")
                      else cfg, k) for k in expected}
    assert got == expected


def test_every_transformers_key_is_read_or_harmless():
    """The walker: a key of a transformers config class that the loader neither reads nor lists
    as harmless would be silently ignored; from_hf_config raises on it, this finds it first."""
    for model_type, keys in DEFAULTS.items():
        from_hf_config(minimal(model_type))  # raises "internal: config keys ... neither read nor harmless"
        assert not (set(keys) & set(FOREIGN)), model_type
    # and the raise works: a key nobody decided about
    import moe_relayfree_models.hf_config as hf

    saved = dict(DEFAULTS["mixtral"])
    DEFAULTS["mixtral"]["new_math_knob"] = 3
    try:
        with pytest.raises(ValueError, match=r"new_math_knob.*neither read nor harmless"):
            from_hf_config(minimal("mixtral"))
    finally:
        DEFAULTS["mixtral"].clear()
        DEFAULTS["mixtral"].update(saved)
    assert "attention_dropout" in hf.HARMLESS and "sliding_window" not in HARMLESS


@pytest.mark.parametrize("model_type,key,value,match", [
    ("qwen3_moe", "hidden_act", "gelu", "hidden_act='gelu' is not supported"),
    ("deepseek_v3", "attention_bias", True, "attention_bias=True is not supported"),
    ("deepseek_v3", "moe_layer_freq", 2, "moe_layer_freq"),
    ("deepseek_v3", "scoring_func", "softmax", "scoring_func"),
    ("mixtral", "quantization_config", {"quant_method": "gptq"}, "quant_method=.gptq. is not supported"),
    ("mixtral", "quantization_config", {"quant_method": "fp8"}, "weight_block_size must be"),
    ("qwen3_moe", "rope_parameters", {"rope_type": "dynamic", "factor": 4.0}, "rope_type 'dynamic'"),
    ("qwen3_moe", "rope_parameters", {"rope_type": "yarn", "factor": 4.0, "short_factor": [1]},
     r"rope parameters \['short_factor'\]"),
    ("mixtral", "rope_parameters", {"rope_type": "linear"}, "linear RoPE needs a factor"),
    ("qwen2_moe", "layer_types", ["sliding_attention"] * 3, "layer_types must list"),
])
def test_math_changing_values_it_cannot_run_are_refused(model_type, key, value, match):
    with pytest.raises(ValueError, match=match):
        from_hf_config(minimal(model_type, **{key: value}))


def test_unknown_keys_warn_and_aliases_map():
    with pytest.warns(UserWarning, match="some_remote_code_knob"):
        from_hf_config(minimal("olmoe", some_remote_code_knob=1))
    # transformers 4 names / attribute-map aliases
    cfg = from_hf_config(minimal("qwen3_moe", num_experts=16, rope_theta=5e5, torch_dtype="bfloat16"))
    assert cfg.num_experts == 16 and cfg.rope_theta == 5e5
    assert from_hf_config(minimal("deepseek_v3", num_local_experts=32)).num_experts == 32


def test_sliding_window_and_clip_resolve_like_transformers():
    assert from_hf_config(minimal("qwen3_moe", sliding_window=64)).sliding_window is None
    q3 = from_hf_config(minimal("qwen3_moe", use_sliding_window=True))
    assert q3.sliding_window == 4096 and q3.attention_window(3) == 4096
    q2 = from_hf_config(minimal("qwen2_moe", use_sliding_window=True, sliding_window=8, max_window_layers=3))
    assert [q2.attention_window(i) for i in range(4)] == [8, None, 8, None]
    assert from_hf_config(minimal("olmoe", clip_qkv=2)).clip_qkv == 2.0
    for cfg in (q3, q2, from_hf_config(minimal("olmoe", clip_qkv=2.0, attention_bias=True))):
        assert from_hf_config(to_hf_config(cfg)) == cfg


def test_the_official_deepseek_v3_config_loads_with_its_yarn_rope():
    """The released config.json (YaRN factor 40 over 4096 positions, mscale 1/1), with no
    warning: its RoPE frequencies, attention factor and softmax scale are transformers' own
    (``rope.json``, written by scripts/make_hf_fixtures.py --official)."""
    import warnings

    from moe_relayfree_models.layers import rope_frequencies
    from moe_relayfree_models.mla import softmax_scale

    folder = os.path.join(os.path.dirname(__file__), "fixtures", "hf", "deepseek_v3-official")
    with open(os.path.join(folder, "config.json")) as fh:
        official = json.load(fh)
    with open(os.path.join(folder, "rope.json")) as fh:
        ref = json.load(fh)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = from_hf_config(official)
    rs = cfg.rope_scaling
    assert (rs.kind, rs.factor, rs.original_max_position) == ("yarn", 40.0, 4096)
    inv_freq, factor = rope_frequencies(cfg.qk_rope_head_dim, cfg.rope_theta, rs, cfg.max_position)
    np.testing.assert_allclose(inv_freq, ref["inv_freq"], rtol=1e-6)
    assert factor == pytest.approx(ref["attention_factor"])
    assert softmax_scale(cfg) == pytest.approx(ref["softmax_scale"], rel=1e-12)
    assert softmax_scale(cfg) != pytest.approx((128 + 64) ** -0.5)  # the correction counts
    # round trip through transformers 5's rope_parameters
    assert from_hf_config(to_hf_config(cfg)).rope_scaling == rs


def test_missing_model_type_and_unsupported_family():
    with pytest.raises(ValueError, match="missing 'model_type'"):
        from_hf_config(SIZES)
    with pytest.raises(ValueError, match="unsupported model_type 'llama'"):
        from_hf_config(minimal("llama"))


def test_first_k_dense_default_asks_for_dense_mlp_tensors(tmp_path):
    """DeepSeek-V3 without first_k_dense_replace: layers 0-2 are dense as in transformers, so a
    checkpoint with MoE tensors there is reported as missing their dense MLP, by name."""
    folder = os.path.join(FIXTURES, "deepseek_v3-default")
    cfg = json.load(open(os.path.join(folder, "config.json")))
    assert cfg.pop("first_k_dense_replace") == 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    os.symlink(os.path.join(folder, "model.safetensors"), tmp_path / "model.safetensors")
    from helpers import make_mesh

    with pytest.raises(checkpoint.CheckpointError, match=r"missing tensor 'model.layers.1.mlp.gate_proj.weight'"):
        checkpoint.load_model(str(tmp_path), mesh=make_mesh(1))


def test_deepseek_mtp_layers_are_skipped_like_transformers(tmp_path):
    """Tensors of the layers past the last decoder layer load only when num_nextn_predict_layers
    declares them (transformers ignores them on load); anything else stays an unused-tensor error."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from helpers import make_mesh

    folder = os.path.join(FIXTURES, "deepseek_v3-default")
    cfg = json.load(open(os.path.join(folder, "config.json")))
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    mtp = f"model.layers.{cfg['num_hidden_layers']}.eh_proj.weight"
    save_file(dict(tensors, **{mtp: np.zeros((4, 4), np.float32)}), str(tmp_path / "model.safetensors"))
    for declared, ok in ((1, True), (0, False)):
        (tmp_path / "config.json").write_text(json.dumps(dict(cfg, num_nextn_predict_layers=declared)))
        if ok:
            checkpoint.load_model(str(tmp_path), mesh=make_mesh(1))
        else:
            with pytest.raises(checkpoint.CheckpointError, match=f"not used: {mtp}"):
                checkpoint.load_model(str(tmp_path), mesh=make_mesh(1))
