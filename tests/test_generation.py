"""Token choice (models/generation.py) against NumPy transcriptions of Hugging Face's logits
warpers, and the stop ids a checkpoint declares."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_relayfree_models import generation
from moe_relayfree_models.generation import Sampling, choose_tokens, filtered_logits, stop_token_ids


def hf_warped(logits: np.ndarray, s: Sampling) -> np.ndarray:
    """transformers' TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper (in that order,
    min_tokens_to_keep=1), row by row in float64."""
    x = logits.astype(np.float64) / s.temperature
    if s.top_k:
        kth = np.sort(x, axis=-1)[:, -min(s.top_k, x.shape[-1])][:, None]
        x = np.where(x < kth, -np.inf, x)
    if s.top_p < 1:
        out = x.copy()
        for row, r in zip(x, out):
            order = np.argsort(row, kind="stable")  # ascending
            p = np.exp(row[order] - row[order].max())
            cum = np.cumsum(p / p.sum())
            remove = cum <= 1 - s.top_p
            remove[-1] = False
            r[order[remove]] = -np.inf
        x = out
    return x


CASES = [Sampling(0.7), Sampling(1.0, top_k=5), Sampling(1.3, top_p=0.8),
         Sampling(0.9, top_k=12, top_p=0.6), Sampling(1.0, top_p=1e-6)]


@pytest.mark.parametrize("s", CASES, ids=str)
def test_filtered_logits_keep_what_hf_keeps(s):
    logits = np.random.default_rng(0).normal(0, 2, (16, 40)).astype(np.float32)
    got = np.asarray(filtered_logits(jnp.asarray(logits), s))
    want = hf_warped(logits, s)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    kept = np.isfinite(want)
    np.testing.assert_allclose(got[kept], want[kept], rtol=1e-6)
    if s.top_p == 1e-6:  # a vanishing nucleus is the single most likely token
        assert (kept.sum(-1) == 1).all() and (kept.argmax(-1) == logits.argmax(-1)).all()


def test_per_row_settings_keep_what_hf_keeps_and_draw_per_request():
    """The serving engine's warpers (each row its own settings, one batch mixing every case
    above) keep what Hugging Face's keep; greedy rows are the argmax; a row's draw depends on
    its own seed and position only, not on the other rows of the batch."""
    logits = np.random.default_rng(1).normal(0, 2, (len(CASES) + 1, 40)).astype(np.float32)
    settings = CASES + [Sampling()]
    arrays = [jnp.asarray([getattr(s, f) for s in settings], dtype)
              for f, dtype in (("temperature", jnp.float32), ("top_k", jnp.int32),
                               ("top_p", jnp.float32))]
    got = np.asarray(generation.filtered_logits_per_row(jnp.asarray(logits), *arrays))
    for row, s in enumerate(CASES):
        want = hf_warped(logits[row:row + 1], s)[0]
        np.testing.assert_array_equal(np.isfinite(got[row]), np.isfinite(want), err_msg=str(s))
        kept = np.isfinite(want)
        np.testing.assert_allclose(got[row][kept], want[kept], rtol=1e-6, err_msg=str(s))
    seed = jnp.arange(len(settings), dtype=jnp.uint32) + 7
    position = jnp.full((len(settings),), 5, jnp.int32)
    tokens = np.asarray(generation.choose_tokens_per_row(jnp.asarray(logits), *arrays, seed,
                                                         position))
    assert tokens[-1] == logits[-1].argmax()
    assert all(np.isfinite(got[r, t]) for r, t in enumerate(tokens[:-1]))  # drawn from the kept
    alone = [int(generation.choose_tokens_per_row(jnp.asarray(logits[r:r + 1]),
                                                  *(a[r:r + 1] for a in arrays), seed[r:r + 1],
                                                  position[r:r + 1])[0])
             for r in range(len(settings))]
    assert tokens.tolist() == alone


def test_top_k_keeps_ties_with_the_kth_logit():
    logits = jnp.asarray([[3.0, 1.0, 2.0, 2.0, 0.0]])
    kept = np.isfinite(np.asarray(filtered_logits(logits, Sampling(1.0, top_k=2))))
    assert kept.tolist() == [[True, False, True, True, False]]


@pytest.mark.parametrize("top_p", [0.6, 0.99])
def test_top_p_after_top_k_keeps_ties_as_hf_does(top_p):
    """The nucleus is found among the top-k values only; ties with the k-th logit are kept
    with it (or dropped with it) as with a sort of the whole vocabulary."""
    logits = np.asarray([[3.0, 2.0, 1.0, 1.0, 1.0, 0.0, 1.0]], np.float32)
    s = Sampling(1.0, top_k=3, top_p=top_p)
    got = np.isfinite(np.asarray(filtered_logits(jnp.asarray(logits), s)))
    np.testing.assert_array_equal(got, np.isfinite(hf_warped(logits, s)))
    assert got.sum() == (2 if top_p == 0.6 else 6)


def test_draws_follow_the_filtered_distribution():
    """20000 draws of one row against softmax of HF's warped logits (total variation)."""
    logits = np.random.default_rng(1).normal(0, 1.5, (1, 12)).astype(np.float32)
    for s in (Sampling(0.8), Sampling(1.2, top_k=6, top_p=0.9)):
        want = hf_warped(logits, s)[0]
        want = np.exp(want - want.max())
        want /= want.sum()
        draws = np.asarray(choose_tokens(jnp.repeat(jnp.asarray(logits), 20000, 0),
                                         jax.random.key(3), 7, s))
        freq = np.bincount(draws, minlength=12) / draws.size
        assert freq[want == 0].sum() == 0, s
        assert 0.5 * np.abs(freq - want).sum() < 0.02, (s, freq, want)


