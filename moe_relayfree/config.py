"""One dispatch configuration: where an MoE layer lies on the mesh and which schedule runs.

A :class:`DispatchConfig` is built once (from a script's command line, or by hand), validated
when it is made, and carried unchanged from the model to every MoE layer to
:func:`~moe_relayfree.expert_parallel_moe`; it is frozen and hashable, and keys the compiled
programs' cache.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from jax.sharding import Mesh

from moe_relayfree.layout import AxisNames, MeshLayout, auto_mesh, make_layout

Schedule = Literal["auto", "prefill", "decode"]
Implementation = Literal["relayfree", "ragged_baseline", "ragged_baseline_bounded",
                         "capacity_baseline"]
Overflow = Literal["branch", "one_pass"]

SCHEDULES: tuple[str, ...] = ("auto", "prefill", "decode")
IMPLEMENTATIONS: tuple[str, ...] = ("relayfree", "ragged_baseline", "ragged_baseline_bounded",
                                    "capacity_baseline")
OVERFLOWS: tuple[str, ...] = ("branch", "one_pass")
DEFAULT_CAPACITY_FACTOR = 2.0


def _one_of(value, allowed: tuple[str, ...], name: str) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


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
      implementation: "relayfree" (this project), or for comparison "ragged_baseline"
        (MaxText-style sort, one segment per peer, receiver re-sort, worst-case receive
        buffer), "ragged_baseline_bounded" (the same with a ``capacity_factor * T * k``-row
        receive buffer: copies past it are DROPPED, as MaxText does;
        :func:`moe_relayfree.baselines.ragged.dropped_copies` counts them) or
        "capacity_baseline" (GShard-style capacity buffers, ``C = T`` so nothing drops); the
        baselines ignore ``schedule`` and the decode settings, and all but the bounded one
        ``capacity_factor``.
      capacity_factor: prefill receive rows per round, ``capacity_factor * T * k``; skewed
        batches take extra rounds, never drop a token. ``None``: the worst-case buffer.
      decode_threshold: tokens per device for "auto" (default: the platform's,
        :func:`moe_relayfree.decode_threshold`).
      decode_overflow: the decode schedule's rows past the usual ``2*T*k``: "branch" (more
        expert calls only on a rank that received more) or "one_pass" (every worst-case row
        in one call, no conditional); see :func:`moe_relayfree.decode.decode_moe`.
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

    def __post_init__(self):
        if not isinstance(self.mesh, Mesh):
            raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(self.mesh).__name__}")
        lay = make_layout(self.mesh, self.axis, self.batch_axes, self.tensor_axis)
        object.__setattr__(self, "batch_axes", lay.batch_axes)
        _one_of(self.schedule, SCHEDULES, "schedule")
        _one_of(self.implementation, IMPLEMENTATIONS, "implementation")
        _one_of(self.decode_overflow, OVERFLOWS, "decode_overflow")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(
                f"capacity_factor must be positive or None, got {self.capacity_factor}")
        if self.decode_threshold is not None and self.decode_threshold < 0:
            raise ValueError(f"decode_threshold must be >= 0, got {self.decode_threshold}")

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


__all__ = ["AxisNames", "DEFAULT_CAPACITY_FACTOR", "DispatchConfig", "IMPLEMENTATIONS",
           "OVERFLOWS", "SCHEDULES", "dispatch_config"]
