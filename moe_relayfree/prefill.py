"""Prefill schedule: planned, ragged, exact bytes (call inside ``shard_map``).

Op sequence per rank (``T`` tokens, ``k`` choices, ``R`` receive rows per round):

1. plan: sort the ``T*k`` copy ids (int32 only), count per expert, exchange the counts (one
   ``all_gather`` of ``E`` counts, or two small ``all_to_all`` s: :mod:`moe_relayfree.plan`);
   every offset below is arithmetic on this rank's ``[P, El]`` view of them.
2. per round: one gather ``x[order // k]`` -> send buffer ``[T*k, d]`` in (peer, local
   expert) order (this is also the k-fold replication).
3. ``ragged_all_to_all`` with ``P*El`` segments writes each (source, local expert)
   segment straight into that expert's window of the receiver's ``[R, d]`` buffer.
4. grouped SwiGLU on the windows (group sizes = window sizes), no receiver re-sort.
5. mirrored ``ragged_all_to_all`` writes the results back into the source's ``[T*k, d]``
   returned buffer, at the rows the copies were sent from.
6. one fused weighted gather-sum over ``k`` -> ``[T, d]``.

Rounds: one round covers every case where no rank receives more than ``R`` rows. More are
run only when the plan says so (all ranks agree on ``num_rounds``), so a skewed batch is
slower, never wrong.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from moe_relayfree.collectives import ensure_varying, peer_rows, ragged_all_to_all_bounded
from moe_relayfree.config import Lowering
from moe_relayfree.plan import Exchange, Plan, make_plan, round_segments
from moe_relayfree.routing import poison_rows, screen_choices
from moe_relayfree.windows import ExpertWindows, take_rows, weighted_row_sum

_F32 = jnp.float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PrefillHandle:
    """What the rounds and combine need: the plan, the tokens, routing weights, returned rows.

    x ``[T, d]`` (each round gathers its send rows from it: a ``[T*k, d]`` send buffer kept
    for every round would be live through the expert compute), weights ``[T, k] float32``,
    returned ``[T*k, d]`` zeros, which :func:`combine_round` fills with one round's results in
    send order (each round starts from the zeros: rows of other rounds read 0); invalid
    ``[T] bool`` tokens whose ids were out of range (their output is NaN).
    """

    plan: Plan
    x: jax.Array
    weights: jax.Array
    returned: jax.Array
    invalid: jax.Array
    axis_name: str = dataclasses.field(metadata=dict(static=True))

    @property
    def num_copies(self) -> int:
        return self.returned.shape[0]


def plan_and_pack(
    x: jax.Array,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    *,
    num_experts: int,
    axis_name: str,
    rows_per_round: int,
    exchange: Exchange = "all_gather",
    max_rows: int | None = None,
) -> PrefillHandle:
    """Step 1. x ``[T, d]``, topk_ids ``[T, k] int32`` in ``[0, E)`` or ``-1`` (no expert:
    the choice adds nothing; any other id makes that token's output NaN,
    :func:`~moe_relayfree.routing.screen_choices`), topk_weights ``[T, k]``;
    ``exchange``, ``max_rows``: see :func:`moe_relayfree.plan.make_plan`."""
    ids, w, invalid = screen_choices(topk_ids, topk_weights, num_experts)
    return pack(x, ids, w, invalid, num_experts=num_experts, axis_name=axis_name,
                rows_per_round=rows_per_round, exchange=exchange, max_rows=max_rows)


def pack(x, ids, weights, invalid, *, num_experts: int, axis_name: str, rows_per_round: int,
         exchange: Exchange = "all_gather", max_rows: int | None = None) -> PrefillHandle:
    """:func:`plan_and_pack` of screened choices: ids ``[T, k] int32`` in ``[0, E]`` (``E``:
    no copy), weights ``[T, k] f32``, invalid ``[T] bool``."""
    plan = make_plan(ids, num_experts, axis_name, rows_per_round, exchange, max_rows)
    returned = jnp.zeros((plan.order.shape[0], x.shape[1]), x.dtype)
    return PrefillHandle(
        plan=plan,
        x=x,
        weights=weights.astype(_F32),
        returned=ensure_varying(returned, axis_name, x),
        invalid=invalid,
        axis_name=axis_name,
    )


def _peer_sizes(handle: PrefillHandle) -> dict:
    """Static per-peer sizes for emulated collectives: the proven bound (a source has ``T*k``
    copies; a round delivers at most ``R`` rows to a peer) and the balanced-routing size."""
    return peer_rows(handle.num_copies, handle.plan.rows_per_round, handle.plan.num_ranks)


def round_buffer(handle: PrefillHandle) -> jax.Array:
    """A zeroed ``[R, d]`` receive buffer for :func:`dispatch_round`."""
    buf = jnp.zeros((handle.plan.rows_per_round, handle.x.shape[1]), handle.x.dtype)
    return ensure_varying(buf, handle.axis_name, handle.x)


def dispatch_round(handle: PrefillHandle, round_index: jax.Array | int = 0) -> ExpertWindows:
    """Steps 2-3: one gather builds the send buffer ``x[order // k]`` in (peer, local expert)
    order (also the k-fold replication); this round's rows land directly in the receiver's
    expert windows of a zeroed ``[R, d]`` buffer."""
    k = handle.weights.shape[1]
    seg = round_segments(handle.plan, round_index)
    # The send rows are gathered once the segments are known: otherwise XLA:TPU's scheduler
    # starts the gather early, next to the metadata collectives, and holds it longer.
    x, seg = lax.optimization_barrier((handle.x, seg))
    send = take_rows(x, handle.plan.order // k)
    rows = ragged_all_to_all_bounded(
        send,
        round_buffer(handle),
        seg.send_offsets.reshape(-1),
        seg.send_sizes.reshape(-1),
        seg.dest_offsets.reshape(-1),
        seg.recv_sizes.reshape(-1),
        axis_name=handle.axis_name,
        **_peer_sizes(handle),
    )
    # a rank receives T*k copies on average (what it sends); the round's buffer takes more
    return ExpertWindows(rows=rows, group_sizes=seg.group_sizes, expected_rows=handle.num_copies)


def combine_round(
    handle: PrefillHandle, expert_out: jax.Array, round_index: jax.Array | int = 0
) -> PrefillHandle:
    """Step 5: the mirrored segments write results into the sources' returned buffers."""
    seg = round_segments(handle.plan, round_index)
    returned = ragged_all_to_all_bounded(
        expert_out,
        handle.returned,
        seg.recv_offsets.reshape(-1),
        seg.recv_sizes.reshape(-1),
        seg.source_offsets.reshape(-1),
        seg.send_sizes.reshape(-1),
        axis_name=handle.axis_name,
        **_peer_sizes(handle),
    )
    return dataclasses.replace(handle, returned=returned)


def weighted_sum(handle: PrefillHandle, into: jax.Array | None = None) -> jax.Array:
    """Step 6: ``y[t] = into[t] + sum_j w[t, j] * returned[slot[t, j]]`` -> ``[T, d]``
    float32; a copy that was not sent (id ``E``), or not returned yet, reads a 0 row; an
    invalid token's row is NaN."""
    index = handle.plan.slot.reshape(handle.weights.shape)
    y = weighted_row_sum(handle.returned, index, handle.weights, into=into)
    return poison_rows(y, handle.invalid)


ExpertFn = Callable[[ExpertWindows], jax.Array]


def prefill_moe(
    x: jax.Array,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    expert_fn: ExpertFn,
    *,
    num_experts: int,
    axis_name: str,
    rows_per_round: int,
    exchange: Exchange = "all_gather",
    max_rows: int | None = None,
    first_round_inline: tuple[str, ...] = Lowering().first_round_inline,
) -> jax.Array:
    """The whole prefill schedule; ``expert_fn(windows) -> [R, d]``. Returns ``[T, d]``.
    Ids as :func:`plan_and_pack` takes them.

    Rounds past the first run only when the plan says so (every rank sees the same
    ``num_rounds``); each round's results are summed into ``y`` when they return.
    ``first_round_inline``: the platforms that run round 0 before the rounds' loop (the
    others run every round as one loop body; :class:`~moe_relayfree.config.Lowering`).

    Several mesh axes: ``expert_fn`` runs inside branches that only the ranks of one
    expert-parallel group agree on. For gradients, make the arrays it closes over vary over
    every axis x does first (``collectives.vary_like(w, x)``), so the backward pass sums a
    replicated weight's gradient after the schedule, not inside a branch (where ranks of
    different groups would meet different collectives). :func:`expert_parallel_moe` does this.
    """
    handle = plan_and_pack(
        x, topk_ids, topk_weights, num_experts=num_experts, axis_name=axis_name,
        rows_per_round=rows_per_round, exchange=exchange, max_rows=max_rows,
    )
    return run_rounds(handle, expert_fn, first_round_inline)


def run_rounds(handle: PrefillHandle, expert_fn: ExpertFn,
               first_round_inline: tuple[str, ...] = Lowering().first_round_inline) -> jax.Array:
    """Steps 2-6 of every round of ``handle``'s plan, summed -> ``[T, d]`` in x's dtype."""
    x, axis_name = handle.x, handle.axis_name

    def round_sum(j, into):
        h = combine_round(handle, expert_fn(dispatch_round(handle, j)), j)
        return weighted_sum(h, into)

    if handle.plan.max_rounds == 1:
        return round_sum(0, None).astype(x.dtype)

    # Each round's results are summed as they return, the running sum carried in x's dtype
    # (a conditional's operand is held twice; in f32 that was 2 * T * d * 4 bytes): a token's
    # sum is rounded once per round holding one of its copies, once in the usual one round.
    # Every rank sees the same num_rounds, so they all branch alike.
    def step(j, y):
        return lax.cond(j < handle.plan.num_rounds,
                        lambda y: round_sum(j, y.astype(_F32)).astype(x.dtype), lambda y: y, y)

    def one_body(y):
        # Every round, the first included, is one body of the loop: the program holds one
        # round's buffers (round 0 inline beside a conditional for the others held both on
        # XLA:TPU, 0.3-0.7 MiB per layer above the bounded baseline).
        return lax.fori_loop(0, handle.plan.max_rounds, step, y)

    def first_inline(_):
        # XLA:CPU runs round 0 faster outside a loop; there the second body costs compile
        # time only.
        y = round_sum(0, None).astype(x.dtype)
        return lax.cond(handle.plan.num_rounds > 1,
                        lambda y: lax.fori_loop(1, handle.plan.max_rounds, step, y),
                        lambda y: y, y)

    y = ensure_varying(jnp.zeros(x.shape, x.dtype), axis_name, x)
    return lax.platform_dependent(y, **{p: first_inline for p in first_round_inline},
                                  default=one_body)
