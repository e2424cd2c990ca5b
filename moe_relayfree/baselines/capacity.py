"""Capacity-based expert parallelism (GShard / Switch style), for comparison.

Per rank (call inside ``shard_map``), with capacity ``C`` slots per expert per source rank:

1. position of every copy inside its expert (choice-major priority: every token's first choice
   before any second choice), copies past ``C`` are DROPPED (their contribution is 0);
2. the padded ``[E, C, d]`` buffer, filled by one gather of the token each slot holds (the
   index form of GShard's ``[T, E, C]`` dispatch-mask einsum, as Tutel's fast dispatcher does
   it: the einsum multiplies every token by a 0 for every slot it is not in, so one NaN token
   made the whole buffer NaN);
3. dense ``all_to_all``: each rank receives ``[P, El, C, d]`` for its experts;
4. expert FFN on ``[El, P*C, d]`` (padding slots computed too);
5. ``all_to_all`` back and a weighted gather of each kept copy's slot.

A token's repeated choices of one expert fold into one copy first
(:func:`~moe_relayfree.routing.merge_repeated_choices`), so ``capacity=None`` uses ``C = T``
(a token then takes at most one slot of an expert): never drops, at ``E*T*d`` rows of buffer.
:func:`capacity_for` gives the usual ``factor * T * k / E``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from moe_relayfree.routing import merge_repeated_choices, poison_rows, screen_choices
from moe_relayfree.windows import take_rows, weighted_row_sum

_F32 = jnp.float32


def capacity_for(tokens: int, k: int, num_experts: int, factor: float | None) -> int:
    """Slots per expert per source rank: ``ceil(factor * T * k / E)``, or ``T`` (no drops)."""
    if factor is None:
        return tokens
    if factor <= 0:
        raise ValueError(f"capacity factor must be positive, got {factor}")
    return max(1, min(tokens, math.ceil(factor * tokens * k / num_experts)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CapacityHandle:
    """slot ``[T, k] int32`` buffer slot ``e*C + c`` of each copy; weights ``[T, k] f32``;
    kept ``[T, k] bool`` (False: dropped, or a folded repeat); dropped ``[]`` int32 copies
    dropped on this rank."""

    slot: jax.Array
    weights: jax.Array
    kept: jax.Array
    dropped: jax.Array
    invalid: jax.Array
    axis_name: str = dataclasses.field(metadata=dict(static=True))


def dispatch(
    x: jax.Array,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    *,
    num_experts: int,
    axis_name: str,
    capacity: int | None = None,
) -> tuple[jax.Array, CapacityHandle]:
    """Steps 1-3. Returns (expert input ``[El, P*C, d]``, handle). Ids in ``[0, E)`` or ``-1``
    (no expert); any other id makes its token's output NaN."""
    num_ranks = lax.axis_size(axis_name)
    local = num_experts // num_ranks
    t, k = topk_ids.shape
    d = x.shape[1]
    cap = t if capacity is None else capacity
    ids, weights, invalid = screen_choices(topk_ids, topk_weights, num_experts)
    ids, weights = merge_repeated_choices(ids, weights, num_experts)
    real = ids < num_experts
    # one_hot of the "no copy" id num_experts is all zeros: a repeat takes no slot
    one_hot = jax.nn.one_hot(ids.T.reshape(-1), num_experts, dtype=jnp.int32)  # [k*T, E]
    position = (jnp.cumsum(one_hot, axis=0) - 1) * one_hot
    position = position.sum(-1).reshape(k, t).T  # [T, k]
    kept = real & (position < cap)
    slot = jnp.where(kept, ids * cap + position, num_experts * cap)
    token = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[:, None], (t, k))
    # slot -> token it holds (t = the zero row appended to x: an empty slot)
    holder = jnp.full((num_experts * cap,), t, jnp.int32).at[slot].set(token, mode="drop")
    padded = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)], axis=0)
    buf = take_rows(padded, holder).reshape(num_ranks, local, cap, d)
    recv = lax.all_to_all(buf, axis_name, 0, 0, tiled=True)  # [P_src, El, C, d]
    expert_in = recv.transpose(1, 0, 2, 3).reshape(local, num_ranks * cap, d)
    dropped = jnp.sum(real & ~kept).astype(jnp.int32)
    return expert_in, CapacityHandle(jnp.minimum(slot, num_experts * cap - 1), weights, kept,
                                     dropped, invalid, axis_name)


def combine(expert_out: jax.Array, handle: CapacityHandle) -> jax.Array:
    """Steps 4-5 (after the experts). expert_out ``[El, P*C, d]`` -> ``[T, d]``."""
    num_ranks = lax.axis_size(handle.axis_name)
    local, rows, d = expert_out.shape
    cap = rows // num_ranks
    back = expert_out.reshape(local, num_ranks, cap, d).transpose(1, 0, 2, 3)
    back = lax.all_to_all(back, handle.axis_name, 0, 0, tiled=True)  # [P_dst, El, C, d]
    back = back.reshape(num_ranks * local * cap, d)
    y = weighted_row_sum(back, handle.slot, handle.weights, handle.kept)
    return poison_rows(y, handle.invalid).astype(expert_out.dtype)
