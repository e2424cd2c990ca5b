"""Deviceless ahead-of-time compiles for TPU topologies: the real XLA:TPU program of an MoE
layer, and its per-device memory and collectives, on a machine with no TPU (whole model steps:
``moe_relayfree_models.tools.aot``, built on this module).

Needs ``libtpu`` (``pip install -e ".[tpu]"``); nothing runs, only compiles:

    mesh = tpu_mesh("v5p:4x4x4")                       # 64 compile-only chips, axis "ep"
    config = mr.DispatchConfig(mesh, schedule="auto")
    report = layer_report(config, LAYER_SHAPES["deepseek-v3"], tokens_per_device=128)
    report["memory"]["temp"], report["collectives"], report["schedule"]

``memory`` is ``compiled.memory_analysis()`` per device (exact for the compiled program: the
same numbers on every run), with ``peak_temp``: the temporaries live at XLA's peak.
Collectives come from the compiled HLO; the bytes a ragged all-to-all really moves depend on
the routing, and are given for uniform routing (``T*k`` copies a rank sends, as many it
receives, ``(P-1)/P`` of them to other ranks).
"""

from __future__ import annotations

import dataclasses
import re
import time

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moe_relayfree.tools import analysis
from moe_relayfree.api import expert_parallel_moe
from moe_relayfree.pallas_remote import row_layout
from moe_relayfree.config import DispatchConfig
from moe_relayfree.layout import make_mesh
from moe_relayfree.plan import overflow_probability
from moe_relayfree.paths import resolve

MiB = 2**20
# v5p: 95 GiB of HBM per chip (the serving-space search's budget)
HBM_BYTES = {"v5p": 95 * 2**30, "v5e": 16 * 2**30, "v6e": 32 * 2**30, "v4": 32 * 2**30}


@dataclasses.dataclass(frozen=True)
class LayerShapes:
    """One MoE layer's routed experts: ``E`` experts, top-``k``, model width ``d``, expert
    width ``f``, parameter and activation dtype."""

    num_experts: int
    k: int
    d_model: int
    d_ff: int
    dtype: str = "bfloat16"


LAYER_SHAPES = {
    "deepseek-v3": LayerShapes(256, 8, 7168, 2048),
    "qwen3-235b-a22b": LayerShapes(128, 8, 4096, 1536),
}


def tpu_devices(topology: str) -> list:
    """Compile-only devices of a TPU topology, e.g. ``"v5p:4x4x4"`` (64 chips)."""
    import os

    from jax.experimental import topologies

    # libtpu takes a machine-wide lock on load; compiles need no device, so allow several
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as e:  # no libtpu, or a name libtpu does not know
        raise RuntimeError(f"cannot describe TPU topology {topology!r} ({e}); deviceless TPU "
                           "compiles need libtpu: pip install -e '.[tpu]'") from e
    return list(desc.devices)


def tpu_mesh(topology: str, axes: dict[str, int] | None = None) -> Mesh:
    """A mesh with Auto axes over a topology's compile-only devices (default: one ``ep`` axis
    over all of them). Axes that do not follow the chips' physical axes (``data=2`` on a
    ``8x8x4`` torus) split them."""
    from jax.experimental import mesh_utils

    devices = tpu_devices(topology)
    try:
        return make_mesh(axes or {"ep": len(devices)}, devices=devices)
    except (ValueError, NotImplementedError):
        shape = tuple(axes.values())
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(grid, tuple(axes), axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def shape_struct(shape, dtype, mesh: Mesh, spec: P) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=NamedSharding(mesh, spec))


# the official FP8 checkpoints' blocks (DeepSeek-V3, Qwen3): square, so the same for the
# transposed matrices the layer holds
FP8_BLOCK = (128, 128)


