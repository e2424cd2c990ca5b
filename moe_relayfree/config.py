"""One dispatch configuration: where an MoE layer lies on the mesh and which schedule runs.

A :class:`DispatchConfig` is built once (from a script's command line, or by hand), validated
when it is made, and carried unchanged from the model to every MoE layer to
:func:`~moe_relayfree.expert_parallel_moe`; it is frozen and hashable, and keys the compiled
programs' cache.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Literal

from jax.sharding import Mesh

from moe_relayfree.layout import AxisNames, MeshLayout, auto_mesh, make_layout

Schedule = Literal["auto", "prefill", "decode"]
# the implementations are the table of paths' (moe_relayfree.paths.IMPLEMENTATIONS)
Implementation = str
Overflow = Literal["branch", "one_pass"]

SCHEDULES: tuple[str, ...] = ("auto", "prefill", "decode")
OVERFLOWS: tuple[str, ...] = ("branch", "one_pass")
DEFAULT_CAPACITY_FACTOR = 2.0


def _one_of(value, allowed: tuple[str, ...], name: str) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Lowering:
    """How programs are lowered: choices that change a compiled program, never its results.
    Part of :class:`DispatchConfig`, so of every compiled program's cache key (a module global
    read at trace time was not: changing it after a first call kept the old program).

    dense_min_rows: bf16 dense projections on XLA:CPU run with at least this many rows per
      device (:func:`moe_relayfree.ffn.dense_dot`: one row is a matrix-vector product, for
      which XLA:CPU widened the whole matrix to f32 on every call); 1 turns the padding off.
    first_round_inline: platforms (as ``lax.platform_dependent`` names them) that run the
      prefill schedule's round 0 before its rounds' loop (:func:`moe_relayfree.prefill.prefill_moe`);
      every other platform runs all rounds as one loop body.
    """

    dense_min_rows: int = 2
    first_round_inline: tuple[str, ...] = ("cpu",)

    def __post_init__(self):
        if isinstance(self.dense_min_rows, bool) or not isinstance(self.dense_min_rows, int) \
                or self.dense_min_rows < 1:
            raise ValueError(f"dense_min_rows must be an int >= 1, got {self.dense_min_rows!r}")
        if isinstance(self.first_round_inline, str):
            raise ValueError("first_round_inline must be a tuple of platform names, got the "
                             f"string {self.first_round_inline!r}")
        object.__setattr__(self, "first_round_inline", tuple(self.first_round_inline))


@dataclasses.dataclass(frozen=True)
class DispatchConfig:
    """How an MoE layer dispatches its tokens.

    Layout (see :mod:`moe_relayfree.layout`):
      mesh: the device mesh, any number of axes.
      axis: the expert axis; every collective runs over it alone.
      batch_axes: axes the tokens are split over, the expert axis included (default: every
        axis but ``tensor_axis``); normalised to a tuple.
      tensor_axis: optional axis splitting each expert's width ``f``.

    Schedule:
      schedule: "prefill", "decode" or "auto" (decode at or below ``decode_threshold`` tokens
        per device).
      implementation: "relayfree" (this project), "relayfree_pallas" (the same as TPU
        remote writes in Pallas; interpreted on CPU, for tests), or for comparison
        "ragged_baseline" (MaxText-style sort, one segment per peer, receiver re-sort,
        worst-case receive buffer), "ragged_baseline_bounded" (the same with a
        ``capacity_factor * T * k``-row receive buffer: copies past it are DROPPED, as MaxText
        does; :func:`moe_relayfree.baselines.ragged.dropped_copies` counts them),
        "capacity_baseline" (GShard-style capacity buffers, ``C = T`` so nothing drops) or
        "allgather_baseline" (tpu-inference's and sglang-jax's EP: every token all-gathered,
        partial sums reduce-scattered back); the baselines ignore ``schedule`` and the
        decode settings, and all but the bounded one ``capacity_factor``.
      capacity_factor: prefill receive rows per round, ``capacity_factor * T * k``; skewed
        batches take extra rounds, never drop a token. ``None``: the worst-case buffer.
      decode_threshold: tokens per device for "auto" (default: the platform's,
        :func:`moe_relayfree.decode_threshold`; "relayfree_pallas" takes its decode form
        under "auto" only when this is set: ``paths.DispatchPath.auto``).
      decode_overflow: the decode schedule's rows past the usual ``2*T*k``: "branch" (more
        expert calls only on a rank that received more) or "one_pass" (every worst-case row
        in one call, no conditional); see :func:`moe_relayfree.decode.decode_moe`.
      lowering: :class:`Lowering`, how the programs are lowered (not what they compute).

    Each implementation is one entry of :data:`moe_relayfree.paths.PATHS`.
    """

    mesh: Mesh
    axis: str = "ep"
    batch_axes: tuple[str, ...] | None = None
    tensor_axis: str | None = None
    schedule: Schedule = "auto"
    implementation: Implementation = "relayfree"
    capacity_factor: float | None = DEFAULT_CAPACITY_FACTOR
    decode_threshold: int | None = None
    decode_overflow: Overflow = "branch"
    lowering: Lowering = Lowering()

    def __post_init__(self):
        if not isinstance(self.mesh, Mesh):
            raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(self.mesh).__name__}")
        lay = make_layout(self.mesh, self.axis, self.batch_axes, self.tensor_axis)
        object.__setattr__(self, "batch_axes", lay.batch_axes)
        _one_of(self.schedule, SCHEDULES, "schedule")
        from moe_relayfree.paths import IMPLEMENTATIONS  # the table imports the schedules

        _one_of(self.implementation, IMPLEMENTATIONS, "implementation")
        _one_of(self.decode_overflow, OVERFLOWS, "decode_overflow")
        factor = self.capacity_factor
        if factor is not None and (isinstance(factor, bool) or not isinstance(factor, numbers.Real)
                                   or not 0 < factor < math.inf):
            raise ValueError(f"capacity_factor must be a positive finite number, or None for the "
                             f"worst-case buffer, got {factor!r}")
        threshold = self.decode_threshold
        if threshold is not None and (isinstance(threshold, bool)
                                      or not isinstance(threshold, numbers.Integral)
                                      or threshold < 0):
            raise ValueError(f"decode_threshold must be an int >= 0 (tokens per device) or None, "
                             f"got {threshold!r}")
        if not isinstance(self.lowering, Lowering):
            raise ValueError(f"lowering must be a Lowering, got {type(self.lowering).__name__}")

    @property
    def layout(self) -> MeshLayout:
        """The mesh's axis roles."""
        return MeshLayout(self.mesh, self.axis, self.batch_axes, self.tensor_axis)

    @property
    def relayfree(self) -> bool:
        return self.implementation == "relayfree"

    def replace(self, **changes) -> DispatchConfig:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    def with_auto_mesh(self) -> DispatchConfig:
        """The same config on the mesh with every axis Auto (what models run on)."""
        mesh = auto_mesh(self.mesh)
        return self if mesh is self.mesh else self.replace(mesh=mesh)


FIELDS = frozenset(f.name for f in dataclasses.fields(DispatchConfig))


def dispatch_config(config: DispatchConfig | None = None, **settings) -> DispatchConfig:
    """``config`` with ``settings`` (field names of :class:`DispatchConfig`) applied, or a new
    one from ``settings`` (``mesh`` required). ``None`` values of settings mean "not given"
    only for ``mesh``; pass every other field as you mean it."""
    unknown = set(settings) - FIELDS
    if unknown:
        raise TypeError(f"unknown dispatch settings {sorted(unknown)}; known: {sorted(FIELDS)}")
    if settings.get("mesh", 1) is None:
        del settings["mesh"]
    if config is None:
        if "mesh" not in settings:
            raise ValueError("give a DispatchConfig or a mesh")
        return DispatchConfig(**settings)
    if not isinstance(config, DispatchConfig):
        raise ValueError(f"config must be a DispatchConfig, got {type(config).__name__}")
    return config.replace(**settings) if settings else config


__all__ = ["AxisNames", "DEFAULT_CAPACITY_FACTOR", "DispatchConfig", "Lowering", "OVERFLOWS",
           "SCHEDULES", "dispatch_config"]
