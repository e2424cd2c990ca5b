"""The plan of a planned dispatch: counts, offsets and window sizes, the only state relay-free
keeps. Both schedules use it: prefill, and decode beyond ``k`` ranks.

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

A rank keeps only its own view, ``O(P*El)`` ints: its segments as a source (indexed by
destination) and as a receiver (indexed by source). Two ways to learn it:

* ``exchange="all_gather"``: one ``all_gather`` of every rank's ``E`` counts (one collective;
  ``P*E`` ints arrive on each rank), the prefill default;
* ``exchange="all_to_all"``: an ``all_to_all`` of ``[P, 2*El]`` ints (counts and send starts
  to each receiver), the receiver lays its windows out and an ``all_to_all`` of ``[P, El]``
  returns each source its segments' offsets, while a scalar ``pmax`` agrees on the rounds:
  ``O(P*El)`` ints per rank (at EP 256 with E=256, 4 KB instead of 256 KB), for decode.

A plan never drops a row: ``num_rounds`` rounds cover every receiver's ``total`` rows.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from moe_relayfree.windows import exclusive_cumsum

_I32 = jnp.int32
Exchange = Literal["all_gather", "all_to_all"]
EXCHANGES: tuple[str, ...] = ("all_gather", "all_to_all")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Plan:
    """One rank's plan of a planned dispatch/combine (a pytree; ints are int32).

    Attributes:
      order: ``[T*k]`` flat (token, choice) index of each send-buffer row.
      slot: ``[T*k]`` inverse of ``order``: send-buffer row of each flat (token, choice).
      out_counts, out_send_start, out_virtual_start: ``[P_dst * El]`` this rank's segment to
        each (destination, local expert), flat: its rows, where it starts in this rank's send
        buffer, and where it starts in the destination's virtual receive buffer.
      in_counts, in_send_start, in_virtual_start: ``[P_src * El]`` the same of the segment each
        source sends to this rank's local experts. (Flat, as the ragged all-to-all takes
        them: as ``[P, El]`` a TPU pads each 4-int row of DeepSeek-V3's 4 local experts to
        128 lanes.)
      window_start, window_size: ``[El]`` this rank's expert windows in its virtual buffer.
      num_rounds: ``[]`` rounds needed, identical on every rank (>= 1).
      rows_per_round: static ``R``.
      max_rounds: static upper bound on ``num_rounds``.
    """

    order: jax.Array
    slot: jax.Array
    out_counts: jax.Array
    out_send_start: jax.Array
    out_virtual_start: jax.Array
    in_counts: jax.Array
    in_send_start: jax.Array
    in_virtual_start: jax.Array
    window_start: jax.Array
    window_size: jax.Array
    num_rounds: jax.Array
    rows_per_round: int = dataclasses.field(metadata=dict(static=True))
    max_rounds: int = dataclasses.field(metadata=dict(static=True))

    @property
    def num_ranks(self) -> int:
        return self.out_counts.shape[0] // self.window_size.shape[0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RoundSegments:
    """Segments of one round (all ``[P*El] int32``, flat as the plan's, unless noted).

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


# Receive rows per round, at least. At one token per rank a rank receives k copies on
# average, and under uniform routing 2*T*k = 16 rows are exceeded on some rank in 29-34% of
# layer calls with E=128 on 128 ranks, 56-81% with E=256 on 256 (an extra round; a bounded
# buffer drops them instead); 32 rows in 2.7e-10 and 2.3e-9 (:func:`overflow_probability`).
MIN_ROWS = 32


def rows_per_round(tokens: int, k: int, num_ranks: int, capacity_factor: float | None,
                   floor: int = MIN_ROWS) -> int:
    """Static receive rows per round: ``capacity_factor * T * k`` (at least ``floor``), at
    most the worst case.

    The worst case (every copy of every rank lands on one rank) is ``P*T*k``; with
    ``capacity_factor=None`` the buffer is sized for it and one round always suffices.
    """
    worst = num_ranks * tokens * k
    if capacity_factor is None:
        return worst
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be positive or None, got {capacity_factor}")
    rows = -(-int(capacity_factor * tokens * k * 8) // 8)  # ceil(capacity_factor * T * k)
    return max(1, min(worst, max(floor, rows)))


class Overflow(NamedTuple):
    """How often a receive buffer is too small (:func:`overflow_probability`)."""

    per_rank: float  # one given rank receives more than its rows
    any_rank_low: float  # some rank does: at least this, 1 - (1 - per_rank)**P
    any_rank_high: float  # and at most this, min(1, P * per_rank)


def overflow_probability(tokens: int, num_experts: int, num_ranks: int, k: int,
                         rows: int) -> Overflow:
    """How often a receive buffer of ``rows`` rows per rank is too small, under uniform
    routing (each of the group's ``tokens`` tokens picks ``k`` distinct experts of
    ``num_experts`` uniformly, independently; ``El = E // P`` of them on each rank).
    Relay-free then runs one more round; a bounded buffer (MaxText's) drops the copies past it.

    ``tokens`` is every rank's ``T`` together, ``P*T``. ``per_rank`` is exact (a convolution,
    to about 1e-12: an FFT past 2048 rows, never above Hoeffding's bound). The chance that some
    rank overflows lies between the two ``any_rank`` bounds: the ranks' counts are negatively
    associated (a token's copies are a uniform k-subset; Joag-Dev and Proschan 1983), so the
    ranks overflow together less often than independent ones would. Host-side NumPy.
    """
    local = num_experts // num_ranks
    if tokens < 0 or rows < 0 or not 0 < k <= num_experts or local < 1:
        raise ValueError(f"need tokens, rows >= 0 and 0 < k <= E with E >= P, got {tokens=}, "
                         f"{rows=}, {k=}, {num_experts=}, {num_ranks=}")
    if rows >= tokens * min(k, local):  # room for every copy a rank can receive
        return Overflow(0.0, 0.0, 0.0)
    # copies one token sends to one rank: hypergeometric, 0..min(k, El)
    one = np.array([math.comb(local, c) * math.comb(num_experts - local, k - c)
                    for c in range(min(k, local) + 1)], float) / math.comb(num_experts, k)

    def convolve(a, b):  # the pmf of a sum, truncated to [0, rows]: mass past rows stays past
        if len(a) * len(b) <= 1 << 22:
            return np.convolve(a, b)[: rows + 1]
        m = 1 << (len(a) + len(b)).bit_length()
        return np.clip(np.fft.irfft(np.fft.rfft(a, m) * np.fft.rfft(b, m), m)[: rows + 1], 0, 1)

    total, power, n = np.ones(1), one[: rows + 1], tokens
    while n:  # the tokens-fold convolution by squaring
        if n & 1:
            total = convolve(total, power)
        n >>= 1
        if n:
            power = convolve(power, power)
    per_rank = max(0.0, 1.0 - total.sum())
    # Hoeffding's bound holds exactly; it is below the FFT's rounding far in the tail
    excess = rows + 1 - tokens * k / num_ranks
    if excess > 0:
        per_rank = min(per_rank, math.exp(-2 * excess**2 / (tokens * min(k, local) ** 2)))
    per_rank = float(per_rank)
    return Overflow(per_rank, float(-np.expm1(num_ranks * np.log1p(-per_rank))),
                    min(1.0, num_ranks * per_rank))


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


def _rounds(total, rows_per_round: int):
    return jnp.maximum(1, -(-total // rows_per_round)).astype(_I32)


def make_plan(
    topk_ids: jax.Array, num_experts: int, axis_name: str, rows_per_round: int,
    exchange: Exchange = "all_gather", max_rows: int | None = None,
) -> Plan:
    """Builds this rank's plan.

    Args:
      topk_ids: ``[T, k] int32`` global expert ids of this rank's tokens (``num_experts``
        marks a copy that is not sent).
      num_experts: ``E`` (divisible by the axis size).
      axis_name: expert-parallel mesh axis (call inside ``shard_map``).
      rows_per_round: static ``R``.
      exchange: how the counts travel (module docstring).
      max_rows: the most rows one rank can receive, which bounds the rounds (default
        ``P*T*k``; ``P*T*min(k, El)`` where a token's ids are distinct).
    """
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
    num_ranks = lax.axis_size(axis_name)
    local = num_experts // num_ranks
    me = lax.axis_index(axis_name).astype(_I32)
    order, slot, my_counts = sort_copies(topk_ids, num_experts)
    n = order.shape[0]
    out_counts = my_counts.reshape(num_ranks, local)
    out_send_start = exclusive_cumsum(my_counts, 0).reshape(num_ranks, local)

    if exchange == "all_gather":
        counts = lax.all_gather(my_counts, axis_name)  # [P_src, E]: every rank's row
        window_size_all = counts.sum(axis=0).reshape(num_ranks, local)  # [P_dst, El]
        window_start_all = exclusive_cumsum(window_size_all, 1)
        before = exclusive_cumsum(counts, 0)  # [P_src, E]: rows of earlier sources
        out_virtual_start = window_start_all + before[me].reshape(num_ranks, local)
        mine = lax.dynamic_slice_in_dim(counts, me * local, local, axis=1)  # [P_src, El]
        in_counts = mine
        in_send_start = lax.dynamic_slice_in_dim(exclusive_cumsum(counts, 1), me * local,
                                                 local, axis=1)
        window_size = window_size_all[me]
        window_start = window_start_all[me]
        in_virtual_start = window_start[None] + exclusive_cumsum(mine, 0)
        num_rounds = _rounds(window_size_all.sum(axis=1).max(), rows_per_round)
    else:
        meta = jnp.concatenate([out_counts, out_send_start], axis=1)  # [P_dst, 2*El]
        meta = lax.all_to_all(meta, axis_name, 0, 0, tiled=True)  # [P_src, 2*El]
        in_counts, in_send_start = meta[:, :local], meta[:, local:]
        window_size = in_counts.sum(axis=0)
        window_start = exclusive_cumsum(window_size, 0)
        in_virtual_start = window_start[None] + exclusive_cumsum(in_counts, 0)
        out_virtual_start = lax.all_to_all(in_virtual_start, axis_name, 0, 0, tiled=True)
        # independent of the offsets' exchange: the two can be in flight together
        num_rounds = lax.pmax(_rounds(window_size.sum(), rows_per_round), axis_name)

    most = num_ranks * n if max_rows is None else max_rows
    max_rounds = max(1, -(-most // rows_per_round))
    flat = [a.reshape(-1) for a in (out_counts, out_send_start, out_virtual_start, in_counts,
                                    in_send_start, in_virtual_start)]
    return Plan(
        order=order, slot=slot, out_counts=flat[0], out_send_start=flat[1],
        out_virtual_start=flat[2], in_counts=flat[3], in_send_start=flat[4],
        in_virtual_start=flat[5], window_start=window_start, window_size=window_size,
        num_rounds=num_rounds, rows_per_round=rows_per_round, max_rounds=max_rounds,
    )


def round_segments(plan: Plan, round_index: jax.Array | int) -> RoundSegments:
    """Clips this rank's segments and windows to round ``round_index``."""
    lo = jnp.asarray(round_index, _I32) * plan.rows_per_round
    hi = lo + plan.rows_per_round

    def clip(virtual_start, counts, send_start):
        a = jnp.clip(virtual_start, lo, hi)
        sizes = jnp.clip(virtual_start + counts, lo, hi) - a
        return send_start + (a - virtual_start), sizes, a - lo

    send_offsets, send_sizes, dest_offsets = clip(plan.out_virtual_start, plan.out_counts,
                                                  plan.out_send_start)
    source_offsets, recv_sizes, recv_offsets = clip(plan.in_virtual_start, plan.in_counts,
                                                    plan.in_send_start)
    w_lo = jnp.clip(plan.window_start, lo, hi)
    w_hi = jnp.clip(plan.window_start + plan.window_size, lo, hi)
    return RoundSegments(
        send_offsets=send_offsets, send_sizes=send_sizes, dest_offsets=dest_offsets,
        recv_offsets=recv_offsets, recv_sizes=recv_sizes, source_offsets=source_offsets,
        group_sizes=w_hi - w_lo,
    )