def layer_inputs(config: DispatchConfig, shapes: LayerShapes, tokens_per_device: int,
                 fp8_block: tuple[int, int] | None = None):
    """Abstract ``expert_parallel_moe`` inputs: x ``[N, d]``, ids / weights ``[N, k]``, and the
    expert stacks, placed as the layer places them (``N = T * token shards``); ``fp8_block``:
    the stacks as :class:`~moe_relayfree.quant.BlockQuantized` (FP8 values, f32 block scales)."""
    from moe_relayfree.quant import FP8, BlockQuantized, scale_shape

    lay, mesh = config.layout, config.mesh
    n = tokens_per_device * lay.num_token_shards
    e, k, d, f, dt = shapes.num_experts, shapes.k, shapes.d_model, shapes.d_ff, shapes.dtype

    def stack(shape, spec):
        if fp8_block is None:
            return shape_struct(shape, dt, mesh, spec)
        return BlockQuantized(shape_struct(shape, FP8, mesh, spec),
                              shape_struct(scale_shape(shape, fp8_block), jnp.float32, mesh, spec),
                              fp8_block)

    return [shape_struct((n, d), dt, mesh, lay.tokens), shape_struct((n, k), jnp.int32, mesh, lay.tokens),
            shape_struct((n, k), jnp.float32, mesh, lay.tokens),
            stack((e, d, f), lay.w_in), stack((e, d, f), lay.w_in), stack((e, f, d), lay.w_out)]


def memory(compiled) -> dict:
    """Per-device bytes of a compiled program (``memory_analysis()``)."""
    m = compiled.memory_analysis()
    out = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
           "temp": m.temp_size_in_bytes, "alias": m.alias_size_in_bytes,
           "code": m.generated_code_size_in_bytes}
    # what the step holds at once: inputs, temporaries, and outputs not written over an input
    out["total"] = out["argument"] + out["temp"] + out["output"] - out["alias"]
    # XLA's peak of live bytes over the program, and the temporaries at that peak. On XLA:TPU
    # temp_size_in_bytes can exceed the latter by buffers that are never live together: with
    # the Pallas path's kernels (aliased outputs, remote-written buffers) by the returned
    # buffer and an f32 [T, d] (DeepSeek-V3, T=128, v5p-64: 64.3 MiB against 45.6 at the peak)
    peak = getattr(m, "peak_memory_in_bytes", None)
    out["peak"] = peak
    out["peak_temp"] = (peak - out["argument"] - out["output"] + out["alias"]
                        if peak else None)
    return out


