"""Decode schedule: fixed slots, no count exchange, no sort (call inside ``shard_map``).

Token ``t`` of source ``s`` owns slot ``s*T + t`` on every rank. Op sequence per rank:

1. ``all_gather`` of x ``[T, d]`` and of the routing ``[T, k]`` ids and weights: every rank
   holds all ``P*T`` slots. (A dense ``all_to_all`` of ``[P, T, d]`` copies of x moves the
   same bytes; the gather also spares the ``[P, T, d]`` broadcast on the source.)
2. each rank builds its own ``[P*T, El]`` local-expert weight table from the gathered routing
   (ids owned by another rank give weight 0).
3. every local expert runs on the ``P*T`` slots; the rows are reduced over local experts with
   the table -> partial sums ``[P*T, d]``.
4. ``psum_scatter`` returns slot block ``s`` to source ``s`` summed over ranks: the result is
   already in token order. No count exchange, no un-permute.

Bytes per rank and direction: ``P*T*d`` (prefill: ``T*k*d``), no data-dependent shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

_F32 = jnp.float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeSlots:
    """rows ``[P*T, d]`` (slot order), row_weights ``[P*T, El] float32``."""

    rows: jax.Array
    row_weights: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeHandle:
    out_dtype: jnp.dtype = dataclasses.field(metadata=dict(static=True))
    axis_name: str = dataclasses.field(metadata=dict(static=True))


def dispatch(
    x: jax.Array, topk_ids: jax.Array, topk_weights: jax.Array, *, num_experts: int, axis_name: str
) -> tuple[DecodeSlots, DecodeHandle]:
    """Steps 1-2. x ``[T, d]``, topk_ids ``[T, k] int32``, topk_weights ``[T, k]``."""
    num_ranks = lax.axis_size(axis_name)
    local = num_experts // num_ranks
    rows = lax.all_gather(x, axis_name, tiled=True)  # [P*T, d]
    ids = lax.all_gather(topk_ids, axis_name, tiled=True)  # [P*T, k]
    w = lax.all_gather(topk_weights.astype(_F32), axis_name, tiled=True)
    local_id = ids - lax.axis_index(axis_name) * local
    mine = (local_id >= 0) & (local_id < local)
    one_hot = (local_id[..., None] == jnp.arange(local)) & mine[..., None]  # [P*T, k, El]
    row_weights = jnp.einsum("nk,nke->ne", w, one_hot.astype(_F32))
    return DecodeSlots(rows=rows, row_weights=row_weights), DecodeHandle(x.dtype, axis_name)


def combine(partial: jax.Array, handle: DecodeHandle) -> jax.Array:
    """Step 4. partial ``[P*T, d]`` float32 -> ``[T, d]`` summed over ranks (x dtype)."""
    y = lax.psum_scatter(partial.astype(_F32), handle.axis_name, scatter_dimension=0, tiled=True)
    return y.astype(handle.out_dtype)


def decode_moe(
    x: jax.Array,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    expert_fn: Callable[[DecodeSlots], jax.Array],
    *,
    num_experts: int,
    axis_name: str,
) -> jax.Array:
    """The whole decode schedule; ``expert_fn(slots) -> [P*T, d]`` weighted partial sums."""
    slots, handle = dispatch(
        x, topk_ids, topk_weights, num_experts=num_experts, axis_name=axis_name
    )
    return combine(expert_fn(slots), handle)
