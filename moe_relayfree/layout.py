"""How an MoE layer lies on a device mesh: which axes split tokens, experts and expert width.

A mesh as users have it has several axes (``data``, ``fsdp``, ``ep``, ``tensor``; any names).
Expert parallelism needs three roles from them:

* the **expert axis** (``axis``): experts are split over it; every collective of a schedule
  runs over it alone, so each slice of the mesh along the other axes is an independent
  expert-parallel group of ``P = mesh.shape[axis]`` ranks;
* the **batch axes**: tokens are split over all of them together, the expert axis included
  (a device holds ``N / prod(batch axis sizes)`` tokens; no device repeats another's work);
* an optional **tensor axis**: each expert's hidden width ``f`` is split over it, tokens are
  replicated over it, and the partial outputs are summed (one ``psum`` of ``[T, d]`` after
  combine, which is linear in the expert outputs, so the sum can wait until then).

Any remaining axis replicates both tokens and experts (the same work twice): allowed, but
only when the caller says so by leaving it out of ``batch_axes``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AxisNames = str | Sequence[str]


def _names(axes: Sequence[str]) -> str:
    return ", ".join(repr(a) for a in axes)


def _one_axis(mesh: Mesh, name, role: str) -> str:
    if not isinstance(name, str):
        raise ValueError(
            f"{role} must be one mesh axis name, got {name!r} "
            f"(mesh axes: {_names(mesh.axis_names)}); tokens are split over several axes with "
            "batch_axes=(...)"
        )
    if name not in mesh.axis_names:
        raise ValueError(
            f"mesh has no axis {name!r} for {role} (mesh axes: {_names(mesh.axis_names)})")
    return name


@dataclasses.dataclass(frozen=True)
class MeshLayout:
    """Roles of a mesh's axes for one MoE layer (hashable: compiled programs are cached on it).

    Build with :func:`make_layout`; ``batch_axes`` keeps the caller's order, which is the order of
    the token shards (``P(batch_axes)``).
    """

    mesh: Mesh
    axis: str
    batch_axes: tuple[str, ...]
    tensor_axis: str | None = None

    @property
    def num_ranks(self) -> int:
        """Ranks of one expert-parallel group (the expert axis size)."""
        return self.mesh.shape[self.axis]

    @property
    def num_token_shards(self) -> int:
        """Devices the tokens are split over (product of the batch axis sizes)."""
        return math.prod(self.mesh.shape[a] for a in self.batch_axes)

    @property
    def tensor_size(self) -> int:
        return 1 if self.tensor_axis is None else self.mesh.shape[self.tensor_axis]

    @property
    def tokens(self) -> P:
        """Spec of ``[N, ...]`` token arrays (x, ids, weights, output)."""
        return P(self.batch_axes if len(self.batch_axes) > 1 else self.batch_axes[0])

    @property
    def w_in(self) -> P:
        """Spec of ``w_gate`` / ``w_up`` ``[E, d, f]``."""
        return P(self.axis, None, self.tensor_axis)

    @property
    def w_out(self) -> P:
        """Spec of ``w_down`` ``[E, f, d]``."""
        return P(self.axis, self.tensor_axis, None)

    def check_experts(self, num_experts: int, d_ff: int) -> None:
        """Raises unless ``num_experts`` splits over the expert axis and ``d_ff`` over the
        tensor axis."""
        if num_experts % self.num_ranks:
            raise ValueError(f"E={num_experts} experts is not divisible by the {self.num_ranks} "
                             f"ranks of axis {self.axis!r}")
        if d_ff % self.tensor_size:
            raise ValueError(f"f={d_ff} is not divisible by the {self.tensor_size} ranks of "
                             f"tensor_axis {self.tensor_axis!r}")

    def sharding(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    @property
    def platform(self) -> str:
        return self.mesh.devices.flat[0].platform


def make_layout(mesh: Mesh, axis: str = "ep", batch_axes: AxisNames | None = None,
           tensor_axis: str | None = None) -> MeshLayout:
    """Checks the roles against ``mesh`` and returns them.

    batch_axes: axes the tokens are split over; default every mesh axis but ``tensor_axis``,
    in mesh order. Must include ``axis`` (tokens replicated over the expert axis would be
    dispatched once per rank).
    """
    axis = _one_axis(mesh, axis, "axis (the expert axis)")
    if tensor_axis is not None:
        tensor_axis = _one_axis(mesh, tensor_axis, "tensor_axis")
        if tensor_axis == axis:
            raise ValueError(f"tensor_axis and the expert axis are both {axis!r}")
    if batch_axes is None:
        batch = tuple(a for a in mesh.axis_names if a != tensor_axis)
    else:
        batch = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
        for a in batch:
            _one_axis(mesh, a, "batch_axes entry")
        if len(set(batch)) != len(batch):
            raise ValueError(f"batch_axes repeats an axis: {batch}")
    if axis not in batch:
        raise ValueError(
            f"batch_axes {batch} must include the expert axis {axis!r}: each expert-parallel "
            "rank dispatches its own share of the tokens"
        )
    if tensor_axis is not None and tensor_axis in batch:
        raise ValueError(f"tensor_axis {tensor_axis!r} cannot also be a batch axis")
    return MeshLayout(mesh, axis, batch, tensor_axis)


def auto_mesh(mesh: Mesh) -> Mesh:
    """The same devices and axis names with every axis Auto."""
    auto = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
    if tuple(mesh.axis_types) == auto:
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=auto)


def make_mesh(shape: dict[str, int] | None = None, devices=None) -> Mesh:
    """A mesh with Auto axes from ``{name: size}`` in order, e.g. ``{"data": 2, "ep": 4}``.

    ``None``: a 1-D ``ep`` mesh over all devices. Sizes must multiply to the device count
    (of ``devices``, default all). (Auto axes: the default ``jax.make_mesh`` axis is
    Explicit, whose sharding types then propagate into the surrounding model code.)
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = dict(shape) if shape else {"ep": len(devices)}
    if any(int(s) < 1 for s in shape.values()):
        raise ValueError(f"mesh axis sizes must be >= 1, got {shape}")
    total = math.prod(shape.values())
    if total != len(devices):
        raise ValueError(f"mesh {shape} has {total} devices, {len(devices)} available")
    return jax.make_mesh(tuple(shape.values()), tuple(shape), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,ep=4"`` -> ``{"data": 2, "ep": 4}`` (command-line form of :func:`make_mesh`)."""
    shape = {}
    for part in text.split(","):
        name, eq, size = part.strip().partition("=")
        if not eq or not name or not size.strip().isdigit():
            raise ValueError(f"mesh must look like 'data=2,ep=4', got {text!r}")
        if name in shape:
            raise ValueError(f"mesh axis {name!r} given twice in {text!r}")
        shape[name] = int(size)
    return shape


def make_ep_mesh(num_devices: int | None = None, axis: str = "ep", devices=None) -> Mesh:
    """A 1-D expert-parallel mesh with an Auto axis over the first ``num_devices`` devices."""
    devices = list(devices if devices is not None else jax.devices())
    if num_devices is not None:
        if num_devices > len(devices):
            raise ValueError(f"asked for {num_devices} devices, {len(devices)} available")
        devices = devices[:num_devices]
    return make_mesh({axis: len(devices)}, devices)
