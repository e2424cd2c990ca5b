"""Decode schedule: data first, no count exchange, only useful rows computed (inside ``shard_map``).

Per rank: ``P`` ranks, ``E`` experts, ``El = E/P`` local experts, ``T`` tokens, ``k`` choices.
Two transports (in :mod:`moe_relayfree.transports`), picked statically by the bytes they move
(:func:`choose_transport`; on CPU, where ranks are emulated devices sharing one memory,
:func:`decode_moe` gathers at every P):

``gather`` (``P <= k``: gathering every token moves no more rows than sending every copy)

1. one ``all_gather`` of ``[T, d + m]`` rows: x with its ids and weights bit-packed into x's
   dtype (one collective, not three; a custom VJP gives exact gradients).
2. each rank keys the ``P*T*k`` gathered copies by local expert (``El`` = not mine) and sorts
   the int32 keys: the first rows of that order are its expert windows.
3. one gather of those rows -> :class:`ExpertWindows`; grouped SwiGLU on the windows.
4. ``[P*T, d]`` float32 partial sums: each gathered copy's result read back from its window
   row (the inverse of the sort), weighted, summed over ``k`` in a fixed order (a gather, no
   scatter-add: no float atomics on a GPU, the same bits on every run).
5. ``psum_scatter`` returns slot block ``s`` to source ``s``, summed over ranks.

``blocks`` (``P > k``: ``T*k*d`` bytes per rank whatever ``P``)

1. sort this rank's ``T*k`` copy ids (destination rank, local expert); one gather builds the
   send buffer (also the k-fold replication).
2. one ``all_to_all`` of ``[P, El + 1]`` int32: copies per (destination, local expert) and
   where that destination's block starts in this rank's send buffer. XLA's ragged
   all-to-all needs exact ``recv_sizes`` (the NCCL path posts its receives with them, and
   the transpose rule sends with them), so this small exchange is the one metadata step.
3. ``ragged_all_to_all`` with one segment per peer writes source ``s``'s copies into the
   fixed block ``[s*C, (s+1)*C)`` of the receiver, ``C = T*min(k, El)`` (the most one source
   can send to one rank): the sender knows the offset without asking anybody.
4. the receiver maps expert-major rows to block rows by arithmetic on the received counts
   (no sort), gathers them -> :class:`ExpertWindows`, runs grouped SwiGLU, and writes the
   results back over the block rows they came from.
5. the mirrored ``ragged_all_to_all`` returns each block to its source, at the rows it was
   sent from; 6. one weighted gather-sum over ``k`` at the source.

``replicated`` (a batch of ``N`` < ranks tokens that every rank already holds, because the
attention before the layer ran replicated): the gather transport without step 1 (x is the
gathered rows) and with one ``psum`` of ``[N, d]`` f32 instead of step 5, which leaves every
token's output on every rank, where the next attention wants it. One collective per layer:
split over the ranks, the same batch took a re-shard, a gather, a reduce-scatter and an
all-reduce back to replicated. Never chosen by "auto": it depends on where x lives.

Rows: :func:`decode_moe` always computes the first ``B = 2*T*k`` expert-major window rows
(the usual case receives no more), outside any branch; a rank that received more computes
the rest, up to the proven worst case ``P*T*min(k, El)``, in a second grouped GEMM under a
local ``lax.cond`` with no collective inside, so ranks need not agree (``overflow="one_pass"``:
all worst-case rows in one call, no conditional). Nothing is ever dropped. The verbs
(:func:`dispatch` / :func:`combine`) always use the worst case.
"""

from __future__ import annotations

import functools
from typing import Callable, Literal

import jax
import jax.numpy as jnp
from jax import lax

from moe_relayfree import transports
from moe_relayfree.config import OVERFLOWS, Overflow
from moe_relayfree.routing import merge_repeated_choices
from moe_relayfree.transports import BlocksHandle, GatherHandle
from moe_relayfree.transports import expert_major_rows, gather_tokens  # noqa: F401  (re-exported)
from moe_relayfree.windows import ExpertWindows

_F32 = jnp.float32


Transport = Literal["auto", "gather", "blocks", "replicated"]


