"""Batched generation: one jitted prefill, one jitted decode step, token choice and stopping.

Token choice follows Hugging Face's logits warpers, in their order: temperature, then top-k,
then top-p (nucleus); ``temperature=0`` is greedy (argmax). The token for absolute position
``p`` is drawn with ``fold_in(key, p)``, so a seed gives the same text whatever the number of
steps already taken, and no key is threaded through the host loop.

Stopping: a row finishes at its first stop token (the checkpoint's EOS ids); the batch keeps
its static shape (a finished row still steps, its tokens are discarded) and the loop ends when
every row has finished or ``max_new_tokens`` is reached.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from moe_relayfree_models.transformer import init_cache


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. ``temperature=0``: greedy; ``top_k=0``: no top-k cut;
    ``top_p=1``: no nucleus cut. Hashable: the jitted programs take it as a static argument."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k must be an int >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling()


def filtered_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """Logits ``[B, V]`` -> f32 ``[B, V]`` divided by the temperature, with the tokens outside
    top-k / top-p set to ``-inf`` (Hugging Face's ``TopKLogitsWarper`` / ``TopPLogitsWarper``:
    ties with the k-th logit are kept; the nucleus is the fewest most likely tokens whose mass
    reaches ``top_p``, at least one). Not for greedy sampling (temperature 0)."""
    x = logits.astype(jnp.float32) / sampling.temperature
    vocab = x.shape[-1]
    desc = None  # the largest logits, in descending order, if known
    if 0 < sampling.top_k < vocab:
        desc = lax.top_k(x, sampling.top_k)[0]
        x = jnp.where(x < desc[..., -1:], -jnp.inf, x)
    if sampling.top_p < 1:
        # after top-k the nucleus lies among its k values (a tie with the k-th logit is kept
        # with it either way): no sort of the whole vocabulary (a [B, 152k] sort per step was
        # most of a sampled CPU decode step)
        if desc is None:
            desc = -jnp.sort(-x, axis=-1)
        probs = jnp.exp(desc - jax.nn.logsumexp(x, axis=-1, keepdims=True))
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # a token is kept while the mass of the more likely ones is still short of top_p
        kept = mass_before < sampling.top_p
        smallest_kept = jnp.min(jnp.where(kept, desc, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x < smallest_kept, -jnp.inf, x)
    return x


def choose_tokens(logits: jax.Array, key: jax.Array, position, sampling: Sampling) -> jax.Array:
    """Next token of each row: logits ``[B, V]`` -> ``[B] int32``; ``key`` a PRNG key,
    ``position`` the absolute position of the token being chosen (its key is
    ``fold_in(key, position)``)."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    key = jax.random.fold_in(key, position)
    return jax.random.categorical(key, filtered_logits(logits, sampling), axis=-1).astype(jnp.int32)


def choose_tokens_per_row(logits: jax.Array, temperature: jax.Array, top_k: jax.Array,
                          top_p: jax.Array, seed: jax.Array, position: jax.Array) -> jax.Array:
    """:func:`choose_tokens` with each row's own settings, as a serving batch mixes requests:
    logits ``[S, V]``; temperature ``[S] f32`` (0: greedy), top_k ``[S] int32`` (0: off),
    top_p ``[S] f32`` (1: off), seed ``[S] uint32``, position ``[S] int32`` -> ``[S] int32``.
    Row ``s``'s draw uses ``fold_in(key(seed[s]), position[s])`` only, so a request's tokens
    do not depend on what else is in the batch. The same warpers as :func:`filtered_logits`
    (temperature, then top-k keeping ties, then top-p over what top-k kept)."""
    sampled = temperature > 0
    x = filtered_logits_per_row(logits, temperature, top_k, top_p)

    def draw(seed, position, row):
        key = jax.random.fold_in(jax.random.key(seed), position)
        return jax.random.categorical(key, row)

    drawn = jax.vmap(draw)(seed, position, x).astype(jnp.int32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jnp.where(sampled, drawn, greedy)


def filtered_logits_per_row(logits: jax.Array, temperature: jax.Array, top_k: jax.Array,
                            top_p: jax.Array) -> jax.Array:
    """:func:`filtered_logits` with each row's own settings (``[S]`` arrays; a temperature of
    0 reads as 1 here: greedy rows take the argmax of the raw logits). A full sort per row,
    where :func:`filtered_logits` takes ``lax.top_k`` of one static ``k``."""
    x = logits.astype(jnp.float32)
    vocab = x.shape[-1]
    x = x / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    desc = -jnp.sort(-x, axis=-1)
    k = jnp.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)
    x = jnp.where(x < kth, -jnp.inf, x)
    rank = jnp.arange(vocab)[None, :]
    in_k = rank < k[:, None]
    desc = jnp.where(in_k, desc, -jnp.inf)
    probs = jnp.exp(desc - jax.nn.logsumexp(desc, axis=-1, keepdims=True))
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = (mass_before < top_p[:, None]) & in_k
    smallest_kept = jnp.min(jnp.where(kept, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where((top_p[:, None] < 1) & (x < smallest_kept), -jnp.inf, x)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=5)
def prefill_program(graphdef, sampling: Sampling, state, tokens, pad, cache, key):
    """Whole prompts ``[B, S]`` -> (first new token ``[B] int32``, filled cache); logits only
    at the last position (left padding puts every row's last token there).

    Plain ``jax.jit`` on the split model, not ``nnx.jit`` on the module: nnx.jit walks and
    re-flattens the module graph in Python on every call, milliseconds of Python per decode step
    (docs/benchmarks.md). The KV cache is donated: each call writes the updated cache into the
    buffers it was given.
    """
    logits, cache = nnx.merge(graphdef, state)(tokens, pad, cache, 0, logits_to_keep=1)
    return choose_tokens(logits[:, -1], key, tokens.shape[1], sampling), cache


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=5)
def step_program(graphdef, sampling: Sampling, state, token, pad, cache, position, key):
    """One decode step: ``token [B]`` at ``position`` -> (next token ``[B] int32``, cache)."""
    logits, cache = nnx.merge(graphdef, state)(token[:, None], pad, cache, position)
    return choose_tokens(logits[:, -1], key, position + 1, sampling), cache


