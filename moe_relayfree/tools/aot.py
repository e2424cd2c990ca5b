"""Deviceless ahead-of-time compiles for TPU topologies: the real XLA:TPU program of an MoE
layer or a whole model step, and its per-device memory and collectives, on a machine with no
TPU.

Needs ``libtpu`` (``pip install -e ".[tpu]"``); nothing runs, only compiles:

    mesh = tpu_mesh("v5p:4x4x4")                       # 64 compile-only chips, axis "ep"
    config = mr.DispatchConfig(mesh, schedule="auto")
    report = layer_report(config, LAYER_SHAPES["deepseek-v3"], tokens_per_device=128)
    report["memory"]["temp"], report["collectives"], report["schedule"]

``memory`` is ``compiled.memory_analysis()`` per device (exact for the compiled program: the
same numbers on every run). Collectives come from the compiled HLO; the bytes a ragged
all-to-all really moves depend on the routing, and are given for uniform routing
(``T*k`` copies a rank sends, as many it receives, ``(P-1)/P`` of them to other ranks).
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moe_relayfree.tools import analysis
from moe_relayfree.api import expert_parallel_moe
from moe_relayfree.config import DispatchConfig
from moe_relayfree.layout import make_mesh
from moe_relayfree.plan import overflow_probability
from moe_relayfree.selection import select_schedule

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


def _struct(shape, dtype, mesh: Mesh, spec: P) -> jax.ShapeDtypeStruct:
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
            return _struct(shape, dt, mesh, spec)
        return BlockQuantized(_struct(shape, FP8, mesh, spec),
                              _struct(scale_shape(shape, fp8_block), jnp.float32, mesh, spec),
                              fp8_block)

    return [_struct((n, d), dt, mesh, lay.tokens), _struct((n, k), jnp.int32, mesh, lay.tokens),
            _struct((n, k), jnp.float32, mesh, lay.tokens),
            stack((e, d, f), lay.w_in), stack((e, d, f), lay.w_in), stack((e, f, d), lay.w_out)]


def memory(compiled) -> dict:
    """Per-device bytes of a compiled program (``memory_analysis()``)."""
    m = compiled.memory_analysis()
    out = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
           "temp": m.temp_size_in_bytes, "alias": m.alias_size_in_bytes,
           "code": m.generated_code_size_in_bytes}
    # what the step holds at once: inputs, temporaries, and outputs not written over an input
    out["total"] = out["argument"] + out["temp"] + out["output"] - out["alias"]
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


def _compile(lowered):
    """(compiled, None), or (None, the compiler's message) where XLA:TPU refuses the program
    for exceeding the chip's HBM (it says how much its temporaries need)."""
    try:
        return lowered.compile(), None
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return None, str(e).splitlines()[0]


def _oom_report(message: str, seconds: float) -> dict:
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
    compiled, oom = _compile(fn.lower(*args))
    seconds = time.perf_counter() - start
    head = {"topology": _topology_name(config.mesh), "mesh": dict(config.mesh.shape),
            "implementation": config.implementation, "schedule": config.schedule,
            "tokens_per_device": tokens_per_device, "capacity_factor": config.capacity_factor,
            "shapes": dataclasses.asdict(shapes),
            "experts": "fp8" if fp8_block else shapes.dtype}
    if oom:
        return dict(head, resolved_schedule=None, **_oom_report(oom, seconds))
    text = compiled.as_text()
    copies = tokens_per_device * shapes.k
    resolved = select_schedule(tokens_per_device, config.schedule, config.decode_threshold,
                               platform=lay.platform) if config.relayfree else None
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
        "compile_s": round(seconds, 2),
    }


def _topology_name(mesh: Mesh) -> str:
    d = mesh.devices.flat[0]
    return f"{getattr(d, 'device_kind', d.platform)} x{mesh.devices.size}"


# --- whole models from a config.json ------------------------------------------------------


def truncated(cfg, layers: int | None):
    """``cfg`` with ``layers`` decoder layers (None: all): a shallower model of the same layer
    kinds, for compiles whose temporaries do not grow with depth. Dense layers before the
    first MoE layer (DeepSeek-V3's first three) keep at most ``layers - 1`` of their number,
    so at least one MoE layer remains: ``layers=2`` is one dense and one MoE layer."""
    if layers is None or layers >= cfg.n_layers:
        return cfg
    dense = next((i for i, m in enumerate(cfg.moe_layers) if m), cfg.n_layers)
    keep = min(dense, layers - 1) if dense < cfg.n_layers else layers
    index = list(range(keep)) + list(range(dense, dense + layers - keep))
    pick = lambda flags: None if flags is None else tuple(flags[i] for i in index)  # noqa: E731
    return dataclasses.replace(cfg, n_layers=layers, moe_layers=pick(cfg.moe_layers),
                               sliding_layers=pick(cfg.sliding_layers))


