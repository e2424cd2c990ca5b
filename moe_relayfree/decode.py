"""Decode schedule: few tokens per rank, latency first, only useful rows computed, receive
buffers near the copies a rank gets (inside ``shard_map``).

Per rank: ``P`` ranks, ``E`` experts, ``El = E/P`` local experts, ``T`` tokens, ``k`` choices.
A token's repeated choices of one expert fold into one copy first
(:func:`~moe_relayfree.routing.merge_repeated_choices`), so a token sends at most
``min(k, El)`` copies to a rank. Two transports, picked statically by the bytes they move
(:func:`choose_transport`; on CPU, where ranks are emulated devices sharing one memory,
:func:`decode_moe` gathers at every P):

``gather`` (``P <= k``: gathering every token moves no more rows than sending every copy; no
count exchange before the data)

1. one ``all_gather`` of ``[T, d + m]`` rows: x with its ids and weights bit-packed into x's
   dtype (one collective, not three; a custom VJP gives exact gradients).
2. each rank keys the ``P*T*k`` gathered copies by local expert (``El`` = not mine) and sorts
   the int32 keys: the first rows of that order are its expert windows.
3. one gather of those rows -> :class:`ExpertWindows`; grouped SwiGLU on the windows.
4. ``[P*T, d]`` float32 partial sums: each gathered copy's result read back from its window
   row (the inverse of the sort), weighted, summed over ``k`` in a fixed order (a gather, no
   scatter-add: no float atomics on a GPU, the same bits on every run).
5. ``psum_scatter`` returns slot block ``s`` to source ``s``, summed over ranks.

``windows`` (``P > k``: ``T*k*d`` bytes per rank whatever ``P``): the planned dispatch of
:mod:`moe_relayfree.prefill` with its metadata in two small ``all_to_all`` s
(``exchange="all_to_all"``: ``O(P*El)`` ints per rank, where the prefill default gathers
every rank's ``E`` counts), each copy written straight into its expert window of a bounded
receive buffer, rounds only under skew.

``replicated`` (a batch of ``N`` < ranks tokens that every rank already holds, because the
attention before the layer ran replicated): the gather transport without step 1 (x is the
gathered rows) and with one ``psum`` of ``[N, d]`` f32 instead of step 5, which leaves every
token's output on every rank, where the next attention wants it. One collective per layer.
Never chosen by "auto": it depends on where x lives.

Rows: every transport holds :func:`typical_rows` window rows at a time (``2*T*k``, at least
``MIN_ROWS``: the usual case receives no more). A rank that received more runs further
passes of that size: the gather transports locally (a ``lax.cond`` with no collective
inside, so ranks need not agree), the windows transport in rounds all ranks agree on. Nothing
is ever dropped, and no buffer is sized for the worst case ``P*T*min(k, El)``
(``overflow="one_pass"``: every worst-case row in one call, no conditional). The verbs
(:func:`dispatch` / :func:`combine`) always hold the worst case.
"""

from __future__ import annotations

import functools
from typing import Callable, Literal

import jax
from jax import lax

from moe_relayfree import prefill, transports
from moe_relayfree.config import OVERFLOWS, Lowering, Overflow
from moe_relayfree.plan import MIN_ROWS
from moe_relayfree.prefill import PrefillHandle
from moe_relayfree.routing import merge_repeated_choices, screen_choices
from moe_relayfree.transports import GatherHandle
from moe_relayfree.windows import ExpertWindows

Transport = Literal["auto", "gather", "windows", "replicated"]
TRANSPORTS: tuple[str, ...] = ("auto", "gather", "windows", "replicated")


def check_overflow(overflow: str, name: str = "overflow") -> None:
    """Raises ``ValueError`` unless ``overflow`` is one of :data:`OVERFLOWS` (``name``: the
    argument's name in the caller's signature, for the message)."""
    if overflow not in OVERFLOWS:
        raise ValueError(f"{name} must be 'branch' or 'one_pass', got {overflow!r}")


def choose_transport(num_ranks: int, k: int, transport: Transport = "auto") -> str:
    """"gather" when ``P <= k`` (its ``P*T`` rows are no more than ``T*k`` copies), else
    "windows" (exactly the ``T*k`` copies per rank at any ``P``).

    This is the rule for a real interconnect, where bytes cost. :func:`decode_moe` with
    "auto" applies it on every platform but CPU, where the ranks are emulated devices of one
    process: there collectives are memory copies, the windows transport's exchanges (each
    emulated ragged all-to-all is two dense ones) cost more than the gathered bytes.
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    if transport != "auto":
        return transport
    return "gather" if num_ranks <= k else "windows"


def typical_rows(tokens: int, k: int, num_ranks: int = 1) -> int:
    """Window rows held at a time: twice the mean copies a rank receives, ``T*k`` for ``T``
    tokens per rank (``num_ranks=1``), or ``N*k/P`` for ``N`` tokens on ``P`` ranks; at least
    :data:`MIN_ROWS`; a multiple of 8."""
    return max(MIN_ROWS, -(-2 * tokens * k // (8 * num_ranks)) * 8)


def worst_rows(num_ranks: int, tokens: int, k: int, num_local: int) -> int:
    """Most copies one rank can receive: each of ``P*T`` tokens sends ``min(k, El)`` at most
    (its repeated choices folded)."""
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


# --- verbs ----------------------------------------------------------------------------------

DecodeHandle = GatherHandle | PrefillHandle


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
    ``transport="replicated"``: the same ``N`` tokens on every rank, ``N*min(k, El)`` rows.
    Ids in ``[0, E)`` or ``-1`` (no expert); any other id makes its token's output NaN."""
    num_ranks = lax.axis_size(axis_name)
    t, k = topk_ids.shape
    local = num_experts // num_ranks
    chosen = choose_transport(num_ranks, k, transport)
    replicated = chosen == "replicated"
    _, rows = window_rows(chosen, num_ranks, t, k, local)
    ids, w, invalid = screen_choices(topk_ids, topk_weights, num_experts)
    ids, w = merge_repeated_choices(ids, w, num_experts)
    if chosen in ("gather", "replicated"):
        plan = transports.gather_plan(x, ids, w, invalid, num_experts, axis_name, replicated)
        return transports.gather_windows(plan, rows, k, x.dtype, axis_name,
                                         replicated=replicated)
    handle = prefill.pack(x, ids, w, invalid, num_experts=num_experts, axis_name=axis_name,
                                   rows_per_round=rows, exchange="all_to_all", max_rows=rows)
    return prefill.dispatch_round(handle, 0), handle