def test_greedy_is_argmax_and_the_key_follows_the_position():
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(64, 30)), jnp.float32)
    key = jax.random.key(0)
    assert (choose_tokens(logits, key, 5, generation.GREEDY) == jnp.argmax(logits, -1)).all()
    s = Sampling(2.0)
    a, b, c = (np.asarray(choose_tokens(logits, key, p, s)) for p in (5, 5, 6))
    assert (a == b).all() and (a != c).any()


@pytest.mark.parametrize("kwargs", [dict(temperature=-1.0), dict(top_k=-2), dict(top_k=1.5),
                                    dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_is_a_clear_error(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Sampling(**kwargs)


def test_stop_ids_as_transformers_finds_them(tmp_path):
    def write(name, values):
        (tmp_path / name).write_text(json.dumps(values))

    write("config.json", {"model_type": "mixtral"})
    assert stop_token_ids(str(tmp_path)) == (2,)  # the config class's default
    write("config.json", {"model_type": "qwen3_moe", "eos_token_id": 151643})
    assert stop_token_ids(str(tmp_path)) == (151643,)
    write("generation_config.json", {"eos_token_id": [151645, 151643]})  # wins over config.json
    assert stop_token_ids(str(tmp_path)) == (151645, 151643)

    class Tok:
        eos_id = 7

    assert stop_token_ids(str(tmp_path), Tok()) == (151645, 151643, 7)


FIXTURES = __import__("os").path.join(__import__("os").path.dirname(__file__), "fixtures", "hf")


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3"])
def test_every_family_decodes_in_bf16_on_cpu(arch):
    """Each family's prefill and decode steps in bf16 (a checkpoint's usual dtype) on XLA:CPU:
    DeepSeek-V3's latent attention failed there ("Unsupported element type for
    DotThunk::Execute: BF16 x BF16 = F32"). Tokens within the vocabulary, one per step."""
    import os

    import moe_relayfree as mr
    from moe_relayfree_models import checkpoint

    model = checkpoint.load_model(os.path.join(FIXTURES, f"{arch}-large"),
                                  mesh=mr.make_ep_mesh(8), dtype="bfloat16")
    assert model.compute_dtype == jnp.bfloat16
    out = generation.generate(model, [[5, 6, 7, 8], [9, 10]], 3)
    assert [len(t) for t in out["tokens"]] == [3, 3]
    assert all(0 <= t < model.cfg.vocab_size for row in out["tokens"] for t in row)


def test_requests_past_the_model_positions_are_refused():
    """A prompt, or prompt + new tokens, past max_position_embeddings: refused with the numbers
    (it ran on with no word and degraded)."""
    from types import SimpleNamespace

    cfg = SimpleNamespace(max_position=16)
    generation.check_context(cfg, 10, 6)  # exactly the positions there are
    with pytest.raises(ValueError, match="10 prompt tokens \\+ 7 new tokens exceed the model's 16 "
                                         "positions.*at most 6 new tokens"):
        generation.check_context(cfg, 10, 7)
    with pytest.raises(ValueError, match="the prompt has 16 tokens; this model takes at most 16"):
        generation.check_context(cfg, 16, 1)