def check_overflow(overflow: str, name: str = "overflow") -> None:
    """Raises ``ValueError`` unless ``overflow`` is one of :data:`OVERFLOWS` (``name``: the
    argument's name in the caller's signature, for the message)."""
    if overflow not in OVERFLOWS:
        raise ValueError(f"{name} must be 'branch' or 'one_pass', got {overflow!r}")


def choose_transport(num_ranks: int, k: int, transport: Transport = "auto") -> str:
    """"gather" when ``P <= k`` (its ``P*T`` rows are no more than ``T*k`` copies), else
    "blocks" (exactly ``T*k`` rows per rank at any ``P``).

    This is the rule for a real interconnect, where bytes cost. :func:`decode_moe` with
    "auto" applies it on every platform but CPU, where the ranks are emulated devices of one
    process: there collectives are memory copies, the blocks transport's three exchanges (each
    emulated ragged all-to-all is two dense ones) cost more than the gathered bytes, and the
    gather transport was measured as fast or faster at every size (docs/benchmarks.md).
    """
    if transport in ("gather", "blocks", "replicated"):
        return transport
    if transport != "auto":
        raise ValueError(
            f"transport must be 'auto', 'gather', 'blocks' or 'replicated', got {transport!r}")
    return "gather" if num_ranks <= k else "blocks"


