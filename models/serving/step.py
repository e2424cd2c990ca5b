"""One engine step's program and its inputs: the step's work packed into one int32 array on
the host (:func:`pack`), one forward over the flat batch on the devices
(:func:`~moe_relayfree_models.paged.paged_forward`), each slot's next token chosen there, and
its log-probabilities where a request asked (:class:`~.engine.Engine` launches the steps and
reads the tokens back)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from moe_relayfree_models.generation import choose_tokens_per_row
from moe_relayfree_models.paged import StepBatch, paged_forward, sharded_pages
from moe_relayfree_models.serving.scheduler import MAX_LOGPROBS


def pack_sizes(n: int, shape: tuple[int, int, int, int]) -> list[int]:
    """Lengths of the packed step inputs (:func:`unpack`) for ``n`` token shards and ``shape
    = (D, C, Q, P)``, in order: tokens, positions, valid, source (``T`` each), decode_table,
    chunk_table, last, then per slot temperature, top_k, top_p, seed, the position being
    chosen and the top log-probabilities asked for (-1: none)."""
    d, c, q, p = shape
    t, slots = n * (d + c * q), n * (d + c)
    return [t, t, t, t, n * d * p, n * c * p, slots] + [slots] * 6


def unpack(packed: jax.Array, n: int, shape: tuple[int, int, int, int]):
    """``packed [sum(pack_sizes)] int32`` -> (StepBatch, source ``[T] int32``, sampling
    arrays): the step's inputs travel to the devices as ONE array (eleven small
    ``device_put`` calls to every device cost more than a small decode step's attention)."""
    d, c, q, p = shape
    parts = jnp.split(packed, np.cumsum(pack_sizes(n, shape))[:-1])
    tokens, positions, valid, source, decode_table, chunk_table, last = parts[:7]
    temperature, top_k, top_p, seed, position, logprobs = parts[7:]
    as_f32 = lambda a: jax.lax.bitcast_convert_type(a, jnp.float32)
    batch = StepBatch(tokens, positions, valid.astype(bool), decode_table.reshape(n * d, p),
                      chunk_table.reshape(n * c, p), last)
    seed = jax.lax.bitcast_convert_type(seed, jnp.uint32)
    return batch, source, (as_f32(temperature), top_k, as_f32(top_p), seed, position), logprobs


def pack(work, shape: tuple[int, int, int, int], shards: int, max_slots: int,
         pending: dict) -> tuple[np.ndarray, np.ndarray]:
    """The step's packed inputs (in :func:`pack_sizes`' order) for ``work`` (the scheduler's
    :class:`~.scheduler.Work` items), and each item's slot in the step's output
    (``[max_slots]``: shard ``j``'s slots from ``j * max_slots / shards``). ``pending``: the
    output slot of each request whose last token the step in flight samples (fed from that
    step's output on the devices)."""
    d, c, q, p = shape
    n = shards
    r = d + c * q
    t, slots = n * r, n * (d + c)
    tokens = np.zeros(t, np.int32)
    positions = np.zeros(t, np.int32)
    valid = np.zeros(t, np.int32)
    source = np.full(t, -1, np.int32)
    decode_table = np.zeros((n * d, p), np.int32)
    chunk_table = np.zeros((n * c, p), np.int32)
    last = np.zeros(slots, np.int32)
    temperature = np.zeros(slots, np.float32)
    top_k = np.zeros(slots, np.int32)
    top_p = np.ones(slots, np.float32)
    seed = np.zeros(slots, np.uint32)
    position = np.zeros(slots, np.int32)
    logprobs = np.full(slots, -1, np.int32)
    used_d, used_c = [0] * n, [0] * n
    per_shard = max_slots // n
    where = np.zeros(len(work), np.int64)
    for i, w in enumerate(work):
        req, shard = w.request, w.request.shard
        if w.chunk:  # chunk slot b of its shard: rows d + b q ..
            b = used_c[shard]
            used_c[shard] += 1
            row, local = d + b * q, d + b  # local: its slot among the shard's D + C
            chunk_table[shard * c + b, :len(req.pages)] = req.pages[:p]
        else:  # decode slot a of its shard: row a
            a = used_d[shard]
            used_d[shard] += 1
            row, local = a, a
            decode_table[shard * d + a, :len(req.pages)] = req.pages[:p]
        flat = shard * r + row
        known = req.tokens[w.start:w.start + w.count]
        tokens[flat:flat + len(known)] = known
        if len(known) < w.count:  # the last one is pending: the step in flight samples it
            source[flat + w.count - 1] = pending[req] - shard * per_shard
        positions[flat:flat + w.count] = np.arange(w.start, w.start + w.count)
        valid[flat:flat + w.count] = 1
        slot = shard * (d + c) + local
        last[slot] = row + w.count - 1
        sp = req.sampling
        temperature[slot], top_k[slot], top_p[slot] = sp.temperature, sp.top_k, sp.top_p
        seed[slot] = sp.seed
        position[slot] = w.start + w.count  # the position of the token being chosen
        if sp.logprobs is not None and w.samples:
            logprobs[slot] = sp.logprobs
        where[i] = shard * per_shard + local
    packed = np.concatenate([tokens, positions, valid, source, decode_table.ravel(),
                             chunk_table.ravel(), last, temperature.view(np.int32), top_k,
                             top_p.view(np.int32), seed.view(np.int32), position, logprobs])
    return packed, where


