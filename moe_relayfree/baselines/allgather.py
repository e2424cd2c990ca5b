"""All-gather expert parallelism (the default EP of tpu-inference and sglang-jax), for
comparison: no all-to-all, no count exchange.

Per rank (call inside ``shard_map``; ``P`` ranks, ``T`` tokens each, ``k`` choices):

1. one ``all_gather`` of every rank's tokens with their routing (``[P*T, d]``, packed into
   one collective as the decode schedule's gather transport does);
2. every gathered copy keyed by this rank's local expert (not mine: last), one int32 sort, and
   one gather of the rows into a worst-case ``[P*T*k, d]`` buffer, expert-major;
3. grouped GEMM over the local experts (group sizes from the sort);
4. each gathered token's results read back from its copies' rows, weighted and summed over
   ``k`` -> ``[P*T, d]`` float32 partial sums (zeros for copies on other ranks);
5. ``psum_scatter`` over the expert axis returns each rank its own ``[T, d]``.

Every rank moves and sums ``P*T`` rows whatever the routing (its cost grows with ``P``), and
its buffer holds every copy of the group (``P*T*k`` rows). A token's repeated choices are not
folded (each is a copy, as these engines run them). It shares the gather transport's
pieces (:mod:`moe_relayfree.transports`) and the grouped GEMM with the relay-free paths.
"""

from __future__ import annotations

import jax
from jax import lax

from moe_relayfree import transports
from moe_relayfree.routing import screen_choices
from moe_relayfree.transports import GatherHandle
from moe_relayfree.windows import ExpertWindows


def dispatch(x: jax.Array, topk_ids: jax.Array, topk_weights: jax.Array, *, num_experts: int,
             axis_name: str) -> tuple[ExpertWindows, GatherHandle]:
    """Steps 1-2. x ``[T, d]``, ids ``[T, k]`` (``-1``: no expert), weights ``[T, k]`` ->
    (expert-major windows of ``P*T*k`` rows, handle)."""
    num_ranks = lax.axis_size(axis_name)
    t, k = topk_ids.shape
    ids, w, invalid = screen_choices(topk_ids, topk_weights, num_experts)
    plan = transports.gather_plan(x, ids, w, invalid, num_experts, axis_name)
    return transports.gather_windows(plan, num_ranks * t * k, k, x.dtype, axis_name)


def combine(expert_out: jax.Array, handle: GatherHandle) -> jax.Array:
    """Steps 4-5. expert_out ``[P*T*k, d]`` -> ``[T, d]`` (x's dtype)."""
    partial = transports.gather_partial(expert_out, handle)
    return transports.gather_combine(partial, handle.axis_name, handle.out_dtype,
                                     invalid=handle.invalid)


__all__ = ["combine", "dispatch"]