def typical_rows(tokens: int, k: int, num_ranks: int = 1) -> int:
    """Window rows for the usual case: twice the mean copies a rank receives, ``T*k`` for
    ``T`` tokens per rank (``num_ranks=1``), or ``N*k/P`` for ``N`` tokens on ``P`` ranks."""
    return -(-2 * tokens * k // (8 * num_ranks)) * 8


def worst_rows(num_ranks: int, tokens: int, k: int, num_local: int) -> int:
    """Most copies one rank can receive: each of ``P*T`` tokens sends ``min(k, El)`` at most."""
    return num_ranks * tokens * min(k, num_local)


def window_rows(transport: str, num_ranks: int, tokens: int, k: int,
                num_local: int) -> tuple[int, int]:
    """(typical, worst) window rows of a rank: ``tokens`` is its ``T``, or with the
    "replicated" transport all ``N`` tokens, which every rank holds (no factor ``P``)."""
    if transport == "replicated":
        worst = worst_rows(1, tokens, k, num_local)
        return min(worst, typical_rows(tokens, k, num_ranks)), worst
    worst = worst_rows(num_ranks, tokens, k, num_local)
    return min(worst, typical_rows(tokens, k)), worst


# --- the schedule ---------------------------------------------------------------------------

DecodeHandle = GatherHandle | BlocksHandle


def dispatch(
    x: jax.Array,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    *,
    num_experts: int,
    axis_name: str,
    transport: Transport = "auto",
) -> tuple[ExpertWindows, DecodeHandle]:
    """x ``[T, d]``, topk_ids ``[T, k] int32``, topk_weights ``[T, k]`` -> expert windows of
    the worst-case ``P*T*min(k, El)`` rows (group sizes ``[El]``) and the handle.
    ``transport="replicated"``: the same ``N`` tokens on every rank, ``N*min(k, El)`` rows."""
    num_ranks = lax.axis_size(axis_name)
    t, k = topk_ids.shape
    local = num_experts // num_ranks
    chosen = choose_transport(num_ranks, k, transport)
    replicated = chosen == "replicated"
    _, rows = window_rows(chosen, num_ranks, t, k, local)
    # repeats fold into one copy: the windows' bounds count distinct experts per token
    topk_ids, w = merge_repeated_choices(topk_ids, topk_weights, num_experts)
    if chosen in ("gather", "replicated"):
        plan = transports.gather_plan(x, topk_ids, w, num_experts, axis_name, replicated)
        return transports.gather_windows(*plan, rows, k, x, axis_name, replicated=replicated)
    handle, recv_counts = transports.blocks_send(x, topk_ids, w, num_experts, axis_name)
    return transports.blocks_windows(handle, recv_counts, rows)


def combine(expert_out: jax.Array, handle: DecodeHandle) -> jax.Array:
    """expert_out ``[B, d]`` unweighted, one row per window row -> ``[T, d]`` (x dtype)."""
    if isinstance(handle, GatherHandle):
        partial = transports.gather_partial(expert_out, handle)
        return transports.gather_combine(partial, handle.axis_name, handle.out_dtype,
                                         handle.replicated)
    return transports.blocks_return(transports.blocks_write_back(expert_out, handle), handle)


ExpertFn = Callable[[ExpertWindows], jax.Array]


def decode_moe(
    x: jax.Array,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    expert_fn: ExpertFn,
    *,
    num_experts: int,
    axis_name: str,
    transport: Transport = "auto",
    overflow: Overflow = "branch",
) -> jax.Array:
    """The whole decode schedule; ``expert_fn(windows) -> [B, d]``. Returns ``[T, d]``.

    ``overflow="branch"``: ``expert_fn`` runs on the first ``2*T*k`` window rows, and again on
    the rest (up to the worst case) only where this rank received more, under a ``lax.cond``:
    the work follows the rows received. ``"one_pass"``: one call over all worst-case rows and
    no conditional. XLA:GPU runs a conditional outside a command buffer by copying its
    predicate to the host and blocking the stream (``ConditionalThunk``), one host sync per
    layer; with a grouped GEMM whose cost follows the group sizes (not a padded ``ragged_dot``)
    one pass is the latency choice there (docs/platforms.md).
    ``transport="auto"``: :func:`choose_transport`, except that on CPU (emulated devices) the
    gather transport runs at every ``P``; picked at lowering time, so a program lowered for
    a GPU or TPU keeps the blocks transport at ``P > k``.

    Several mesh axes: ``expert_fn`` runs inside branches that only the ranks of one
    expert-parallel group agree on. For gradients, make the arrays it closes over vary over
    every axis x does first (``collectives.vary_like(w, x)``), so the backward pass sums a
    replicated weight's gradient after the schedule, not inside a branch (where ranks of
    different groups would meet different collectives). :func:`expert_parallel_moe` does this.
    """
    num_ranks = lax.axis_size(axis_name)
    k = topk_ids.shape[1]
    chosen = choose_transport(num_ranks, k, transport)
    check_overflow(overflow)
    run = functools.partial(_decode_moe, expert_fn=expert_fn, num_experts=num_experts,
                            axis_name=axis_name, one_pass=overflow == "one_pass")
    if transport == "auto" and chosen == "blocks":
        return lax.platform_dependent(
            x, topk_ids, topk_weights,
            cpu=functools.partial(run, transport="gather"),
            default=functools.partial(run, transport="blocks"),
        )
    return run(x, topk_ids, topk_weights, transport=chosen)


def _decode_moe(x, topk_ids, topk_weights, *, expert_fn, num_experts, axis_name, transport,
                one_pass):
    num_ranks = lax.axis_size(axis_name)
    t, k = topk_ids.shape
    local = num_experts // num_ranks
    replicated = transport == "replicated"  # t is then all N tokens, not this rank's share
    typical, worst = window_rows(transport, num_ranks, t, k, local)
    if one_pass:
        typical = worst
    # repeats fold into one copy: the windows' bounds count distinct experts per token
    topk_ids, w = merge_repeated_choices(topk_ids, topk_weights, num_experts)
    # The first `typical` window rows always run, outside any branch; the rest only on a rank
    # that received more (a local cond, no collective inside, so ranks need not agree).
    if transport in ("gather", "replicated"):
        plan = transports.gather_plan(x, topk_ids, w, num_experts, axis_name, replicated)

        def partial(into, start, rows):
            windows, handle = transports.gather_windows(*plan, rows, k, x, axis_name, start,
                                                        replicated)
            return transports.gather_partial(expert_fn(windows), handle, into)

        out = partial(None, 0, typical)
        if typical < worst:
            out = lax.cond(plan[3].sum() > typical,
                           lambda o: partial(o, typical, worst - typical), lambda o: o, out)
        return transports.gather_combine(out, axis_name, x.dtype, replicated)

    handle, recv_counts = transports.blocks_send(x, topk_ids, w, num_experts, axis_name)

    def results(into, start, rows):
        windows, h = transports.blocks_windows(handle, recv_counts, rows, start)
        return transports.blocks_write_back(expert_fn(windows), h, into, start)

    out = results(handle.blocks, 0, typical)
    if typical < worst:
        out = lax.cond(handle.total > typical,
                       lambda o: results(o, typical, worst - typical), lambda o: o, out)
    return transports.blocks_return(out, handle)