def abstract_model(folder: str, config: DispatchConfig, dtype="bfloat16",
                   layers: int | None = None, fp8_block: tuple[int, int] | None = None):
    """(graphdef, state of ShapeDtypeStructs placed as the loader places them, model config)
    of the model ``folder/config.json`` describes (its first ``layers`` layers; ``fp8_block``:
    routed experts in FP8, as ``load_model(..., fp8_experts=True)`` keeps them): no weights
    are read or made."""
    from flax import nnx

    from moe_relayfree_models.checkpoint import read_config
    from moe_relayfree_models.transformer import MoETransformer

    cfg = dataclasses.replace(truncated(read_config(folder), layers), expert_fp8_block=fp8_block)
    config = config.with_auto_mesh()
    model = nnx.eval_shape(lambda: MoETransformer(cfg, dispatch=config, param_dtype=jnp.dtype(dtype),
                                                  rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    lay, mesh = config.layout, config.mesh

    def place(path, leaf):
        names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
        names = [n for n in names if n != "value"]  # a Variable's value attribute
        spec = P()
        stack = names[-1].removesuffix("_scale")
        if len(leaf.shape) == 3 and stack in ("w_gate", "w_up", "w_down"):
            spec = lay.w_out if stack == "w_down" else lay.w_in
        return _struct(leaf.shape, leaf.dtype, mesh, spec)

    return graphdef, jax.tree_util.tree_map_with_path(place, state), cfg


def _device_bytes(tree) -> int:
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
    return total


def model_report(folder: str, config: DispatchConfig, batch_per_device: int, context: int,
                 phase: str = "decode", prompt: int | None = None, dtype="bfloat16",
                 layers: int | None = None, fp8_block: tuple[int, int] | None = None) -> dict:
    """Compiles the model's decode step (``phase="decode"``: one token per sequence, a KV cache
    of ``context`` positions) or prefill (``prompt`` tokens) for ``batch_per_device`` sequences
    per token shard, the cache split over the batch axes, and reports per-device parameter,
    KV-cache, temp and total bytes.

    ``layers``: compile the first ``layers`` layers only. Layers run one after another, so the
    step's temporaries do not grow with depth; parameters and KV cache do, and are counted for
    the whole model from its abstract shapes (``memory["params"]``, ``["kv_cache"]``,
    ``["total"]``; the compiled program's own figures are under ``compiled``). ``fp8_block``:
    routed experts in FP8 (:func:`abstract_model`)."""
    from moe_relayfree_models.generation import GREEDY, prefill_program, step_program
    from moe_relayfree_models.transformer import init_cache

    _, full_state, full_cfg = abstract_model(folder, config, dtype, fp8_block=fp8_block)
    graphdef, state, cfg = abstract_model(folder, config, dtype, layers, fp8_block)
    config = config.with_auto_mesh()
    lay, mesh = config.layout, config.mesh
    batch = batch_per_device * lay.num_token_shards
    def cache_for(c):
        shapes = jax.eval_shape(lambda: init_cache(c, batch, context, jnp.dtype(dtype)))
        return jax.tree.map(lambda a: _struct(a.shape, a.dtype, mesh, P(lay.tokens[0])), shapes)

    cache, full_cache = cache_for(cfg), cache_for(full_cfg)
    tok = P(lay.tokens[0])
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, P()))
    pad = _struct((batch,), jnp.int32, mesh, tok)
    start = time.perf_counter()
    if phase == "decode":
        lowered = step_program.lower(graphdef, GREEDY, state, _struct((batch,), jnp.int32, mesh, tok),
                                     pad, cache, jax.ShapeDtypeStruct((), jnp.int32), key)
        tokens_per_device = batch_per_device
    elif phase == "prefill":
        width = prompt or context
        lowered = prefill_program.lower(graphdef, GREEDY, state,
                                        _struct((batch, width), jnp.int32, mesh, tok), pad, cache, key)
        tokens_per_device = batch_per_device * width
    else:
        raise ValueError(f"phase must be 'decode' or 'prefill', got {phase!r}")
    compiled, oom = _compile(lowered)
    seconds = time.perf_counter() - start
    if oom:
        report = _oom_report(oom, seconds)
        report["memory"].update(params=_device_bytes(full_state), kv_cache=_device_bytes(full_cache))
        return dict(report, model=folder, layers=full_cfg.n_layers, compiled_layers=cfg.n_layers,
                    topology=_topology_name(mesh), implementation=config.implementation,
                    batch_per_device=batch_per_device, context=context, phase=phase,
                    experts="fp8" if fp8_block else dtype)
    text = compiled.as_text()
    compiled_mem = memory(compiled)
    compiled_mem.update(params=_device_bytes(state), kv_cache=_device_bytes(cache))
    params, kv = _device_bytes(full_state), _device_bytes(full_cache)
    # the step's own arguments beyond parameters and cache (tokens, positions) and its
    # outputs that are not the donated cache, as compiled
    rest = compiled_mem["total"] - compiled_mem["params"] - compiled_mem["kv_cache"] - compiled_mem["temp"]
    mem = {"params": params, "kv_cache": kv, "temp": compiled_mem["temp"],
           "total": params + kv + compiled_mem["temp"] + rest}
    resolved = select_schedule(tokens_per_device, config.schedule, config.decode_threshold,
                               platform=lay.platform) if config.relayfree else None
    return {
        "model": folder, "layers": full_cfg.n_layers, "compiled_layers": cfg.n_layers,
        "topology": _topology_name(mesh),
        "mesh": dict(mesh.shape), "implementation": config.implementation,
        "schedule": config.schedule, "resolved_schedule": resolved, "phase": phase,
        "batch_per_device": batch_per_device, "context": context, "memory": mem,
        "experts": "fp8" if fp8_block else dtype, "compiled": compiled_mem,
        "collectives": collective_rows(text, lay.num_ranks, tokens_per_device * cfg.k),
        "compile_s": round(seconds, 2),
    }


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


