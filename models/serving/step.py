"""The device side of one engine step: the step's inputs packed into one int32 array, one
forward over the flat batch (:func:`~moe_relayfree_models.paged.paged_forward`), and each
slot's next token chosen on the device (:class:`~.engine.Engine` lays the inputs out and
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


def pack_sizes(n: int, shape: tuple[int, int, int, int]) -> list[int]:
    """Lengths of the packed step inputs (:func:`unpack`) for ``n`` token shards and ``shape
    = (D, C, Q, P)``, in order: tokens, positions, valid, source (``T`` each), decode_table,
    chunk_table, last, then per slot temperature, top_k, top_p, seed and the position being
    chosen."""
    d, c, q, p = shape
    t, slots = n * (d + c * q), n * (d + c)
    return [t, t, t, t, n * d * p, n * c * p, slots] + [slots] * 5


def unpack(packed: jax.Array, n: int, shape: tuple[int, int, int, int]):
    """``packed [sum(pack_sizes)] int32`` -> (StepBatch, source ``[T] int32``, sampling
    arrays): the step's inputs travel to the devices as ONE array (eleven small
    ``device_put`` calls to every device cost more than a small decode step's attention)."""
    d, c, q, p = shape
    parts = jnp.split(packed, np.cumsum(pack_sizes(n, shape))[:-1])
    tokens, positions, valid, source, decode_table, chunk_table, last = parts[:7]
    temperature, top_k, top_p, seed, position = parts[7:]
    as_f32 = lambda a: jax.lax.bitcast_convert_type(a, jnp.float32)
    batch = StepBatch(tokens, positions, valid.astype(bool), decode_table.reshape(n * d, p),
                      chunk_table.reshape(n * c, p), last)
    seed = jax.lax.bitcast_convert_type(seed, jnp.uint32)
    return batch, source, (as_f32(temperature), top_k, as_f32(top_p), seed, position)


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
    ``[max slots] int32``, the pages)."""
    model = nnx.merge(graphdef, state)
    # every part kept whole on every device: left to the partitioner, the slices were split at
    # their odd offsets with dozens of collective-permutes
    whole = NamedSharding(model.dispatch.mesh, PartitionSpec())
    lay = model.dispatch.layout
    batch, source, (temperature, top_k, top_p, seed, position) = jax.lax.with_sharding_constraint(
        unpack(packed, lay.num_token_shards, shape), whole)
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
    tokens = sharded_pages(lay, lambda t: jnp.pad(t, (0, per_shard - t.shape[0])), tokens)
    if whole_tokens:  # several processes: every process can read them (process 0 does)
        tokens = jax.lax.with_sharding_constraint(tokens, whole)
    return tokens, pages


__all__ = ["feed_pending", "pack_sizes", "step_program", "unpack"]
