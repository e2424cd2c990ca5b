"""Capacity-based expert parallelism (GShard / Switch style), for comparison.

Per rank (call inside ``shard_map``), with capacity ``C`` slots per expert per source rank:

1. position of every copy inside its expert (choice-major priority: every token's first choice
   before any second choice), copies past ``C`` are DROPPED (their contribution is 0);
2. dispatch mask ``[T, E, C]`` and an einsum into the padded ``[E, C, d]`` buffer;
3. dense ``all_to_all``: each rank receives ``[P, El, C, d]`` for its experts;
4. expert FFN on ``[El, P*C, d]`` (padding slots computed too);
5. ``all_to_all`` back and a combine einsum with the ``[T, E, C]`` weights.

``capacity=None`` uses ``C = T`` (a token picks an expert at most once): never drops, at
``E*T*d`` rows of buffer. :func:`capacity_for` gives the usual ``factor * T * k / E``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

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
    """combine_weights ``[T, E, C] f32``; dropped ``[]`` int32 copies dropped on this rank."""

    combine_weights: jax.Array
    dropped: jax.Array
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
    """Steps 1-3. Returns (expert input ``[El, P*C, d]``, handle)."""
    num_ranks = lax.axis_size(axis_name)
    local = num_experts // num_ranks
    t, k = topk_ids.shape
    cap = t if capacity is None else capacity
    one_hot = jax.nn.one_hot(topk_ids.T.reshape(-1), num_experts, dtype=jnp.int32)  # [k*T, E]
    position = (jnp.cumsum(one_hot, axis=0) - 1) * one_hot
    position = position.sum(-1).reshape(k, t).T  # [T, k]
    keep = position < cap
    slot = jax.nn.one_hot(jnp.where(keep, position, cap), cap, dtype=_F32)  # [T, k, C]
    expert = jax.nn.one_hot(topk_ids, num_experts, dtype=_F32)  # [T, k, E]
    dispatch_mask = jnp.einsum("tke,tkc->tec", expert, slot)
    combine_weights = jnp.einsum("tke,tkc,tk->tec", expert, slot, topk_weights.astype(_F32))
    buf = jnp.einsum("tec,td->ecd", dispatch_mask.astype(x.dtype), x)  # [E, C, d]
    buf = buf.reshape(num_ranks, local, cap, x.shape[1])
    recv = lax.all_to_all(buf, axis_name, 0, 0, tiled=True)  # [P_src, El, C, d]
    expert_in = recv.transpose(1, 0, 2, 3).reshape(local, num_ranks * cap, x.shape[1])
    dropped = jnp.sum(~keep).astype(jnp.int32)
    return expert_in, CapacityHandle(combine_weights, dropped, axis_name)


def combine(expert_out: jax.Array, handle: CapacityHandle) -> jax.Array:
    """Steps 4-5 (after the experts). expert_out ``[El, P*C, d]`` -> ``[T, d]``."""
    num_ranks = lax.axis_size(handle.axis_name)
    local, rows, d = expert_out.shape
    cap = rows // num_ranks
    back = expert_out.reshape(local, num_ranks, cap, d).transpose(1, 0, 2, 3)
    back = lax.all_to_all(back, handle.axis_name, 0, 0, tiled=True)  # [P_dst, El, C, d]
    back = back.reshape(num_ranks * local, cap, d)
    y = jnp.einsum("tec,ecd->td", handle.combine_weights, back.astype(_F32))
    return y.astype(expert_out.dtype)