def token_logprobs(logits: jax.Array, tokens: jax.Array, k: int):
    """logits ``[S, V]``, the chosen tokens ``[S] int32`` -> (their log-probabilities ``[S]
    f32``, the ``k`` most likely ids ``[S, k] int32`` and theirs ``[S, k] f32``): of the
    model's distribution itself, before temperature and the top-k / top-p cuts (vLLM's
    default)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
    top, ids = jax.lax.top_k(logp, k)
    return chosen, ids.astype(jnp.int32), top


def feed_pending(tokens: jax.Array, source: jax.Array, previous: jax.Array) -> jax.Array:
    """One shard's rows (``tokens, source [R] int32``): a row whose ``source`` is ``s >= 0``
    is fed ``previous[s]`` (``[max slots / n] int32``, the shard's slots of the step before: a
    token it sampled that the host has not read yet). A request stays on its shard, so this
    stays on the device."""
    return jnp.where(source >= 0, previous[jnp.maximum(source, 0)], tokens)


@functools.partial(jax.jit, static_argnums=(0, 1, 6), donate_argnums=(5,))
def step_program(graphdef, shape, state, packed, previous, pages, whole_tokens: bool = False):
    """One engine step: ``packed`` inputs (:func:`pack_sizes`), ``previous [max slots]
    int32`` (the step before's output) and ``pages`` -> (this step's sampled tokens padded to
    ``[max slots] int32``, the pages, and :func:`token_logprobs` for every slot padded the
    same way: zeros unless some slot asked, when they cost a log-softmax and a top-k of the
    step's logits)."""
    model = nnx.merge(graphdef, state)
    # every part kept whole on every device: left to the partitioner, the slices were split at
    # their odd offsets with dozens of collective-permutes
    whole = NamedSharding(model.dispatch.mesh, PartitionSpec())
    lay = model.dispatch.layout
    batch, source, (temperature, top_k, top_p, seed, position), logprobs = (
        jax.lax.with_sharding_constraint(unpack(packed, lay.num_token_shards, shape), whole))
    batch = dataclasses.replace(batch, tokens=sharded_pages(lay, feed_pending, batch.tokens,
                                                            source, previous))
    logits, pages = paged_forward(model, batch, pages)
    # the per-row warpers sort every row: only when some request samples
    tokens = jax.lax.cond(jnp.any(temperature > 0),
                          lambda: choose_tokens_per_row(logits, temperature, top_k, top_p, seed,
                                                        position),
                          lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32))
    # every step's output [max slots] (each shard's slots padded where they are): one shape,
    # so any step can read the one before's
    per_shard = previous.shape[0] // lay.num_token_shards
    k = min(MAX_LOGPROBS, logits.shape[-1])
    asked = jnp.any(logprobs >= 0)

    def pad(a):
        return jnp.pad(a, [(0, per_shard - a.shape[0])] + [(0, 0)] * (a.ndim - 1))

    def shard_logprobs(logits, tokens):  # each device its own rows: no logit row moves
        top = logits[:, :k]  # zeros_like keeps the arrays' variation over the mesh axes
        out = jax.lax.cond(asked, lambda: token_logprobs(logits, tokens, k),
                           lambda: (jnp.zeros_like(tokens, jnp.float32),
                                    jnp.zeros_like(top, jnp.int32),
                                    jnp.zeros_like(top, jnp.float32)))
        return tuple(pad(a) for a in out)

    chosen = sharded_pages(lay, shard_logprobs, logits, tokens)
    tokens = sharded_pages(lay, pad, tokens)
    if whole_tokens:  # several processes: every process can read them (process 0 does)
        tokens, chosen = jax.lax.with_sharding_constraint((tokens, chosen), whole)
    return tokens, pages, chosen


__all__ = ["feed_pending", "pack", "pack_sizes", "step_program",
           "token_logprobs", "unpack"]
