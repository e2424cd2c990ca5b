"""Deviceless XLA:TPU compiles of whole models (a model step from a ``config.json``: its
per-device parameters, KV cache, temporaries and collectives), and the largest decode batch
that fits a chip, on a machine with no TPU. The layer-level compiles and the TPU set-up are
the core's :mod:`moe_relayfree.tools.aot`.

    mesh = aot.tpu_mesh("v5p:4x4x4")
    report = model_report("models/configs/deepseek-v3", mr.DispatchConfig(mesh), 8, 4096)
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moe_relayfree.config import DispatchConfig
from moe_relayfree.paths import resolve
from moe_relayfree.tools.aot import (collective_rows, compile_or_oom, memory, oom_report,
                                     shape_struct, topology_name)
from moe_relayfree_models.checkpoint import read_config
from moe_relayfree_models.generation import GREEDY, prefill_program, step_program
from moe_relayfree_models.transformer import MoETransformer, init_cache




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
                   layers: int | None = None, fp8_block: tuple[int, int] | None = None,
                   mla_form: str = "auto"):
    """(graphdef, state of ShapeDtypeStructs placed as the loader places them, model config)
    of the model ``folder/config.json`` describes (its first ``layers`` layers; ``fp8_block``:
    routed experts in FP8, as ``load_model(..., fp8_experts=True)`` keeps them; ``mla_form``:
    ``ModelConfig.mla_form``): no weights are read or made."""
    cfg = dataclasses.replace(truncated(read_config(folder), layers), expert_fp8_block=fp8_block,
                              mla_form=mla_form)
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
        return shape_struct(leaf.shape, leaf.dtype, mesh, spec)

    return graphdef, jax.tree_util.tree_map_with_path(place, state), cfg


def _device_bytes(tree) -> int:
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
    return total


def model_report(folder: str, config: DispatchConfig, batch_per_device: int, context: int,
                 phase: str = "decode", prompt: int | None = None, dtype="bfloat16",
                 layers: int | None = None, fp8_block: tuple[int, int] | None = None,
                 mla_form: str = "auto") -> dict:
    """Compiles the model's decode step (``phase="decode"``: one token per sequence, a KV cache
    of ``context`` positions) or prefill (``prompt`` tokens) for ``batch_per_device`` sequences
    per token shard, the cache split over the batch axes, and reports per-device parameter,
    KV-cache, temp and total bytes.

    ``layers``: compile the first ``layers`` layers only. Layers run one after another, so the
    step's temporaries do not grow with depth; parameters and KV cache do, and are counted for
    the whole model from its abstract shapes (``memory["params"]``, ``["kv_cache"]``,
    ``["total"]``; the compiled program's own figures are under ``compiled``). ``fp8_block``:
    routed experts in FP8, ``mla_form`` (:func:`abstract_model`)."""
    _, full_state, full_cfg = abstract_model(folder, config, dtype, fp8_block=fp8_block,
                                             mla_form=mla_form)
    graphdef, state, cfg = abstract_model(folder, config, dtype, layers, fp8_block, mla_form)
    config = config.with_auto_mesh()
    lay, mesh = config.layout, config.mesh
    batch = batch_per_device * lay.num_token_shards
    def cache_for(c):
        shapes = jax.eval_shape(lambda: init_cache(c, batch, context, jnp.dtype(dtype)))
        return jax.tree.map(lambda a: shape_struct(a.shape, a.dtype, mesh, P(lay.tokens[0])), shapes)

    cache, full_cache = cache_for(cfg), cache_for(full_cfg)
    tok = P(lay.tokens[0])
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, P()))
    pad = shape_struct((batch,), jnp.int32, mesh, tok)
    start = time.perf_counter()
    if phase == "decode":
        lowered = step_program.lower(graphdef, GREEDY, state, shape_struct((batch,), jnp.int32, mesh, tok),
                                     pad, cache, jax.ShapeDtypeStruct((), jnp.int32), key)
        tokens_per_device = batch_per_device
    elif phase == "prefill":
        width = prompt or context
        lowered = prefill_program.lower(graphdef, GREEDY, state,
                                        shape_struct((batch, width), jnp.int32, mesh, tok), pad, cache, key)
        tokens_per_device = batch_per_device * width
    else:
        raise ValueError(f"phase must be 'decode' or 'prefill', got {phase!r}")
    compiled, oom = compile_or_oom(lowered)
    seconds = time.perf_counter() - start
    if oom:
        report = oom_report(oom, seconds)
        report["memory"].update(params=_device_bytes(full_state), kv_cache=_device_bytes(full_cache))
        return dict(report, model=folder, layers=full_cfg.n_layers, compiled_layers=cfg.n_layers,
                    topology=topology_name(mesh), implementation=config.implementation,
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
    resolved = resolve(config, tokens_per_device * lay.num_token_shards, cfg.k).schedule
    return {
        "model": folder, "layers": full_cfg.n_layers, "compiled_layers": cfg.n_layers,
        "topology": topology_name(mesh),
        "mesh": dict(mesh.shape), "implementation": config.implementation,
        "schedule": config.schedule, "resolved_schedule": resolved, "phase": phase,
        "batch_per_device": batch_per_device, "context": context, "memory": mem,
        "experts": "fp8" if fp8_block else dtype, "compiled": compiled_mem,
        "collectives": collective_rows(text, lay.num_ranks, tokens_per_device * cfg.k),
        "compile_s": round(seconds, 2),
    }


def largest_batch(folder: str, config: DispatchConfig, context: int, hbm_bytes: int,
                  layers: int | None = 4, probe: int = 8, limit: int = 4096,
                  fp8_block: tuple[int, int] | None = None, mla_form: str = "auto") -> dict:
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
                             fp8_block=fp8_block, mla_form=mla_form)
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


__all__ = ["abstract_model", "largest_batch", "model_report", "truncated"]
