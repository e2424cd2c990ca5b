"""Relay-free dispatch and combine as TPU remote writes (Pallas): the paper's mechanism itself.

The XLA form (:mod:`moe_relayfree.prefill`) moves copies with ``ragged_all_to_all``, which
wants one contiguous send buffer: every round gathers ``x[order // k]`` into ``[T*k, d]`` first
(a relay), and its results land in a zero-filled buffer. Here no copy is staged:

1. **plan** (plain JAX, ints only, :func:`moe_relayfree.plan.make_plan`): counts exchanged,
   every copy's virtual row in its receiver's expert-major buffer (windows in local-expert
   order, sources in rank order inside a window, copies in (token, choice) order inside a
   source), rounds of ``R`` rows under skew.
2. **dispatch kernel**: one remote DMA per copy, from the token's row ``x[t]`` in HBM straight
   into row ``row[j]`` of the receiver's window buffer (the same buffer on every chip: TPU's
   symmetric memory). A barrier semaphore first (every chip has entered the kernel, so its
   window buffer exists), then the copies, then the only synchronisation: the sender waits
   until its copies' bytes have left, the receiver until the bytes of the rows it expects
   (from the counts) have arrived. DMA semaphores count bytes, so one wait covers many rows.
3. **experts** on the windows in the DMAs' row layout, written over them
   (:mod:`moe_relayfree.pallas_experts`: a Pallas grouped SwiGLU kernel; XLA's grouped GEMM
   would relay the window to ``[R, d]`` and back, each a window-sized temporary).
4. **combine kernel**: each receiver pushes each (source, local expert) segment of its results
   (contiguous in its window) into the source's returned buffer at the rows the copies hold in
   the source's expert order: ``P * El`` DMAs (the per-row alternative pushes ``T*k`` rows and
   needs a ``(source, row)`` table per received row, shipped by the dispatch: three times the
   descriptors, measured in ``docs/design.md``). Then the weighted sum over ``k``, reading only
   this round's rows (no buffer is zero-filled: rows no copy wrote are masked, not read).

The kernels themselves are in :mod:`moe_relayfree.pallas_kernels`; this module plans their
tables and runs the rounds and passes.

Why it is exact: a row is written by exactly one DMA (virtual rows are a bijection onto the
copies, clipped per round), a kernel returns only after every byte it expects has arrived
(the counts say how many), and the next kernel that touches a buffer starts after this one
returned on every chip (its own barrier).

Where it runs: compiled by Mosaic for TPU; on CPU it runs in Pallas's TPU interpret mode
(``pltpu.InterpretParams``), which executes the DMAs and semaphores over emulated devices, so
the tests check it bit for bit; elsewhere it is refused. The interpreter adds a global barrier
at every kernel's end, so a missing entry barrier cannot be caught on CPU. Call inside
``shard_map``: a chip is addressed by its coordinates on every mesh axis, its peers are the
chips of its expert-parallel group (the same coordinates on the other axes: data replicas and
tensor ranks run their own groups side by side).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import tpu as pltpu

from moe_relayfree.collectives import ensure_varying
from moe_relayfree.pallas_experts import interpret_params, window_rows
from moe_relayfree.pallas_kernels import (_call, _combine_kernel, _dispatch_kernel, copy_table,
                                          mesh_axes)
from moe_relayfree.plan import Plan, make_plan, round_segments
from moe_relayfree.routing import poison_rows, screen_choices
from moe_relayfree.windows import ExpertWindows, weighted_row_sum

_I32 = jnp.int32
_F32 = jnp.float32


def row_layout(d: int, dtype) -> tuple[int, int]:
    """How a ``d``-wide row is laid out for Mosaic's DMAs: ``(sublanes, lanes)`` with rows on
    a leading untiled dim (a DMA of one row of a tiled ``[n, d]`` buffer is refused), 32 bits
    per sublane (bf16 ``[n, 2, d/2]``: ``[n, 1, d]`` compiles but pads each row to 2 sublanes)."""
    pack = 4 // jnp.dtype(dtype).itemsize
    if pack > 1 and d % (128 * pack) == 0:
        return pack, d // pack
    return 1, d


def copy_targets(plan: Plan, ids: jax.Array, num_experts: int, round_index) -> tuple:
    """Per copy ``j = t*k + c``: its receiver ``dst [T*k] int32`` and its row in the
    receiver's window buffer this round ``row [T*k] int32`` (-1: not in this round, or no
    expert). ``ids [T, k]`` screened (``E``: no copy)."""
    flat = ids.reshape(-1).astype(_I32)
    local = num_experts // plan.num_ranks
    sent = flat < num_experts
    e = jnp.where(sent, flat, 0)
    virtual = plan.out_virtual_start[e] + plan.slot - plan.out_send_start[e]
    row = virtual - jnp.asarray(round_index, _I32) * plan.rows_per_round
    inside = sent & (row >= 0) & (row < plan.rows_per_round)
    return e // local, jnp.where(inside, row, -1)


def dispatch_round(x_rows: jax.Array, plan: Plan, ids: jax.Array, num_experts: int, k: int,
                   round_index, axis_name: str,
                   platform: str | None = None) -> tuple[jax.Array, jax.Array]:
    """One round's copies written into the receivers' windows. x_rows ``[T, s, d/s]`` (the
    tokens in :func:`row_layout`) -> (a fresh, unfilled window buffer ``[R, s, d/s]`` with
    this round's copies in it, group_sizes ``[El]``); ``R`` rounded up to the expert kernel's
    row block (:func:`~moe_relayfree.pallas_experts.window_rows`)."""
    seg = round_segments(plan, round_index)
    dst, row = copy_targets(plan, ids, num_experts, round_index)
    target, chunk = copy_table(dst, row, plan.num_ranks, plan.rows_per_round)
    counts = jnp.stack([seg.send_sizes.sum(), seg.recv_sizes.sum()]).astype(_I32)
    kernel = functools.partial(_dispatch_kernel, k=k, num_ranks=plan.num_ranks,
                               axes=mesh_axes(axis_name), axis_name=axis_name)
    window = _call(kernel, (counts,), (target, x_rows),
                   (window_rows(plan.rows_per_round),) + x_rows.shape[1:], 0, platform,
                   scratch=(pltpu.SMEM((chunk,), _I32), pltpu.SemaphoreType.DMA))
    return window, seg.group_sizes


# Rows of the returned buffer a combine pass fills, at least: a source's copies come back in
# passes of max(T, PASS_ROWS) rows (one pass while T*k is no more), so the returned buffer
# is [T, d] where it would be [T*k, d], and each pass's barrier is amortised over at least
# this many rows. DeepSeek-V3 on 64 chips, temporaries against the XLA path's at T=128:
# 53.9 MiB (0.94x) with 8 passes, 64.4 (1.12x) with 2 (PASS_ROWS = 512) or 1. Below T=16
# the floor decides the passes: one pass of T*k rows was above the XLA path (T=8: 4.98 MiB
# against 4.76; T=4 on 256 chips: 3.73 against 2.92), 16 rows is not at any T measured
# (4.04 and 2.67), for more barriers: 2 / 4 / 8 passes at T = 4 / 8 / 16 where 64 rows gave
# 1 / 1 / 2 (docs/benchmarks.md).
PASS_ROWS = 16


def pass_rows(tokens: int, k: int) -> int:
    """Returned rows per combine pass: ``min(T*k, max(T, PASS_ROWS))``."""
    return max(1, min(tokens * k, max(tokens, PASS_ROWS)))


def _clip_to_pass(start: jax.Array, sizes: jax.Array, lo, rows: int) -> tuple:
    """Segments ``[start, start + sizes)`` of a source's send order clipped to the pass
    ``[lo, lo + rows)`` -> (how far each moved in, its rows)."""
    a = jnp.clip(start, lo, lo + rows)
    return a - start, jnp.clip(start + sizes, lo, lo + rows) - a


def combine_round(out_rows: jax.Array, plan: Plan, round_index, axis_name: str,
                  platform: str | None = None, pass_index=0,
                  rows: int | None = None) -> jax.Array:
    """One pass of one round's results pushed back, one DMA per (source, local expert)
    segment, into each source's returned buffer ``[rows, s, d/s]`` (fresh and unfilled; row
    ``i`` holds the copy at position ``pass_index * rows + i`` of the source's expert order,
    written only where that copy is in this round). ``rows``: default ``T*k``, one pass."""
    seg = round_segments(plan, round_index)
    if rows is None or rows >= plan.order.shape[0]:  # one pass: the segments as they are
        rows = plan.order.shape[0]
        tables = (seg.recv_offsets, seg.recv_sizes, seg.source_offsets,
                  jnp.stack([seg.recv_sizes.sum(), seg.send_sizes.sum()]))
    else:
        lo = jnp.asarray(pass_index, _I32) * rows
        shift, sizes = _clip_to_pass(seg.source_offsets, seg.recv_sizes, lo, rows)
        _, mine = _clip_to_pass(seg.send_offsets, seg.send_sizes, lo, rows)
        tables = (seg.recv_offsets + shift, sizes, seg.source_offsets + shift - lo,
                  jnp.stack([sizes.sum(), mine.sum()]))
    local = plan.window_size.shape[0]
    kernel = functools.partial(_combine_kernel, local=local, num_ranks=plan.num_ranks,
                               axes=mesh_axes(axis_name), axis_name=axis_name)
    return _call(kernel, tuple(a.astype(_I32) for a in tables), (out_rows,),
                 (rows,) + out_rows.shape[1:], 1, platform)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RemoteHandle:
    """What a round's combine needs: the plan, the screened ids ``[T, k]`` (``E``: no copy),
    weights ``[T, k] f32``, invalid ``[T] bool`` tokens (NaN rows), x ``[T, d]``."""

    plan: Plan
    ids: jax.Array
    weights: jax.Array
    invalid: jax.Array
    x: jax.Array
    num_experts: int = dataclasses.field(metadata=dict(static=True))
    axis_name: str = dataclasses.field(metadata=dict(static=True))
    platform: str | None = dataclasses.field(default=None, metadata=dict(static=True))


def plan_copies(x, topk_ids, topk_weights, *, num_experts: int, axis_name: str,
                rows_per_round: int, platform: str | None = None) -> RemoteHandle:
    """Step 1: topk_ids ``[T, k] int32`` in ``[0, E)`` or -1 (no expert; any other id: NaN in
    that token's row, :func:`~moe_relayfree.routing.screen_choices`); ``platform``: what the
    kernels are lowered for (:func:`interpret_params`)."""
    ids, weights, invalid = screen_choices(topk_ids, topk_weights, num_experts)
    plan = make_plan(ids, num_experts, axis_name, rows_per_round)
    return RemoteHandle(plan, ids, weights.astype(_F32), invalid, x, num_experts, axis_name,
                        platform)


def dispatch(h: RemoteHandle, round_index=0) -> ExpertWindows:
    """Step 2 of round ``round_index``: the windows and their sizes, rows as the DMAs left
    them, ``[R, s, d/s]`` (:func:`row_layout`; ``rows.reshape(R, d)`` is the plain form)."""
    t, d = h.x.shape
    sub, lanes = row_layout(d, h.x.dtype)
    window, sizes = dispatch_round(h.x.reshape(t, sub, lanes), h.plan, h.ids, h.num_experts,
                                   h.ids.shape[1], round_index, h.axis_name, h.platform)
    return ExpertWindows(window, sizes, h.ids.size)


def combine(out: jax.Array, h: RemoteHandle, round_index=0, into=None,
            rows: int | None = None) -> jax.Array:
    """Step 4 of round ``round_index``: ``out [R, s, d/s]`` (or ``[R, d]``) pushed back in
    passes of ``rows`` returned rows (default :func:`pass_rows`), each pass's copies weighted
    and summed -> ``[T, d]`` f32 added to ``into``. (One pass sums a token's choices in
    choice order, as the XLA path does; more passes add them pass by pass.)"""
    t, d = h.x.shape
    k = h.ids.shape[1]
    sub, lanes = row_layout(d, h.x.dtype)
    rows = pass_rows(t, k) if rows is None else rows
    out = out.astype(h.x.dtype).reshape(-1, sub, lanes)
    # this round's copies only: the rest of a returned buffer holds nothing at all (it is
    # never zero-filled)
    _, row = copy_targets(h.plan, h.ids, h.num_experts, round_index)
    slot = h.plan.slot.reshape(t, k)
    this_round = (row >= 0).reshape(t, k)

    if rows >= t * k:  # one pass: every slot is a row of the returned buffer
        returned = combine_round(out, h.plan, round_index, h.axis_name, h.platform)
        return weighted_row_sum(returned, slot, h.weights, valid=this_round, into=into)

    def one_pass(p, y):
        returned = combine_round(out, h.plan, round_index, h.axis_name, h.platform, p, rows)
        index = slot - p * rows
        valid = this_round & (index >= 0) & (index < rows)
        return weighted_row_sum(returned, jnp.clip(index, 0, rows - 1), h.weights,
                                valid=valid, into=y)

    passes = -(-t * k // rows)
    y = ensure_varying(jnp.zeros((t, d), _F32), h.axis_name, h.x) if into is None else into
    return lax.fori_loop(0, passes, one_pass, y)


def pallas_prefill_moe(x: jax.Array, topk_ids: jax.Array, topk_weights: jax.Array, expert_fn,
                       *, num_experts: int, axis_name: str, rows_per_round: int,
                       platform: str | None = None,
                       combine_rows: int | None = None) -> jax.Array:
    """The prefill schedule with remote writes: x ``[T, d]``, topk_ids ``[T, k] int32`` in
    ``[0, E)`` or -1, topk_weights ``[T, k]``, ``expert_fn(ExpertWindows) -> [R, s, d/s]``
    (the windows' rows as :func:`dispatch` gives them; ``[R, d]`` also taken) ->
    ``[T, d]`` in x's dtype. Call inside ``shard_map``, the expert axis ``axis_name``
    (with any other axes: each group of chips along it is one expert-parallel group).
    ``combine_rows``: returned rows per combine pass (default :func:`pass_rows`)."""
    h = plan_copies(x, topk_ids, topk_weights, num_experts=num_experts, axis_name=axis_name,
                    rows_per_round=rows_per_round, platform=platform)

    def one_round(j, y):
        # fresh, unfilled window and returned buffers: the round's temporaries, which XLA
        # reuses from one iteration to the next
        return combine(expert_fn(dispatch(h, j)), h, j, into=y, rows=combine_rows)

    y = ensure_varying(jnp.zeros(x.shape, _F32), axis_name, x)
    # Every round, the first included, is one body of the loop (rounds past the first only
    # under skew: every chip sees the same num_rounds). Round 0 apart from the loop made
    # XLA:TPU hold a second copy of the round's buffers (temp 122 MiB against the XLA path's
    # 57 MiB at DeepSeek-V3's T=128), and buffers carried through the loop to be written in
    # place took more (149 MiB: a zero fill, and copies around the conditional).
    y = lax.fori_loop(0, h.plan.max_rounds,
                      lambda j, y: lax.cond(j < h.plan.num_rounds, lambda y: one_round(j, y),
                                            lambda y: y, y), y)
    return poison_rows(y, h.invalid).astype(x.dtype)


__all__ = ["PASS_ROWS", "RemoteHandle", "combine", "combine_round", "copy_targets", "dispatch",
           "dispatch_round", "interpret_params", "pallas_prefill_moe", "pass_rows", "plan_copies",
           "row_layout"]
