"""Relay-free decode as TPU remote writes, with each sender's counts after its data (Pallas):
no count exchange before the data moves.

The prefill form (:mod:`moe_relayfree.pallas_remote`) plans every copy's row in its
receiver's expert-major window, which needs every chip's counts first (one ``all_gather``, a
collective every chip waits on before any row moves). At decode a step is a few rows per chip
and that round trip is a large share of the layer. Here a sender needs nothing from the
others, as DeepEP's low-latency kernels and Ascend's MC2 do it:

1. **fixed regions**: each receiver's landing buffer has one region of ``C`` rows per source
   (``[P][C]``, :func:`source_slots`); a sender sorts its copies by global expert (so per
   receiver by local expert, then token and choice), and the copy at position ``p`` of its
   list for receiver ``r`` goes to row ``me*C + p - q*C`` of ``r``'s landing buffer in round
   ``q``. Purely local arithmetic.
2. **dispatch kernel**: a barrier, one remote DMA per copy from ``x[t]``, then the counts: one
   small DMA per receiver of this sender's row ``[counts per local expert, total to that
   receiver, its largest total to any receiver]`` into the receiver's ``[P, W]`` count table,
   on semaphores of their own. A receiver waits for the fixed bytes of ``P`` count rows,
   reads them (HBM -> SMEM), and then waits for exactly the rows they announce on the data
   semaphore. DMA semaphores count bytes, so the data and count DMAs need no ordering.
3. **rounds**: every chip receives every sender's largest total, so every chip computes the
   same number of rounds from its own count table (no ``pmax``). Rounds past the first run
   only under skew; nothing is dropped.
4. **compaction**: the landing buffer is source-major, the expert kernel wants expert-major
   windows (run on source-major segments it would stream each expert's weights once per
   source). One local gather of the received rows lays them out; the price of learning the
   counts after the data, paid in HBM bandwidth on the receiver (DeepEP's ``packed_recv_x``
   and MC2's ``expand_x`` are the same step).
5. **combine**: :mod:`moe_relayfree.pallas_remote`'s kernel, one DMA per (source, local
   expert) segment back into the source's ``[P][C]`` returned buffer (where the source knows
   each copy's row: its own position), then the weighted sum over ``k``.

What it saves against the prefill form, per layer: the counts ``all_gather`` (``P*E`` int32
arriving on each chip) and the dependency of every DMA on it. What it costs: the compaction
gather, and a landing buffer of ``P*C`` rows where fixed regions need headroom per pair of
chips (the total over a receiver varies less than each source's part of it).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from moe_relayfree.collectives import ensure_varying
from moe_relayfree.pallas_experts import interpret_params, window_rows
from moe_relayfree import pallas_kernels as kernels
from moe_relayfree import pallas_remote as remote
from moe_relayfree.pallas_kernels import (_I32, _MESH, _barrier, _call, _chip, _combine_kernel,
                                          _issue_copies, copy_table, mesh_axes)
from moe_relayfree.pallas_remote import row_layout
from moe_relayfree.plan import sort_copies
from moe_relayfree.routing import poison_rows, screen_choices
from moe_relayfree.windows import ExpertWindows, exclusive_cumsum, take_rows, weighted_row_sum

_F32 = jnp.float32


# A second round under uniform routing: in at most this share of layer calls (every one of the
# P*P (source, receiver) pairs counted as if it overflowed on its own: an upper bound).
SECOND_ROUND = 1e-4


def source_slots(tokens: int, k: int, num_ranks: int, num_local: int, rows: int,
                 second_round: float = SECOND_ROUND) -> int:
    """Rows ``C`` of each source's region in a receiver's landing buffer: at least ``rows /
    P`` (the receive rows the capacity factor sets, shared out), and enough that under
    uniform routing (a source's ``T*k`` copies each to receiver ``r`` with chance ``1/P``:
    binomial) any of the ``P*P`` pairs sends more in at most ``second_round`` of the calls;
    at most ``T*min(k, El)`` (a token's distinct experts on one chip; repeated choices, which
    a router does not make, take another round). A pair that sends more takes another round:
    nothing is dropped.

    Fixed regions need more headroom than one buffer per receiver: each pair's count varies
    more, relative to its mean, than a receiver's total (DeepSeek-V3 on 64 chips: ``C = 10``
    at ``T = 8``, 640 landing rows against the 128 of ``2*T*k``; ``C = 42`` at ``T = 128``,
    2688 against 2048)."""
    n = tokens * k
    if num_ranks == 1:
        return n  # every copy to this chip
    p = 1.0 / num_ranks
    log = [math.lgamma(n + 1) - math.lgamma(c + 1) - math.lgamma(n - c + 1)
           + c * math.log(p) + (n - c) * math.log1p(-p) for c in range(n + 1)]
    tail, c = 0.0, n  # tail: the chance a pair sends more than c
    while c > 0 and tail + math.exp(log[c]) <= second_round / num_ranks**2:
        tail += math.exp(log[c])
        c -= 1
    return max(1, min(tokens * min(k, num_local), max(c, -(-rows // num_ranks))))


def count_width(num_local: int) -> int:
    """Ints in one count row: ``El`` counts, the total, the sender's largest total; padded
    to a multiple of 128 (Mosaic slices a 1-D int32 HBM buffer only at whole 128-int tiles;
    tpu-inference pads its per-device expert counts the same way): 512 B per (sender,
    receiver) pair, 128 KiB per chip at ``P = 256``."""
    return -(-(num_local + 2) // 128) * 128


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeCopies:
    """A sender's own view, computed locally (all int32): per flat copy ``j = t*k + c`` its
    receiver ``dst [T*k]`` and position in its list for that receiver ``pos [T*k]`` (-1: no
    expert); its count rows ``counts [P*W]`` (row ``r``: copies to each of ``r``'s local
    experts, their total, this sender's largest total); and ``slots`` ``C`` (static)."""

    dst: jax.Array
    pos: jax.Array
    counts: jax.Array
    slots: int = dataclasses.field(metadata=dict(static=True))


def sender_copies(ids: jax.Array, num_experts: int, num_ranks: int, slots: int) -> DecodeCopies:
    """ids ``[T, k] int32`` screened (``E``: no copy) -> :class:`DecodeCopies`."""
    local = num_experts // num_ranks
    _, slot, counts = sort_copies(ids, num_experts)
    per_rank = counts.reshape(num_ranks, local)
    totals = per_rank.sum(1)
    flat = ids.reshape(-1)
    sent = flat < num_experts
    dst = jnp.where(sent, flat, 0) // local
    pos = jnp.where(sent, slot - exclusive_cumsum(totals, 0)[dst], -1)
    width = count_width(local)
    rows = jnp.zeros((num_ranks, width), _I32).at[:, :local].set(per_rank)
    rows = rows.at[:, local].set(totals).at[:, local + 1].set(totals.max())
    return DecodeCopies(dst.astype(_I32), pos.astype(_I32), rows.reshape(-1), slots)


def round_rows(copies: DecodeCopies, round_index) -> tuple[jax.Array, jax.Array]:
    """Per copy, its row in its source's region of the receiver's landing buffer in round
    ``round_index``, and whether it goes in that round: ``([T*k] int32, [T*k] bool)``."""
    row = copies.pos - jnp.asarray(round_index, _I32) * copies.slots
    return row, (copies.pos >= 0) & (row >= 0) & (row < copies.slots)


def _dispatch_kernel(meta_ref, target_hbm, counts_hbm, x_ref, win_ref, cin_ref, table,
                     table_sem, count_table, send_sem, recv_sem, count_send, count_recv, *,
                     k: int, num_ranks: int, slots: int, width: int, local: int,
                     axes: tuple[str, ...], axis_name: str):
    _barrier(num_ranks, axes, axis_name)
    me = lax.axis_index(axis_name)
    mine = meta_ref[2]  # this chip's row of every count table: me * width
    _issue_copies(target_hbm, x_ref, win_ref, table, table_sem, send_sem, recv_sem, k=k,
                  num_ranks=num_ranks, axes=axes, axis_name=axis_name)

    # after the data: this sender's count row to each receiver, at its own row there
    def announce(r, carry):
        pltpu.make_async_remote_copy(counts_hbm.at[pl.ds(pl.multiple_of(r * width, 128),
                                                         width)],
                                     cin_ref.at[pl.ds(pl.multiple_of(mine, 128), width)],
                                     count_send,
                                     count_recv, device_id=_chip(r, axes, axis_name),
                                     device_id_type=_MESH).start()
        return carry

    lax.fori_loop(0, num_ranks, announce, 0)
    rows = win_ref.shape[0]
    kernels._wait_rows(win_ref, meta_ref[0], rows, send_sem, recv_sem, axes, axis_name, send=True)
    # the count rows' bytes, fixed: every sender sends one to every receiver
    table_desc = pltpu.make_async_remote_copy(cin_ref, cin_ref, count_send, count_recv,
                                              device_id=_chip(me, axes, axis_name),
                                              device_id_type=_MESH)
    table_desc.wait_send()
    table_desc.wait_recv()
    read = pltpu.make_async_copy(cin_ref, count_table, table_sem)
    read.start()
    read.wait()
    first = meta_ref[1] * slots  # this round's first position in each sender's list

    def expected(s, n):
        return n + jnp.clip(count_table[s * width + local] - first, 0, slots)

    n = lax.fori_loop(0, num_ranks, expected, jnp.int32(0))
    kernels._wait_rows(win_ref, n, rows, send_sem, recv_sem, axes, axis_name, send=False)


def dispatch_round(x_rows: jax.Array, copies: DecodeCopies, k: int, num_local: int,
                   round_index, axis_name: str,
                   platform: str | None = None) -> tuple[jax.Array, jax.Array]:
    """One round: x_rows ``[T, s, d/s]`` -> (landing ``[P*C, s, d/s]``, fresh and unfilled, row
    ``src*C + i`` the ``i``-th copy of source ``src`` this round; count table ``[P*W]
    int32``, row ``src``: that source's count row to this chip)."""
    width = count_width(num_local)
    num_ranks = copies.counts.shape[0] // width
    c = copies.slots
    row, inside = round_rows(copies, round_index)
    me = lax.axis_index(axis_name)
    target, chunk = copy_table(copies.dst, jnp.where(inside, me * c + row, -1), num_ranks,
                               num_ranks * c)
    meta = jnp.stack([inside.sum(), jnp.asarray(round_index, _I32), me * width]).astype(_I32)
    kernel = functools.partial(_dispatch_kernel, k=k, num_ranks=num_ranks, slots=c,
                               width=width, local=num_local, axes=mesh_axes(axis_name),
                               axis_name=axis_name)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    vma = jax.typeof(x_rows).manual_axis_type
    landing, table = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((num_ranks * c,) + x_rows.shape[1:], x_rows.dtype,
                                        manual_axis_type=vma),
                   jax.ShapeDtypeStruct((num_ranks * width,), _I32, manual_axis_type=vma)),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(1,), in_specs=[any_spec] * 3,
            out_specs=(any_spec, any_spec),
            scratch_shapes=[pltpu.SMEM((chunk,), _I32), pltpu.SemaphoreType.DMA,
                            pltpu.SMEM((num_ranks * width,), _I32)]
            + [pltpu.SemaphoreType.DMA] * 4),
        compiler_params=pltpu.CompilerParams(collective_id=0),
        interpret=interpret_params(platform),
    )(meta, target, ensure_varying(copies.counts, axis_name, x_rows), x_rows)
    return landing, table


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ReceivedSegments:
    """A receiver's segments of one round, from its count table (all int32; ``[P, El]``
    indexed by (source, local expert)): where each starts in its source's region
    (``start``), its rows (``size``), where it goes in the expert-major windows
    (``window_start``); ``group_sizes [El]``; ``rounds []`` the rounds every chip runs."""

    start: jax.Array
    size: jax.Array
    window_start: jax.Array
    group_sizes: jax.Array
    rounds: jax.Array

    @classmethod
    def from_table(cls, table: jax.Array, num_local: int, slots: int,
                   round_index) -> ReceivedSegments:
        """From the count table ``[P*W] int32`` of :func:`dispatch_round`."""
        num_ranks = table.shape[0] // count_width(num_local)
        rows = table.reshape(num_ranks, -1)
        counts = rows[:, :num_local]
        begin = exclusive_cumsum(counts, 1) - jnp.asarray(round_index, _I32) * slots
        start = jnp.clip(begin, 0, slots)
        size = jnp.clip(begin + counts, 0, slots) - start
        window_start = exclusive_cumsum(size.T.reshape(-1), 0).reshape(num_local, num_ranks).T
        rounds = jnp.maximum(1, -(-rows[:, num_local + 1].max() // slots))
        return cls(start, size, window_start, size.sum(0), rounds)


def compact(landing: jax.Array, seg: ReceivedSegments) -> jax.Array:
    """The landing buffer ``[P*C, ...]`` (source-major) laid out expert-major: window ``l``
    holds its rows of source 0, then source 1, ... -> ``[window_rows(P*C), ...]`` (rows past
    the windows hold some received row)."""
    num_ranks, local = seg.size.shape
    slots = landing.shape[0] // num_ranks
    c = jnp.arange(slots, dtype=_I32)[None, :, None]  # [1, C, 1] against [P, 1, El]
    inside = (c >= seg.start[:, None]) & (c < (seg.start + seg.size)[:, None])
    dest = jnp.where(inside, seg.window_start[:, None] - seg.start[:, None] + c, 0).sum(-1)
    out = window_rows(landing.shape[0])
    dest = jnp.where(inside.any(-1), dest, out).reshape(-1)
    index = jnp.zeros((out,), _I32).at[dest].set(jnp.arange(dest.shape[0], dtype=_I32),
                                                  mode="drop")
    return take_rows(landing, index)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeHandle:
    """What a round's combine needs: the sender's copies, the segments it received this
    round, the landing buffer ``[P*C, s, d/s]`` (read by the compaction, then the returned
    rows' buffer), weights ``[T, k] f32`` (0 for no expert), invalid ``[T] bool`` tokens, x
    ``[T, d]`` (its dtype and row layout) and the round."""

    copies: DecodeCopies
    segments: ReceivedSegments
    landing: jax.Array
    weights: jax.Array
    invalid: jax.Array
    x: jax.Array
    round_index: jax.Array
    num_local: int = dataclasses.field(metadata=dict(static=True))
    axis_name: str = dataclasses.field(metadata=dict(static=True))
    platform: str | None = dataclasses.field(default=None, metadata=dict(static=True))


def dispatch(x: jax.Array, topk_ids: jax.Array, topk_weights: jax.Array, *, num_experts: int,
             axis_name: str, rows: int, round_index=0, copies: DecodeCopies | None = None,
             platform: str | None = None) -> tuple[ExpertWindows, DecodeHandle]:
    """Round ``round_index``: x ``[T, d]``, topk_ids ``[T, k] int32`` in ``[0, E)`` or -1,
    topk_weights ``[T, k]``; ``rows``: the receive rows the capacity factor sets
    (:func:`source_slots`) -> (expert-major :class:`ExpertWindows`, rows ``[R, s, d/s]`` in
    :func:`~moe_relayfree.pallas_remote.row_layout`; the handle)."""
    t, d = x.shape
    k = topk_ids.shape[1]
    ids, weights, invalid = screen_choices(topk_ids, topk_weights, num_experts)
    num_ranks = lax.axis_size(axis_name)
    local = num_experts // num_ranks
    if copies is None:
        copies = sender_copies(ids, num_experts, num_ranks,
                               source_slots(t, k, num_ranks, local, rows))
    sub, lanes = row_layout(d, x.dtype)
    round_index = jnp.asarray(round_index, _I32)
    landing, table = dispatch_round(x.reshape(t, sub, lanes), copies, k, local, round_index,
                                    axis_name, platform)
    seg = ReceivedSegments.from_table(table, local, copies.slots, round_index)
    handle = DecodeHandle(copies, seg, landing, weights.astype(_F32), invalid, x,
                          round_index, local, axis_name, platform)
    return ExpertWindows(compact(landing, seg), seg.group_sizes, t * k), handle


def _combine_round(out_rows: jax.Array, h: DecodeHandle, sent: jax.Array) -> jax.Array:
    """Each (source, local expert) segment of this chip's results pushed back into its
    source's returned buffer ``[P*C, s, d/s]`` at the source's own positions (``sent``: the
    rows this chip sent this round, which come back to it). The returned buffer is the
    landing buffer, dead once compacted: the same shape, and its rows were read before this
    chip entered the combine kernel (whose barrier every writer passes)."""
    c = h.copies.slots
    seg = h.segments
    num_ranks = seg.size.shape[0]
    me = lax.axis_index(h.axis_name)
    n = jnp.stack([seg.size.sum(), sent]).astype(_I32)
    kernel = functools.partial(_combine_kernel, local=h.num_local, num_ranks=num_ranks,
                               axes=mesh_axes(h.axis_name), axis_name=h.axis_name)
    tables = (seg.window_start.reshape(-1), seg.size.reshape(-1),
              (me * c + seg.start).reshape(-1), n)
    return _call(kernel, tuple(a.astype(_I32) for a in tables), (out_rows,),
                 (num_ranks * c,) + out_rows.shape[1:], 1, h.platform,
                 reuse=h.landing.reshape((num_ranks * c,) + out_rows.shape[1:]))


def combine(out: jax.Array, h: DecodeHandle, into=None) -> jax.Array:
    """``out [R, s, d/s]`` (or ``[R, d]``): the experts' results on the windows of
    :func:`dispatch`, pushed back; this round's copies weighted and summed -> ``[T, d]`` f32
    added to ``into``."""
    t, d = h.x.shape
    k = h.weights.shape[1]
    sub, lanes = row_layout(d, h.x.dtype)
    row, valid = round_rows(h.copies, h.round_index)
    returned = _combine_round(out.astype(h.x.dtype).reshape(-1, sub, lanes), h, valid.sum())
    index = jnp.where(valid, h.copies.dst * h.copies.slots + row, 0)
    return weighted_row_sum(returned, index.reshape(t, k), h.weights,
                            valid=valid.reshape(t, k), into=into)


def pallas_decode_moe(x: jax.Array, topk_ids: jax.Array, topk_weights: jax.Array, expert_fn,
                      *, num_experts: int, axis_name: str, rows: int,
                      platform: str | None = None, slots: int | None = None) -> jax.Array:
    """The decode schedule with remote writes and counts after the data: x ``[T, d]``,
    topk_ids ``[T, k] int32`` in ``[0, E)`` or -1, topk_weights ``[T, k]``,
    ``expert_fn(ExpertWindows) -> [R, s, d/s]`` (or ``[R, d]``) -> ``[T, d]`` in x's dtype.
    Call inside ``shard_map`` over the expert axis ``axis_name`` (other mesh axes: groups side
    by side, as :func:`~moe_relayfree.pallas_remote.pallas_prefill_moe`). ``slots``: each
    source's region ``C`` (default :func:`source_slots` of ``rows``)."""
    t, k = topk_ids.shape
    ids, _, invalid = screen_choices(topk_ids, topk_weights, num_experts)
    num_ranks = lax.axis_size(axis_name)
    slots = slots or source_slots(t, k, num_ranks, num_experts // num_ranks, rows)
    copies = sender_copies(ids, num_experts, num_ranks, slots)

    def one_round(j, y):
        windows, h = dispatch(x, topk_ids, topk_weights, num_experts=num_experts,
                              axis_name=axis_name, rows=rows, round_index=j, copies=copies,
                              platform=platform)
        return combine(expert_fn(windows), h, into=y), h.segments.rounds

    def body(j, carry):
        y, rounds = carry
        # round 0 always runs and tells every chip the same number of rounds (each chip got
        # every sender's largest total); the rest run only under skew
        return lax.cond(j < rounds, lambda: one_round(j, y), lambda: (y, rounds))

    y = ensure_varying(jnp.zeros(x.shape, _F32), axis_name, x)
    max_rounds = -(-t * k // copies.slots)
    y, _ = lax.fori_loop(0, max_rounds, body, (y, ensure_varying(jnp.int32(1), axis_name, x)))
    return poison_rows(y, invalid).astype(x.dtype)


__all__ = ["DecodeCopies", "DecodeHandle", "ReceivedSegments", "combine", "compact",
           "count_width", "dispatch", "dispatch_round", "pallas_decode_moe", "round_rows",
           "sender_copies", "source_slots"]