def combine(expert_out: jax.Array, handle: DecodeHandle) -> jax.Array:
    """expert_out ``[B, d]`` unweighted, one row per window row -> ``[T, d]`` (x dtype)."""
    if isinstance(handle, GatherHandle):
        partial = transports.gather_partial(expert_out, handle)
        return transports.gather_combine(partial, handle.axis_name, handle.out_dtype,
                                         handle.replicated, handle.invalid)
    return prefill.weighted_sum(prefill.combine_round(handle, expert_out, 0)).astype(
        expert_out.dtype)


# --- the schedule ---------------------------------------------------------------------------

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
    first_round_inline: tuple[str, ...] = Lowering().first_round_inline,
) -> jax.Array:
    """The whole decode schedule; ``expert_fn(windows) -> [B, d]``. Returns ``[T, d]``.
    Ids in ``[0, E)`` or ``-1`` (no expert); any other id makes its token's output NaN.
    ``first_round_inline``: the windows transport's rounds
    (:class:`~moe_relayfree.config.Lowering`).

    ``overflow="branch"``: ``expert_fn`` runs on :func:`typical_rows` window rows at a time,
    further passes only where a rank received more (the work follows the rows received, the
    memory stays that of one pass). ``"one_pass"``: one call over all worst-case rows and no
    conditional. XLA:GPU runs a conditional outside a command buffer by copying its predicate
    to the host and blocking the stream (``ConditionalThunk``), one host sync per layer; with
    a grouped GEMM whose cost follows the group sizes (not a padded ``ragged_dot``) one pass
    is the latency choice there (docs/platforms.md), at the worst case's memory.
    ``transport="auto"``: :func:`choose_transport`, except that on CPU (emulated devices) the
    gather transport runs at every ``P``; picked at lowering time, so a program lowered for
    a GPU or TPU keeps the windows transport at ``P > k``.

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
    topk_ids, w, invalid = screen_choices(topk_ids, topk_weights, num_experts)
    # repeats fold into one copy: the windows' bounds count distinct experts per token
    topk_ids, w = merge_repeated_choices(topk_ids, w, num_experts)
    run = functools.partial(_decode_moe, expert_fn=expert_fn, num_experts=num_experts,
                            axis_name=axis_name, one_pass=overflow == "one_pass",
                            first_round_inline=first_round_inline)
    if transport == "auto" and chosen == "windows":
        return lax.platform_dependent(
            x, topk_ids, w, invalid,
            cpu=functools.partial(run, transport="gather"),
            default=functools.partial(run, transport="windows"),
        )
    return run(x, topk_ids, w, invalid, transport=chosen)


def _decode_moe(x, topk_ids, w, invalid, *, expert_fn, num_experts, axis_name, transport,
                one_pass, first_round_inline):
    num_ranks = lax.axis_size(axis_name)
    t, k = topk_ids.shape
    local = num_experts // num_ranks
    replicated = transport == "replicated"  # t is then all N tokens, not this rank's share
    typical, worst = window_rows(transport, num_ranks, t, k, local)
    rows = worst if one_pass else typical
    if transport == "windows":
        handle = prefill.pack(x, topk_ids, w, invalid, num_experts=num_experts,
                              axis_name=axis_name, rows_per_round=rows, exchange="all_to_all",
                              max_rows=worst)
        return prefill.run_rounds(handle, expert_fn, first_round_inline)

    plan = transports.gather_plan(x, topk_ids, w, invalid, num_experts, axis_name, replicated)
    total = plan.total

    def partial(into, start):
        windows, handle = transports.gather_windows(plan, rows, k, x.dtype, axis_name, start,
                                                    replicated)
        return transports.gather_partial(expert_fn(windows), handle, into)

    out = partial(None, 0)
    passes = -(-worst // rows)
    if passes > 1:
        # Local: this rank's own window rows past the first pass, `rows` at a time (no
        # collective inside, so ranks need not agree); one pass's buffers, whatever the skew.
        def more(out):
            def step(p, out):
                return lax.cond(p * rows < total, lambda o: partial(o, p * rows), lambda o: o, out)

            return lax.fori_loop(1, passes, step, out)

        out = lax.cond(total > rows, more, lambda o: o, out)
    return transports.gather_combine(out, axis_name, x.dtype, replicated, invalid)
