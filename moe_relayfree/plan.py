"""The prefill plan: counts, offsets and window sizes, the only state relay-free keeps.

Notation (per rank of the expert-parallel axis): ``P`` ranks, ``E`` experts, ``El = E // P``
local experts (global expert ``e`` lives on rank ``e // El`` as local expert ``e % El``),
``T`` local tokens, ``k`` experts per token, ``R`` static receive-buffer rows per round.

Layouts:
* send buffer on source ``s`` (``[T*k, d]``): token copies sorted by global expert, i.e. by
  (destination rank, local expert); segment ``(r, l)`` starts at ``send_start[s, r, l]``.
* virtual receive buffer on rank ``r``: expert-major windows; window ``l`` starts at
  ``window_start[r, l]`` and holds the rows of every source, in source-rank order.
* round ``j`` materialises virtual rows ``[j*R, (j+1)*R)`` of every receiver. Windows are
  contiguous, so each (source, local expert) segment clipped to a round is still contiguous:
  a ragged all-to-all with ``P*El`` segments writes it straight into its expert window.

A plan never drops a row: ``num_rounds`` rounds cover every receiver's ``total`` rows.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from moe_relayfree.windows import exclusive_cumsum


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PrefillPlan:
    """Per-rank plan of one prefill dispatch/combine (a pytree; ints are int32).

    Attributes:
      order: ``[T*k]`` flat (token, choice) index of each send-buffer row.
      slot: ``[T*k]`` inverse of ``order``: send-buffer row of each flat (token, choice).
      counts: ``[P_src, P_dst, El]`` token copies from each source to each (rank, local expert).
      send_start: ``[P_src, P_dst, El]`` send-buffer row where each segment starts on its source.
      virtual_start: ``[P_src, P_dst, El]`` virtual receive row of each segment on its receiver.
      window_start: ``[P, El]`` virtual receive row where each expert window starts.
      window_size: ``[P, El]`` rows of each expert window.
      num_rounds: ``[]`` rounds needed, identical on every rank (>= 1).
      rank: ``[]`` this rank's index on the axis.
      rows_per_round: static ``R``.
      max_rounds: static upper bound on ``num_rounds`` (``ceil(P*T*k / R)``).
    """

    order: jax.Array
    slot: jax.Array
    counts: jax.Array
    send_start: jax.Array
    virtual_start: jax.Array
    window_start: jax.Array
    window_size: jax.Array
    num_rounds: jax.Array
    rank: jax.Array
    rows_per_round: int = dataclasses.field(metadata=dict(static=True))
    max_rounds: int = dataclasses.field(metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RoundSegments:
    """Segments of one round (all ``[P, El] int32`` unless noted).

    Dispatch (this rank as source, indexed by destination ``(r, l)``):
      send_offsets, send_sizes, dest_offsets (row in the receiver's round buffer).
    Receive (this rank as destination, indexed by source ``(s, l)``):
      recv_offsets (row in this rank's round buffer), recv_sizes,
      source_offsets (row in the source's send buffer).
    group_sizes: ``[El]`` rows of each local expert window inside this round's buffer.
    """

    send_offsets: jax.Array
    send_sizes: jax.Array
    dest_offsets: jax.Array
    recv_offsets: jax.Array
    recv_sizes: jax.Array
    source_offsets: jax.Array
    group_sizes: jax.Array


def rows_per_round(tokens: int, k: int, num_ranks: int, capacity_factor: float | None) -> int:
    """Static receive rows per round: ``capacity_factor * T * k``, at most the worst case.

    The worst case (every copy of every rank lands on one rank) is ``P*T*k``; with
    ``capacity_factor=None`` the buffer is sized for it and one round always suffices.
    """
    worst = num_ranks * tokens * k
    if capacity_factor is None:
        return worst
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be positive or None, got {capacity_factor}")
    rows = -(-int(capacity_factor * tokens * k * 8) // 8)  # ceil(capacity_factor * T * k)
    return max(1, min(worst, rows))


def sort_copies(topk_ids: jax.Array, num_experts: int):
    """This rank's copies in global-expert order (stable), its inverse and per-expert counts.

    topk_ids ``[T, k]`` -> (order ``[T*k] int32``: flat (token, choice) index of each position
    in expert order; slot ``[T*k] int32``: position of each flat (token, choice), the inverse
    of ``order``; counts ``[E] int32``: copies per global expert). Purely local.
    """
    flat = topk_ids.reshape(-1).astype(jnp.int32)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    n = order.shape[0]
    slot = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    counts = jnp.zeros((num_experts,), jnp.int32).at[flat].add(1, mode="drop")
    return order, slot, counts


def sort_and_count(topk_ids: jax.Array, num_experts: int, axis_name: str):
    """:func:`sort_copies`, with every rank's counts from one ``all_gather`` of ``E`` ints.

    Returns (order ``[T*k]``, slot ``[T*k]``, counts ``[P_src, P_dst, El] int32``).
    """
    num_ranks = lax.axis_size(axis_name)
    order, slot, my_counts = sort_copies(topk_ids, num_experts)
    counts = lax.all_gather(my_counts, axis_name)
    return order, slot, counts.reshape(num_ranks, num_ranks, num_experts // num_ranks)


def make_prefill_plan(
    topk_ids: jax.Array, num_experts: int, axis_name: str, rows_per_round: int
) -> PrefillPlan:
    """Builds the plan; one ``all_gather`` of ``E`` int32 counts per rank is the only exchange.

    Args:
      topk_ids: ``[T, k] int32`` global expert ids of this rank's tokens.
      num_experts: ``E`` (divisible by the axis size).
      axis_name: expert-parallel mesh axis (call inside ``shard_map``).
      rows_per_round: static ``R``.
    """
    num_ranks = lax.axis_size(axis_name)
    order, slot, counts = sort_and_count(topk_ids, num_experts, axis_name)
    n = order.shape[0]

    send_start = exclusive_cumsum(counts.reshape(num_ranks, num_experts), 1).reshape(counts.shape)
    window_size = counts.sum(axis=0)  # [P_dst, El]
    window_start = exclusive_cumsum(window_size, 1)
    virtual_start = window_start[None] + exclusive_cumsum(counts, 0)
    total = window_size.sum(axis=1)
    num_rounds = jnp.maximum(1, -(-total.max() // rows_per_round)).astype(jnp.int32)
    max_rounds = -(-(num_ranks * n) // rows_per_round)
    return PrefillPlan(
        order=order,
        slot=slot,
        counts=counts,
        send_start=send_start,
        virtual_start=virtual_start,
        window_start=window_start,
        window_size=window_size,
        num_rounds=num_rounds,
        rank=lax.axis_index(axis_name).astype(jnp.int32),
        rows_per_round=rows_per_round,
        max_rounds=max(1, max_rounds),
    )


def round_segments(plan: PrefillPlan, round_index: jax.Array | int) -> RoundSegments:
    """Clips every segment and window of ``plan`` to round ``round_index``."""
    lo = jnp.asarray(round_index, jnp.int32) * plan.rows_per_round
    hi = lo + plan.rows_per_round
    a = jnp.clip(plan.virtual_start, lo, hi)  # [P_src, P_dst, El]
    b = jnp.clip(plan.virtual_start + plan.counts, lo, hi)
    sizes = b - a
    src_offsets = plan.send_start + (a - plan.virtual_start)
    dst_offsets = a - lo
    me = plan.rank
    w_lo = jnp.clip(plan.window_start[me], lo, hi)
    w_hi = jnp.clip(plan.window_start[me] + plan.window_size[me], lo, hi)
    return RoundSegments(
        send_offsets=src_offsets[me],
        send_sizes=sizes[me],
        dest_offsets=dst_offsets[me],
        recv_offsets=dst_offsets[:, me],
        recv_sizes=sizes[:, me],
        source_offsets=src_offsets[:, me],
        group_sizes=w_hi - w_lo,
    )
