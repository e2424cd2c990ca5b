"""The table of dispatch paths: every way this library can move a layer's tokens to its experts
and back, one entry each.

A path is what :class:`~moe_relayfree.DispatchConfig` selects with ``implementation`` (and, for
relay-free, the schedule :func:`resolve` picks). Each entry names its per-rank functions (the
whole layer, and the DeepEP-style verbs ``dispatch`` -> ``experts`` -> ``combine`` of one round),
the config settings it reads, whether it can drop copies, and what it supports. The API
(:func:`moe_relayfree.expert_parallel_moe`), the verbs (:func:`moe_relayfree.dispatch`), the
benchmarks, the platform self-check and the tests all read this table; adding a path is one
entry here (``tests/test_paths.py`` fails if a reader misses one).

Per-rank functions run inside ``shard_map`` over the expert axis (``T`` tokens of this rank,
``k`` choices, ``El`` local experts):

* ``layer(x [T, d], ids [T, k] int32, weights [T, k], experts: ExpertWeights, call: Call)
  -> [T, d]`` in x's dtype: the path as the API runs it (rounds, bounded passes);
* ``dispatch(x, ids, weights, call) -> (received, handle)``, ``experts(received,
  ExpertWeights) -> out``, ``combine(out, handle) -> [T, d]``: one round of it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax

from moe_relayfree import decode, pallas_decode, pallas_remote, prefill
from moe_relayfree.baselines import allgather, capacity, ragged
from moe_relayfree.config import DispatchConfig, Lowering
from moe_relayfree.experts import grouped_swiglu, windows_swiglu
from moe_relayfree.ffn import swiglu
from moe_relayfree.pallas_experts import windows_swiglu_packed
from moe_relayfree.plan import MIN_ROWS, rows_per_round
from moe_relayfree.quant import as_dtype
from moe_relayfree.routing import poison_rows
from moe_relayfree.selection import select_schedule


class ExpertWeights(NamedTuple):
    """This rank's expert stacks: w_gate, w_up ``[El, d, f]``, w_down ``[El, f, d]`` (each may
    be :class:`~moe_relayfree.quant.BlockQuantized`)."""

    w_gate: Any
    w_up: Any
    w_down: Any


@dataclasses.dataclass(frozen=True)
class Call:
    """The static facts one layer program is traced for (hashable: part of its cache key).

    rows: receive rows per round (relay-free prefill), the bounded baseline's receive buffer;
    transport: the decode schedule's ("auto", "gather", "windows", "replicated");
    overflow: the decode schedule's rows past the usual ``2*T*k`` ("branch", "one_pass");
    first_round_inline: platforms running prefill's round 0 before the rounds' loop;
    capacity: the capacity baseline's slots per expert per source (None: ``T``, never drops;
    what the API runs; the benchmarks set GShard's usual factor);
    platform: the mesh's platform, for a path that lowers differently on one (None: JAX's
    default backend).
    """

    num_experts: int
    axis_name: str
    rows: int
    transport: str = "auto"
    overflow: str = "branch"
    first_round_inline: tuple[str, ...] = Lowering().first_round_inline
    capacity: int | None = None
    platform: str | None = None


@dataclasses.dataclass(frozen=True)
class DispatchPath:
    """One entry of :data:`PATHS` (see the module docstring for the functions' signatures).

    implementation / schedule: what selects it (``DispatchConfig.implementation``, and the
    schedule ``"auto"`` resolves to, or None where the path has one form);
    settings: the DispatchConfig fields it reads beyond the mesh layout;
    drops: whether a copy can be lost (a bounded buffer with no further rounds);
    gradients / multi_axis / fp8: reverse-mode derivatives, meshes with data and tensor axes
    besides the expert axis, block-quantized expert stacks;
    transports: the decode transports it runs; row_floor: least receive rows per round;
    platforms: where it runs compiled (None: everywhere XLA runs; the Pallas TPU path also runs
    interpreted on CPU, for its tests, not for serving);
    auto: whether ``schedule="auto"`` picks this decode form at the platform's threshold
    (False: only under an explicit ``DispatchConfig.decode_threshold``, or by name).
    """

    name: str
    implementation: str
    schedule: str | None
    layer: Callable[..., jax.Array]
    dispatch: Callable[..., tuple]
    experts: Callable[..., jax.Array]
    combine: Callable[..., jax.Array]
    settings: frozenset[str]
    drops: bool
    gradients: bool = True
    multi_axis: bool = True
    fp8: bool = True
    transports: tuple[str, ...] = ()
    row_floor: int = MIN_ROWS
    platforms: tuple[str, ...] | None = None
    auto: bool = True
    summary: str = ""

    def native(self, platform: str) -> bool:
        """Whether it runs compiled on ``platform``."""
        return self.platforms is None or platform in self.platforms


# --- relay-free -------------------------------------------------------------------------------


def _window_experts(windows, w: ExpertWeights) -> jax.Array:
    return windows_swiglu(windows, *w)


def _prefill_layer(x, ids, weights, w: ExpertWeights, call: Call):
    return prefill.prefill_moe(x, ids, weights, lambda win: _window_experts(win, w),
                               num_experts=call.num_experts, axis_name=call.axis_name,
                               rows_per_round=call.rows,
                               first_round_inline=call.first_round_inline)


def _prefill_dispatch(x, ids, weights, call: Call):
    handle = prefill.plan_and_pack(x, ids, weights, num_experts=call.num_experts,
                                   axis_name=call.axis_name, rows_per_round=call.rows)
    return prefill.dispatch_round(handle, 0), handle


def _prefill_combine(out, handle):
    return prefill.weighted_sum(prefill.combine_round(handle, out, 0)).astype(out.dtype)


def _decode_layer(x, ids, weights, w: ExpertWeights, call: Call):
    return decode.decode_moe(x, ids, weights, lambda win: _window_experts(win, w),
                             num_experts=call.num_experts, axis_name=call.axis_name,
                             transport=call.transport, overflow=call.overflow,
                             first_round_inline=call.first_round_inline)


def _decode_dispatch(x, ids, weights, call: Call):
    return decode.dispatch(x, ids, weights, num_experts=call.num_experts,
                           axis_name=call.axis_name, transport=call.transport)


def _remote_experts(windows, w: ExpertWeights, platform: str | None = None) -> jax.Array:
    # the verbs' form lowers for JAX's default backend (the layer's, for the mesh's platform)
    return windows_swiglu_packed(windows, *w, platform=platform)


def _remote_layer(x, ids, weights, w: ExpertWeights, call: Call):
    return pallas_remote.pallas_prefill_moe(x, ids, weights,
                                            lambda win: _remote_experts(win, w, call.platform),
                                            num_experts=call.num_experts,
                                            axis_name=call.axis_name, rows_per_round=call.rows,
                                            platform=call.platform)


def _remote_dispatch(x, ids, weights, call: Call):
    handle = pallas_remote.plan_copies(x, ids, weights, num_experts=call.num_experts,
                                       axis_name=call.axis_name, rows_per_round=call.rows,
                                       platform=call.platform)
    return pallas_remote.dispatch(handle), handle


def _remote_combine(out, handle):
    return poison_rows(pallas_remote.combine(out, handle), handle.invalid).astype(out.dtype)


def _remote_decode_layer(x, ids, weights, w: ExpertWeights, call: Call):
    return pallas_decode.pallas_decode_moe(x, ids, weights,
                                           lambda win: _remote_experts(win, w, call.platform),
                                           num_experts=call.num_experts,
                                           axis_name=call.axis_name, rows=call.rows,
                                           platform=call.platform)


def _remote_decode_dispatch(x, ids, weights, call: Call):
    return pallas_decode.dispatch(x, ids, weights, num_experts=call.num_experts,
                                  axis_name=call.axis_name, rows=call.rows,
                                  platform=call.platform)


def _remote_decode_combine(out, handle):
    return poison_rows(pallas_decode.combine(out, handle), handle.invalid).astype(out.dtype)


# --- baselines --------------------------------------------------------------------------------


def _chained(dispatch, experts, combine):
    """The layer of a path whose whole run is its one round: dispatch, experts, combine."""
    def layer(x, ids, weights, w: ExpertWeights, call: Call):
        received, handle = dispatch(x, ids, weights, call)
        return combine(experts(received, w), handle)

    return layer


def _ragged_dispatch(x, ids, weights, call: Call):
    return ragged.dispatch(x, ids, weights, num_experts=call.num_experts,
                           axis_name=call.axis_name)


def _ragged_bounded_dispatch(x, ids, weights, call: Call):
    return ragged.dispatch(x, ids, weights, num_experts=call.num_experts,
                           axis_name=call.axis_name, recv_rows=call.rows)


def _ragged_experts(received, w: ExpertWeights):
    rows, sizes = received
    return grouped_swiglu(rows, sizes, *w)


def _capacity_dispatch(x, ids, weights, call: Call):
    # C = T by default: a token takes at most one slot of an expert (repeats folded), so
    # nothing drops
    return capacity.dispatch(x, ids, weights, num_experts=call.num_experts,
                             axis_name=call.axis_name, capacity=call.capacity)


def _capacity_experts(expert_in, w: ExpertWeights):
    dense = (as_dtype(a, expert_in.dtype) for a in w)
    return jax.vmap(swiglu)(expert_in, *dense)


def _allgather_dispatch(x, ids, weights, call: Call):
    return allgather.dispatch(x, ids, weights, num_experts=call.num_experts,
                              axis_name=call.axis_name)


def _baseline(name: str, dispatch, experts, combine, **fields) -> DispatchPath:
    """A baseline's entry: its implementation is its name, it has one form (no schedule), and
    its layer is its one round."""
    return DispatchPath(name, name, None, _chained(dispatch, experts, combine), dispatch,
                        experts, combine, **fields)

PATHS: dict[str, DispatchPath] = {p.name: p for p in (
    DispatchPath(
        "prefill", "relayfree", "prefill", _prefill_layer, _prefill_dispatch, _window_experts,
        _prefill_combine, frozenset({"schedule", "capacity_factor", "decode_threshold"}),
        drops=False,
        summary="relay-free prefill: counts exchanged, each copy written into its expert "
                "window, extra rounds under skew"),
    DispatchPath(
        "decode", "relayfree", "decode", _decode_layer, _decode_dispatch, _window_experts,
        decode.combine,
        frozenset({"schedule", "decode_threshold", "decode_overflow"}), drops=False,
        transports=("gather", "windows", "replicated"),
        summary="relay-free decode: 2*T*k window rows, bounded passes under skew"),
    DispatchPath(
        "relayfree_pallas", "relayfree_pallas", "prefill", _remote_layer, _remote_dispatch,
        _remote_experts, _remote_combine,
        frozenset({"schedule", "capacity_factor", "decode_threshold"}), drops=False,
        gradients=False, platforms=("tpu",),
        summary="relay-free prefill as TPU remote writes (Pallas): one DMA per copy from its "
                "token row into the expert window, no send buffer; extra rounds under skew"),
    DispatchPath(
        "relayfree_pallas_decode", "relayfree_pallas", "decode", _remote_decode_layer,
        _remote_decode_dispatch, _remote_experts, _remote_decode_combine,
        frozenset({"schedule", "capacity_factor", "decode_threshold"}), drops=False,
        # its fixed per-source regions hold more than the prefill form's window at every
        # size measured (DeepSeek-V3, 64 chips: 21.1 against 4.0 MiB at T=8, 83.9 against
        # 43.4 at T=128; docs/benchmarks.md), and what it saves, a count exchange, is time
        # no TPU here has measured: "auto" keeps the prefill form unless told a threshold
        gradients=False, platforms=("tpu",), auto=False,
        summary="relay-free decode as TPU remote writes (Pallas): fixed per-source regions, "
                "each sender's counts DMA'd after its data (no count exchange); extra rounds "
                "under skew"),
    _baseline(
        "ragged_baseline", _ragged_dispatch, _ragged_experts, ragged.combine,
        settings=frozenset(), drops=False,
        summary="MaxText-style: sort, one segment per peer, receiver re-sort, worst-case "
                "P*T*k receive buffer"),
    _baseline(
        "ragged_baseline_bounded", _ragged_bounded_dispatch, _ragged_experts, ragged.combine,
        settings=frozenset({"capacity_factor"}), drops=True, row_floor=1,
        summary="MaxText-style with a capacity_factor*T*k receive buffer: copies past it "
                "are dropped (counted)"),
    _baseline(
        "capacity_baseline", _capacity_dispatch, _capacity_experts, capacity.combine,
        settings=frozenset(), drops=False,
        summary="GShard-style [E, C, d] buffers with C = T, dense all_to_all"),
    _baseline(
        "allgather_baseline", _allgather_dispatch, _window_experts, allgather.combine,
        settings=frozenset(), drops=False,
        summary="tpu-inference / sglang-jax EP: all-gather the tokens, local experts on a "
                "P*T*k-row buffer, psum_scatter the partial sums back"),
)}

#: The values of ``DispatchConfig.implementation``, in table order.
IMPLEMENTATIONS: tuple[str, ...] = tuple(dict.fromkeys(p.implementation for p in PATHS.values()))


def path_settings(name: str) -> dict:
    """The ``DispatchConfig`` fields that select path ``name`` of :data:`PATHS`."""
    path = PATHS[name]
    return dict(implementation=path.implementation,
                **({"schedule": path.schedule} if path.schedule else {}))


@dataclasses.dataclass(frozen=True)
class Resolved:
    """What one layer call runs, decided once (:func:`resolve`).

    path: the :data:`PATHS` key; schedule: "prefill" / "decode" for relay-free (XLA or
    Pallas), None for a baseline; transport: the XLA decode schedule's transport as lowered
    for the mesh's platform (None otherwise); replicated: the batch stays on every device
    (``0 < N <`` token shards, XLA decode); tokens_per_rank: ``T``; rows: receive rows per round (:attr:`Call.rows`).
    """

    path: str
    schedule: str | None
    transport: str | None
    replicated: bool
    tokens_per_rank: int
    rows: int

    def call(self, config: DispatchConfig, num_experts: int) -> Call:
        """The :class:`Call` of this resolution under ``config``."""
        return Call(num_experts=num_experts, axis_name=config.axis, rows=self.rows,
                    transport="replicated" if self.replicated else "auto",
                    overflow=config.decode_overflow if self.schedule == "decode" else "branch",
                    first_round_inline=config.lowering.first_round_inline,
                    platform=config.layout.platform)


def resolve(config: DispatchConfig, num_tokens: int, k: int) -> Resolved:
    """The path, schedule, transport and receive rows of a layer call of ``num_tokens`` tokens
    (the global ``N``) with top-``k`` routing under ``config``. The one place the schedule is
    chosen: the layer, the API and the scripts' reports all read this."""
    lay = config.layout
    shards = lay.num_token_shards
    tokens = max(1, -(-num_tokens // shards))
    forms = {p.schedule: name for name, p in PATHS.items()
             if p.implementation == config.implementation}
    schedule = None
    if None not in forms:
        threshold = config.decode_threshold
        if threshold is None and not PATHS[forms["decode"]].auto:
            threshold = 0  # "auto" never picks that decode form by the platform's default
        schedule = select_schedule(tokens, config.schedule, threshold, platform=lay.platform)
    name = forms[schedule]
    path = PATHS[name]
    # a batch smaller than the token shards stays on every device: the XLA decode schedule's
    # "replicated" transport
    replicated = bool(path.transports) and 0 < num_tokens < shards
    transport = None
    if path.transports:
        # "auto" gathers on CPU, whose ranks are emulated devices (decode.decode_moe)
        transport = ("replicated" if replicated else "gather" if lay.platform == "cpu"
                     else decode.choose_transport(lay.num_ranks, k))
    rows = rows_per_round(tokens, k, lay.num_ranks, config.capacity_factor, path.row_floor)
    return Resolved(name, schedule, transport, replicated, tokens, rows)


__all__ = ["Call", "DispatchPath", "ExpertWeights", "IMPLEMENTATIONS", "PATHS", "Resolved",
           "path_settings", "resolve"]