def collective_rows(text: str, num_ranks: int, copies_per_rank: int | None) -> list[dict]:
    """The compiled program's collectives: op, the computation it is in (a schedule's rounds
    are one loop body, run once in the usual case), the data buffer's shape and bytes,
    and ``moved_bytes``: what one device puts on the wire (an all-gather's
    or all-to-all's ``(P-1)/P`` of its buffer, twice that for an all-reduce; a ragged
    all-to-all's valid rows under uniform routing, ``copies_per_rank`` rows of its buffer)."""
    rows = []
    share = (num_ranks - 1) / num_ranks
    for c in analysis.compiled_collectives(text):
        buf = c.buffer
        moved = buf.nbytes * share
        if c.op == "all_reduce":
            moved *= 2
        if c.op == "ragged_all_to_all":
            rows_total = min(b.shape[0] for b in (c.operands[:2] or (buf,)))
            valid = rows_total if copies_per_rank is None else min(rows_total, copies_per_rank)
            moved = valid * (buf.nbytes // max(1, buf.shape[0])) * share
        rows.append({"op": c.op, "computation": c.computation, "shape": list(buf.shape),
                     "dtype": buf.dtype, "buffer_bytes": buf.nbytes,
                     "output_shape": list(c.result[0].shape) if c.result else [],
                     "moved_bytes": int(moved)})
    return rows


def receive_rows(collectives: list[dict]) -> int | None:
    """The largest ragged all-to-all's output rows (:func:`collective_rows`): a rank's receive
    buffer per round; ``None`` where the program has none."""
    return max((c["output_shape"][0] for c in collectives if c["op"] == "ragged_all_to_all"),
               default=None)


def compile_or_oom(lowered):
    """(compiled, None), or (None, the compiler's message) where XLA:TPU refuses the program
    for exceeding the chip's HBM (it says how much its temporaries need)."""
    try:
        return lowered.compile(), None
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return None, str(e).splitlines()[0]


def oom_report(message: str, seconds: float) -> dict:
    import re

    needed = re.search(r"temporaries \(([\d.]+)G\)", message)
    gib = float(needed.group(1)) if needed else None
    return {"memory": {"temp": None if gib is None else int(gib * 2**30)}, "collectives": [],
            "oom": message, "compile_s": round(seconds, 2)}


def layer_report(config: DispatchConfig, shapes: LayerShapes, tokens_per_device: int,
                 fp8_block: tuple[int, int] | None = None) -> dict:
    """Compiles one MoE layer (``expert_parallel_moe``) for ``config``'s mesh and reports its
    per-device memory, collectives, the schedule "auto" resolves to and the compile time
    (``fp8_block``: FP8 expert weights, see :func:`layer_inputs`). ``overflow``: under
    uniform routing, how often a rank of the expert-parallel group receives more copies than
    the ragged all-to-all's ``recv_rows`` in one call (``plan.overflow_probability``):
    relay-free then runs another round, the bounded baseline drops them. A program XLA:TPU refuses
    for the chip's HBM is reported with ``oom`` (the compiler's message) and the temporaries
    it said it needs."""
    lay = config.layout
    args = layer_inputs(config, shapes, tokens_per_device, fp8_block)
    fn = jax.jit(lambda *a: expert_parallel_moe(*a, config))
    start = time.perf_counter()
    compiled, oom = compile_or_oom(fn.lower(*args))
    seconds = time.perf_counter() - start
    head = {"topology": topology_name(config.mesh), "mesh": dict(config.mesh.shape),
            "implementation": config.implementation, "schedule": config.schedule,
            "tokens_per_device": tokens_per_device, "capacity_factor": config.capacity_factor,
            "shapes": dataclasses.asdict(shapes),
            "experts": "fp8" if fp8_block else shapes.dtype}
    if oom:
        return dict(head, resolved_schedule=None, **oom_report(oom, seconds))
    text = compiled.as_text()
    copies = tokens_per_device * shapes.k
    resolved = resolve(config, tokens_per_device * lay.num_token_shards, shapes.k).schedule
    collectives = collective_rows(text, lay.num_ranks, copies)
    recv = receive_rows(collectives)
    # the receive buffer's rows against what uniform routing sends the group's ranks
    overflow = None if recv is None else overflow_probability(
        tokens_per_device * lay.num_ranks, shapes.num_experts, lay.num_ranks, shapes.k,
        recv)._asdict()
    return {
        **head, "resolved_schedule": resolved, "memory": memory(compiled),
        "collectives": collectives, "recv_rows": recv, "overflow": overflow,
        "ragged_dot": "ragged-dot" in text or "ragged_dot" in text,
        # Mosaic kernels (the Pallas path's) and XLA's own custom calls
        "custom_calls": sorted(set(re.findall(r'custom_call_target="([^"]+)"', text))),
        # instructions gathering the tokens into [T*k, ...] rows: the XLA path's send buffer
        "send_gathers": sum(1 for line in text.splitlines()
                            if re.search(rf"= (bf16|f16|f32|f8\w*)\[{copies},", line)
                            and "gather" in line),
        "f32_row_layout": f32_row_layout(text, shapes),
        "compile_s": round(seconds, 2),
    }


def f32_row_layout(text: str, shapes: LayerShapes) -> int:
    """Instructions of a compiled program ``text`` whose result is f32 in the Pallas path's
    DMA row layout ``[..., s, d/s]`` (bf16: s = 2; 0 where rows are not split): there, rows
    widened before they were relaid, each buffer twice the bf16 rows' bytes. Counted by
    shape, so an f32 array with those trailing dims for another reason counts too (the XLA
    path's FP8 decode program has one at tests/aot_worker.py's widths)."""
    sub, lanes = row_layout(shapes.d_model, jnp.dtype(shapes.dtype))
    if sub == 1:
        return 0
    pattern = re.compile(rf"= f32\[(\d+,)*{sub},{lanes}\]")
    return sum(1 for line in text.splitlines() if pattern.search(line))


def topology_name(mesh: Mesh) -> str:
    d = mesh.devices.flat[0]
    return f"{getattr(d, 'device_kind', d.platform)} x{mesh.devices.size}"


def markdown(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A markdown table of ``rows`` (reports), ``columns`` as (header, dotted key)."""
    def get(row, key):
        for part in key.split("."):
            row = row.get(part) if isinstance(row, dict) else None
        if isinstance(row, float):
            return f"{row:.1f}"
        return "" if row is None else str(row)

    head = "| " + " | ".join(h for h, _ in columns) + " |"
    rule = "|" + "---|" * len(columns)
    body = ["| " + " | ".join(get(r, k) for _, k in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def mib(n: float) -> float:
    return round(n / MiB, 1)


__all__ = ["FP8_BLOCK", "HBM_BYTES", "LAYER_SHAPES", "LayerShapes", "collective_rows",
           "compile_or_oom", "layer_inputs", "layer_report", "markdown", "memory", "mib",
           "oom_report", "receive_rows", "shape_struct", "topology_name", "tpu_devices",
           "tpu_mesh"]