def stop_token_ids(folder: str, tokenizer=None) -> tuple[int, ...]:
    """The ids that end a completion, as transformers' ``generate`` finds them:
    ``generation_config.json``'s ``eos_token_id`` (Qwen3's lists two), else ``config.json``'s,
    else the default of the model type's config class (``models/hf_defaults.py``); plus the
    tokenizer's own EOS id where it has one (the byte-level scheme's)."""
    from moe_relayfree_models.hf_defaults import DEFAULTS

    eos, model_type = None, None
    for name in ("generation_config.json", "config.json"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            with open(path) as fh:
                values = json.load(fh)
            model_type = model_type or values.get("model_type")
            if eos is None:
                eos = values.get("eos_token_id")
    if eos is None:
        eos = DEFAULTS.get(model_type, {}).get("eos_token_id")
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    own = getattr(tokenizer, "eos_id", None)
    if own is not None and own not in ids:
        ids.append(own)
    return tuple(int(i) for i in ids)


def _to_host(token: jax.Array) -> np.ndarray:
    """``[B]`` tokens on the host; over several processes every process gets all of them (each
    holds only its devices' rows), so every process takes the same stopping decision."""
    if token.is_fully_addressable:
        return np.asarray(token)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(token, tiled=True))


def _finish(row: list[int], stop_ids) -> tuple[list[int], str]:
    """A row cut before its first stop token, and why it ended (``"stop"`` / ``"length"``)."""
    for i, t in enumerate(row):
        if t in stop_ids:
            return row[:i], "stop"
    return row, "length"


class ContextLengthError(ValueError):
    """A request past the model's positions; ``param`` names what is too long ("prompt" or
    "max_tokens")."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def check_context(cfg, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuses a request past the model's positions (``max_position_embeddings``): past them
    RoPE runs on positions the model never saw and quality degrades with no word, so, as vLLM
    does, the request is refused (:class:`ContextLengthError`), naming the numbers."""
    if prompt_tokens >= cfg.max_position:
        raise ContextLengthError(
            f"the prompt has {prompt_tokens} tokens; this model takes at most "
            f"{cfg.max_position} positions (max_position_embeddings), prompt and new tokens "
            "together", "prompt")
    if prompt_tokens + max_new_tokens > cfg.max_position:
        raise ContextLengthError(
            f"{prompt_tokens} prompt tokens + {max_new_tokens} new tokens exceed the model's "
            f"{cfg.max_position} positions (max_position_embeddings); ask for at most "
            f"{cfg.max_position - prompt_tokens} new tokens", "max_tokens")


def generate(model, prompts: list[list[int]], max_new_tokens: int, *, sampling: Sampling = GREEDY,
             seed: int = 0, stop_ids=(), progress=None) -> dict:
    """Batched generation from left-padded prompts.

    Returns ``tokens`` (per row, cut before its first stop token), ``finish_reasons``
    (``"stop"`` / ``"length"``), ``ttft_s`` (prefill and first token), ``step_s`` (each decode
    step run: fewer than ``max_new_tokens - 1`` when every row stopped early), ``compile_s``
    and ``prompt_width``. Both programs are compiled and run once before anything is timed.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    check_context(model.cfg, max(len(p) for p in prompts), max_new_tokens)
    stop_ids = frozenset(int(i) for i in stop_ids)
    stops = np.asarray(sorted(stop_ids), np.int64)
    batch = len(prompts)
    width = max(len(p) for p in prompts)
    pad = jnp.asarray([width - len(p) for p in prompts], jnp.int32)
    tokens = jnp.asarray([[0] * (width - len(p)) + p for p in prompts], jnp.int32)
    graphdef, state = nnx.split(model)
    prefill = functools.partial(prefill_program, graphdef, sampling, state)
    step = functools.partial(step_program, graphdef, sampling, state)
    key = jax.random.key(seed)

    def fresh_cache():
        return init_cache(model.cfg, batch, width + max_new_tokens, model.compute_dtype)

    start = time.perf_counter()
    warm, cache = prefill(tokens, pad, fresh_cache(), key)
    jax.block_until_ready(step(warm, pad, cache, jnp.int32(width), key))
    compile_s = time.perf_counter() - start

    start = time.perf_counter()
    token, cache = prefill(tokens, pad, fresh_cache(), key)
    out = [_to_host(token)]  # the host copy also waits for the token
    ttft = time.perf_counter() - start
    finished = np.isin(out[0], stops)
    step_times = []
    for i in range(max_new_tokens - 1):
        if finished.all():
            break
        t0 = time.perf_counter()
        token, cache = step(token, pad, cache, jnp.int32(width + i), key)
        out.append(_to_host(token))
        step_times.append(time.perf_counter() - t0)
        finished |= np.isin(out[-1], stops)
        if progress:
            progress(i + 2, max_new_tokens)
    rows = [_finish(row, stop_ids) for row in np.stack(out, axis=1).tolist()]
    return {"tokens": [r for r, _ in rows], "finish_reasons": [why for _, why in rows],
            "ttft_s": ttft, "step_s": step_times, "compile_s": compile_s, "prompt_width": width}
