"""Public entry point: expert-parallel MoE over a mesh axis, schedule chosen by tokens per rank."""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moe_relayfree import baselines, decode, prefill
from moe_relayfree.experts import grouped_swiglu, swiglu
from moe_relayfree.plan import rows_per_round
from moe_relayfree.selection import Schedule, select_schedule
from moe_relayfree.windows import ExpertWindows

DEFAULT_CAPACITY_FACTOR = 2.0


def _validate(x, topk_ids, topk_weights, w_gate, w_up, w_down, num_ranks: int, axis: str):
    def shape(a):
        return tuple(np.shape(a))

    if len(shape(x)) != 2:
        raise ValueError(f"x must be [N, d], got shape {shape(x)}")
    n, d = shape(x)
    if len(shape(topk_ids)) != 2 or shape(topk_ids)[0] != n:
        raise ValueError(f"topk_ids must be [N={n}, k], got shape {shape(topk_ids)}")
    k = shape(topk_ids)[1]
    if shape(topk_weights) != (n, k):
        raise ValueError(f"topk_weights must be [N, k]={(n, k)}, got shape {shape(topk_weights)}")
    if not jnp.issubdtype(jnp.result_type(topk_ids), jnp.integer):
        raise ValueError(f"topk_ids must be an integer array, got {jnp.result_type(topk_ids)}")
    if len(shape(w_gate)) != 3 or shape(w_gate)[1] != d:
        raise ValueError(f"w_gate must be [E, d={d}, f], got shape {shape(w_gate)}")
    e, _, f = shape(w_gate)
    if shape(w_up) != (e, d, f):
        raise ValueError(f"w_up must be {(e, d, f)} like w_gate, got shape {shape(w_up)}")
    if shape(w_down) != (e, f, d):
        raise ValueError(f"w_down must be [E, f, d]={(e, f, d)}, got shape {shape(w_down)}")
    if n % num_ranks:
        raise ValueError(
            f"N={n} tokens is not divisible by the {num_ranks} ranks of mesh axis {axis!r}; "
            "pad the batch (MoELayer does this for you)"
        )
    if e % num_ranks:
        raise ValueError(f"E={e} experts is not divisible by the {num_ranks} ranks of axis {axis!r}")
    if k > e:
        raise ValueError(f"k={k} exceeds the number of experts E={e}")
    if not isinstance(topk_ids, jax.core.Tracer):
        _check_id_range(topk_ids, e)
    return n, k, e


def _check_id_range(topk_ids, num_experts: int) -> None:
    """Raises on out-of-range ids. Multi-process arrays are checked on this process's shards
    (every process checks its own, so a bad id anywhere raises somewhere)."""
    if isinstance(topk_ids, jax.Array) and not topk_ids.is_fully_addressable:
        pieces = [(np.asarray(s.data), s.index[0].start or 0) for s in topk_ids.addressable_shards]
    else:
        pieces = [(np.asarray(topk_ids), 0)]
    for ids, row0 in pieces:
        bad = (ids < 0) | (ids >= num_experts)
        if bad.any():
            t, j = np.argwhere(bad)[0]
            raise ValueError(
                f"topk_ids out of range [0, {num_experts}): topk_ids[{row0 + t}, {j}] = {ids[t, j]} "
                f"({int(bad.sum())} bad entries)"
            )


def _poison_invalid(topk_ids, topk_weights, num_experts: int):
    """Inside jit ids cannot raise: an out-of-range id makes its token's output NaN, never 0."""
    bad = (topk_ids < 0) | (topk_ids >= num_experts)
    w = jnp.where(bad.any(axis=1, keepdims=True), jnp.nan, topk_weights.astype(jnp.float32))
    return jnp.clip(topk_ids, 0, num_experts - 1).astype(jnp.int32), w


IMPLEMENTATIONS = ("relayfree", "ragged_baseline", "capacity_baseline")


def _per_rank(x, topk_ids, topk_weights, w_gate, w_up, w_down, *, axis, schedule, num_experts,
              rows, implementation):
    topk_ids, topk_weights = _poison_invalid(topk_ids, topk_weights, num_experts)
    common = dict(num_experts=num_experts, axis_name=axis)
    if implementation == "ragged_baseline":
        (grouped, sizes), handle = baselines.ragged.dispatch(x, topk_ids, topk_weights, **common)
        return baselines.ragged.combine(grouped_swiglu(grouped, sizes, w_gate, w_up, w_down), handle)
    if implementation == "capacity_baseline":
        expert_in, handle = baselines.capacity.dispatch(x, topk_ids, topk_weights, **common)
        out = jax.vmap(swiglu)(expert_in, w_gate, w_up, w_down)
        return baselines.capacity.combine(out, handle)

    def experts(win: ExpertWindows):
        return grouped_swiglu(win.rows, win.group_sizes, w_gate, w_up, w_down)

    if schedule == "decode":
        return decode.decode_moe(x, topk_ids, topk_weights, experts, **common)

    return prefill.prefill_moe(x, topk_ids, topk_weights, experts, rows_per_round=rows, **common)


