"""Parity with Hugging Face transformers: fixtures made by scripts/make_hf_fixtures.py (torch is
not needed here). Logits of one forward and greedy tokens, on 1 and 8 devices, both schedules."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import forward, make_mesh
from moe_relayfree_models import checkpoint, init_cache

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
MANIFEST = json.load(open(os.path.join(FIXTURES, "manifest.json")))
NAMES = MANIFEST["models"]
# sliding windows (Mixtral, Qwen3, Qwen2 per layer), clip_qkv and attention biases; scaled RoPE
# (YaRN for DeepSeek-V3 and Qwen3, linear, llama3)
VARIANTS = MANIFEST["variants"]


def greedy(model, prompt, steps):
    b, s = prompt.shape
    pad = jnp.zeros((b,), jnp.int32)
    cache = init_cache(model.cfg, b, s + steps, jnp.float32)
    logits, cache = forward(model, jnp.asarray(prompt, jnp.int32), pad, cache, 0)
    out = [jnp.argmax(logits[:, -1], -1)]
    for i in range(steps - 1):
        logits, cache = forward(model, out[-1][:, None].astype(jnp.int32), pad, cache,
                                jnp.int32(s + i))
        out.append(jnp.argmax(logits[:, -1], -1))
    return np.stack([np.asarray(o) for o in out], axis=1)


@pytest.mark.parametrize(
    "name,num_ranks,schedule",
    # every family on 1 device (the default init) and on 8 with the prefill schedule (the init
    # with the larger logits). The variants change only attention (replicated, the same on any
    # device count): once each, on 8 devices with the decode schedule, so that every family
    # also decodes with it.
    [(n, p, "prefill") for n in NAMES for p in (1, 8) if (p == 1) == n.endswith("-default")]
    + [(n, 8, "decode") for n in VARIANTS],
)
def test_logits_and_greedy_tokens_match_transformers(name, num_ranks, schedule):
    ref = np.load(os.path.join(FIXTURES, name, "reference.npz"))
    model = checkpoint.load_model(os.path.join(FIXTURES, name), mesh=make_mesh(num_ranks),
                                  schedule=schedule)
    ids = jnp.asarray(ref["input_ids"], jnp.int32)
    cache = init_cache(model.cfg, ids.shape[0], ids.shape[1], jnp.float32)
    logits, _ = forward(model, ids, jnp.zeros((ids.shape[0],), jnp.int32), cache, 0)
    scale = max(1.0, float(np.abs(ref["logits"]).max()))
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-5 * scale, rtol=1e-4)
    np.testing.assert_array_equal(greedy(model, ref["prompt"], ref["greedy"].shape[1]), ref["greedy"])


@pytest.mark.parametrize("name", [n for n in VARIANTS if n.endswith(("-yarn", "-linear", "-llama3"))])
def test_scaled_rope_fixtures_need_their_scaling(name):
    """The scaled-RoPE fixtures' positions reach past original_max_position_embeddings: with
    the scaling taken out, the logits leave transformers' (so the parity above tests it)."""
    import dataclasses

    ref = np.load(os.path.join(FIXTURES, name, "reference.npz"))
    model = checkpoint.load_model(os.path.join(FIXTURES, name), mesh=make_mesh(8))
    plain = dataclasses.replace(model.cfg, rope_scaling=None)
    for layer in model.layers:
        layer.attn.cfg = plain
    ids = jnp.asarray(ref["input_ids"], jnp.int32)
    cache = init_cache(model.cfg, ids.shape[0], ids.shape[1], jnp.float32)
    logits, _ = forward(model, ids, jnp.zeros((ids.shape[0],), jnp.int32), cache, 0)
    assert np.abs(np.asarray(logits) - ref["logits"]).max() > 1e-2


def test_byte_tokenizer_matches_its_hugging_face_form():
    from moe_relayfree_models import tokenizer

    folder = os.path.join(FIXTURES, "tokenizer")
    samples = json.load(open(os.path.join(folder, "samples.json")))
    for s in samples:
        assert tokenizer.encode(s["text"], bos=False) == s["ids"]
        assert tokenizer.decode(s["ids"]) == s["text"]
    assert any(max(s["ids"]) > 127 for s in samples)  # non-ASCII bytes covered
    assert isinstance(tokenizer.load_tokenizer(FIXTURES, tokenizer.VOCAB_SIZE), tokenizer.ByteTokenizer)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        tokenizer.load_tokenizer(FIXTURES, 32000)
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install tokenizers"):
            tokenizer.load_tokenizer(folder, tokenizer.VOCAB_SIZE)
    else:
        hf = tokenizer.load_tokenizer(folder, tokenizer.VOCAB_SIZE)
        assert [hf.encode(s["text"]) for s in samples] == [s["ids"] for s in samples]


@pytest.mark.parametrize("case", sorted(os.listdir(os.path.join(FIXTURES, "tokenizers"))))
def test_prompt_encoding_matches_transformers(case):
    """BOS exactly where the checkpoint's tokenizer puts it: a template post-processor adds it
    (even with add_bos_token false in tokenizer_config.json), a byte-level one does not (even
    with add_bos_token true), as transformers' AutoTokenizer encodes."""
    pytest.importorskip("tokenizers")
    from moe_relayfree_models import tokenizer

    folder = os.path.join(FIXTURES, "tokenizers", case)
    samples = json.load(open(os.path.join(folder, "samples.json")))["samples"]
    tok = tokenizer.load_tokenizer(folder, vocab_size=259)
    for s in samples:
        assert s["transformers"] == s["tokenizers"]
        assert tok.encode(s["text"]) == s["transformers"], s["text"]
    adds_bos = {"bytelevel-template-bos": True, "bytelevel-no-bos": False,
                "bytelevel-no-postprocessor": False, "metaspace-llama-bos": True}[case]
    assert all((s["transformers"][0] in (1, 256)) == adds_bos for s in samples)


@pytest.mark.parametrize("form", ["absorbed", "expanded"])
def test_mla_both_attention_forms_match_transformers(form):
    """DeepSeek-V3's attention in each form, forced for every call (the model picks per call by
    the number of queries: decode absorbs, a long prefill expands): logits and greedy tokens."""
    name = "deepseek_v3-large"
    ref = np.load(os.path.join(FIXTURES, name, "reference.npz"))
    model = checkpoint.load_model(os.path.join(FIXTURES, name), mesh=make_mesh(8),
                                  schedule="decode")
    model.set_mla_form(form)
    ids = jnp.asarray(ref["input_ids"], jnp.int32)
    cache = init_cache(model.cfg, ids.shape[0], ids.shape[1], jnp.float32)
    logits, _ = forward(model, ids, jnp.zeros((ids.shape[0],), jnp.int32), cache, 0)
    scale = max(1.0, float(np.abs(ref["logits"]).max()))
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-5 * scale, rtol=1e-4)
    np.testing.assert_array_equal(greedy(model, ref["prompt"], ref["greedy"].shape[1]), ref["greedy"])