__all__ = ["FP8_BLOCK", "HBM_BYTES", "LAYER_SHAPES", "LayerShapes", "abstract_model", "collective_rows",
           "layer_inputs", "layer_report", "markdown", "memory", "mib", "model_report", "receive_rows",
           "tpu_devices", "tpu_mesh"]


def largest_batch(folder: str, config: DispatchConfig, context: int, hbm_bytes: int,
                  layers: int | None = 4, probe: int = 8, limit: int = 4096,
                  fp8_block: tuple[int, int] | None = None) -> dict:
    """The largest decode batch per device whose compiled decode step fits ``hbm_bytes``:
    parameters + KV cache + the step's temporaries (:func:`model_report`, ``layers`` layers
    compiled, parameters and cache counted for all).

    One compile at ``probe`` sequences gives the cache and temporaries per sequence; the
    estimate they give is bracketed (x1.25 steps) and bisected until the bracket is within
    1/32 of it. ``{"batch": the largest batch found to fit (0: not even 1), "report": its
    report, "tried": {batch: total bytes, None where the compiler refused it}}``."""
    tried: dict[int, int | None] = {}
    reports: dict[int, dict] = {}

    def fits(b: int) -> bool:
        if b not in tried:
            r = model_report(folder, config, b, context, "decode", layers=layers,
                             fp8_block=fp8_block)
            tried[b] = None if r.get("oom") else r["memory"]["total"]
            reports[b] = r
        return tried[b] is not None and tried[b] <= hbm_bytes

    fits(probe)
    first = reports[probe]["memory"]
    per_seq = (first["kv_cache"] + (first["temp"] or 0)) / probe
    fixed = first["params"]
    guess = int(max(1, min(limit, (hbm_bytes - fixed) // max(per_seq, 1))))
    lo, hi = (probe, None) if fits(probe) else (0, probe)
    b = guess
    while hi is None or (lo == 0 and hi > 1):
        if b <= lo or (hi is not None and b >= hi):
            b = (lo + (hi if hi is not None else 2 * max(lo, 1))) // 2 or 1
        if fits(b):
            lo = b
            b = min(limit, int(b * 1.25) + 1)
            if lo >= limit:
                hi = limit + 1
        else:
            hi = b
            b = max(1, int(b / 1.25))
        if hi is not None and lo > 0:
            break
    while hi - lo > max(1, lo // 32):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return {"batch": lo, "report": reports.get(lo), "tried": tried}
