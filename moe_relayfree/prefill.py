"""Prefill schedule: planned, ragged, exact bytes (call inside ``shard_map``).

Op sequence per rank (``T`` tokens, ``k`` choices, ``R`` receive rows per round):

1. plan: sort the ``T*k`` copy ids (int32 only), count per expert, one ``all_gather`` of
   ``E`` counts; every offset below is arithmetic on the ``[P, P, El]`` count matrix.
2. one gather ``x[order // k]`` -> send buffer ``[T*k, d]`` in (peer, local expert) order
   (this is also the k-fold replication).
3. per round: ``ragged_all_to_all`` with ``P*El`` segments writes each (source, local expert)
   segment straight into that expert's window of the receiver's ``[R, d]`` buffer.
4. grouped SwiGLU on the windows (group sizes = window sizes), no receiver re-sort.
5. mirrored ``ragged_all_to_all`` writes the results back into the source's ``[T*k, d]``
   returned buffer, at the rows the copies were sent from.
6. one fused weighted gather-sum over ``k`` -> ``[T, d]``.

Rounds: one round covers every case where no rank receives more than ``R`` rows. More are
run only when the plan says so (all ranks agree: the counts are all-gathered), so a skewed
batch is slower, never wrong.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from moe_relayfree.collectives import ensure_varying, peer_rows, ragged_all_to_all
from moe_relayfree.plan import PrefillPlan, make_prefill_plan, round_segments
from moe_relayfree.windows import ExpertWindows, take_rows, weighted_row_sum

_F32 = jnp.float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PrefillHandle:
    """What combine needs: the plan, the send buffer, routing weights, returned rows.

    send ``[T*k, d]``, weights ``[T, k] float32``, returned ``[T*k, d]`` (filled by combine).
    """

    plan: PrefillPlan
    send: jax.Array
    weights: jax.Array
    returned: jax.Array
    axis_name: str = dataclasses.field(metadata=dict(static=True))


def plan_and_pack(
    x: jax.Array,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    *,
    num_experts: int,
    axis_name: str,
    rows_per_round: int,
) -> PrefillHandle:
    """Steps 1-2. x ``[T, d]``, topk_ids ``[T, k] int32``, topk_weights ``[T, k]``."""
    k = topk_ids.shape[1]
    plan = make_prefill_plan(topk_ids, num_experts, axis_name, rows_per_round)
    send = take_rows(x, plan.order // k)
    return PrefillHandle(
        plan=plan,
        send=send,
        weights=topk_weights.astype(_F32),
        returned=ensure_varying(jnp.zeros_like(send), axis_name, send),
        axis_name=axis_name,
    )


def _peer_sizes(handle: PrefillHandle) -> dict:
    """Static per-peer sizes for emulated collectives: the proven bound (a source has ``T*k``
    copies; a round delivers at most ``R`` rows to a peer) and the balanced-routing size."""
    return peer_rows(handle.send.shape[0], handle.plan.rows_per_round,
                     handle.plan.counts.shape[0])


def dispatch_round(handle: PrefillHandle, round_index: jax.Array | int = 0) -> ExpertWindows:
    """Step 3: this round's rows land directly in the receiver's expert windows."""
    seg = round_segments(handle.plan, round_index)
    buf = jnp.zeros((handle.plan.rows_per_round,) + handle.send.shape[1:], handle.send.dtype)
    rows = ragged_all_to_all(
        handle.send,
        buf,
        seg.send_offsets.reshape(-1),
        seg.send_sizes.reshape(-1),
        seg.dest_offsets.reshape(-1),
        seg.recv_sizes.reshape(-1),
        axis_name=handle.axis_name,
        **_peer_sizes(handle),
    )
    # a rank receives T*k copies on average (what it sends); the round's buffer takes more
    return ExpertWindows(rows=rows, group_sizes=seg.group_sizes,
                         expected_rows=handle.send.shape[0])


def combine_round(
    handle: PrefillHandle, expert_out: jax.Array, round_index: jax.Array | int = 0
) -> PrefillHandle:
    """Step 5: the mirrored segments write results into the sources' returned buffers."""
    seg = round_segments(handle.plan, round_index)
    returned = ragged_all_to_all(
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


def weighted_sum(handle: PrefillHandle) -> jax.Array:
    """Step 6: ``y[t] = sum_j w[t, j] * returned[slot[t, j]]`` -> ``[T, d]`` (send dtype)."""
    index = handle.plan.slot.reshape(handle.weights.shape)
    return weighted_row_sum(handle.returned, index, handle.weights).astype(handle.send.dtype)


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
) -> jax.Array:
    """The whole prefill schedule; ``expert_fn(windows) -> [R, d]``. Returns ``[T, d]``.

    Several mesh axes: ``expert_fn`` runs inside branches that only the ranks of one
    expert-parallel group agree on. For gradients, make the arrays it closes over vary over
    every axis x does first (``collectives.vary_like(w, x)``), so the backward pass sums a
    replicated weight's gradient after the schedule, not inside a branch (where ranks of
    different groups would meet different collectives). :func:`expert_parallel_moe` does this.
    """
    handle = plan_and_pack(
        x, topk_ids, topk_weights, num_experts=num_experts, axis_name=axis_name,
        rows_per_round=rows_per_round,
    )

    def one_round(j, h: PrefillHandle) -> PrefillHandle:
        return combine_round(h, expert_fn(dispatch_round(h, j)), j)

    handle = one_round(0, handle)
    if handle.plan.max_rounds > 1:
        # Skewed batches only: every rank sees the same num_rounds, so they all branch alike.
        def more_rounds(h: PrefillHandle) -> PrefillHandle:
            def step(j, h):
                return lax.cond(j < h.plan.num_rounds, lambda h: one_round(j, h), lambda h: h, h)

            return lax.fori_loop(1, h.plan.max_rounds, step, h)

        handle = lax.cond(handle.plan.num_rounds > 1, more_rounds, lambda h: h, handle)
    return weighted_sum(handle)