@functools.lru_cache(maxsize=256)
def _sharded_fn(
    mesh: Mesh, axis: str, schedule: str, num_experts: int, rows: int, implementation: str
):
    tok, exp = P(axis), P(axis, None, None)
    body = functools.partial(
        _per_rank, axis=axis, schedule=schedule, num_experts=num_experts, rows=rows,
        implementation=implementation,
    )
    return jax.shard_map(
        body, mesh=mesh, in_specs=(tok, tok, tok, exp, exp, exp), out_specs=tok
    )


def _explicit(mesh: Mesh) -> bool:
    return any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)


def _place(a, mesh: Mesh, spec: P):
    sharding = NamedSharding(mesh, spec)
    if isinstance(a, jax.core.Tracer):
        if _explicit(mesh):
            return jax.sharding.reshard(a, sharding)
        return a  # under jit, shard_map reshards Auto-axis inputs itself
    if getattr(a, "sharding", None) == sharding:
        return a
    return jax.device_put(a, sharding)


def expert_parallel_moe(
    x: jax.Array,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    *,
    mesh: Mesh,
    axis: str = "ep",
    schedule: Schedule = "auto",
    capacity_factor: float | None = DEFAULT_CAPACITY_FACTOR,
    decode_threshold: int | None = None,
    implementation: str = "relayfree",
) -> jax.Array:
    """Relay-free expert-parallel MoE (routed experts only).

    Args:
      x: ``[N, d]`` tokens, sharded (or to be sharded) over ``axis``; N divisible by its size.
      topk_ids: ``[N, k]`` int global expert ids in ``[0, E)``, sharded like x.
      topk_weights: ``[N, k]`` routing weights, sharded like x.
      w_gate, w_up: ``[E, d, f]``; w_down: ``[E, f, d]``, sharded on E over ``axis``.
      mesh: the device mesh; ``axis`` names its expert-parallel axis.
      schedule: "prefill", "decode" or "auto" (decode when ``N / P <= decode_threshold``).
      capacity_factor: prefill receive rows per round = ``capacity_factor * T * k`` (T tokens per
        rank); skewed batches take extra rounds, never drop tokens. ``None``: worst-case buffer.
      decode_threshold: tokens per rank for "auto" (default: :func:`decode_threshold` of the
        mesh's platform).
      implementation: "relayfree" (this project), or for comparison "ragged_baseline"
        (MaxText-style sort / one segment per peer / receiver re-sort, worst-case buffer) or
        "capacity_baseline" (GShard-style masks, capacity T per expert so nothing drops);
        the baselines ignore ``schedule`` and ``capacity_factor``.

    Returns:
      ``[N, d]`` in x.dtype, with x's sharding (a plain array in gives a plain array out). Concrete out-of-range ids raise ``ValueError``;
      traced ones (inside jit) turn their token's output into NaN.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if axis not in mesh.axis_names:
        raise ValueError(f"mesh has no axis {axis!r} (axes: {mesh.axis_names})")
    num_ranks = mesh.shape[axis]
    n, k, num_experts = _validate(x, topk_ids, topk_weights, w_gate, w_up, w_down, num_ranks, axis)
    tokens = n // num_ranks
    resolved = select_schedule(tokens, schedule, decode_threshold,
                               platform=mesh.devices.flat[0].platform)
    rows = rows_per_round(tokens, k, num_ranks, capacity_factor)
    fn = _sharded_fn(mesh, axis, resolved, num_experts, rows, implementation)
    tok, exp = P(axis), P(axis, None, None)
    args = [_place(a, mesh, tok) for a in (x, topk_ids, topk_weights)]
    args += [_place(a, mesh, exp) for a in (w_gate, w_up, w_down)]
    if any(isinstance(a, jax.core.Tracer) for a in args):
        y = fn(*args)
        if isinstance(x, jax.core.Tracer) and _explicit(mesh):
            y = jax.sharding.reshard(y, NamedSharding(mesh, jax.typeof(x).sharding.spec))
        return y
    y = _jitted(fn)(*args)
    sharding = getattr(x, "sharding", None)
    return y if sharding is None or sharding == y.sharding else jax.device_put(y, sharding)


@functools.lru_cache(maxsize=256)
def _jitted(fn):
    return jax.jit(fn)


def auto_mesh(mesh: Mesh) -> Mesh:
    """The same devices and axis names with every axis Auto."""
    auto = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
    if tuple(mesh.axis_types) == auto:
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=auto)


def make_ep_mesh(num_devices: int | None = None, axis: str = "ep", devices=None) -> Mesh:
    """A 1-D expert-parallel mesh with an Auto axis (the default ``jax.make_mesh`` axis is
    Explicit, whose sharding types then propagate into the surrounding model code)."""
    devices = list(devices if devices is not None else jax.devices())
    if num_devices is not None:
        if num_devices > len(devices):
            raise ValueError(f"asked for {num_devices} devices, {len(devices)} available")
        devices = devices[:num_devices]
    return jax.make_mesh((len(devices),), (axis,), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))
