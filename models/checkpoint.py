"""Load a local Hugging Face checkpoint folder (``config.json`` + ``*.safetensors``).

Streaming and sharded: the model is built abstractly (``nnx.eval_shape``, no random init), every
name and shape is checked against the file headers before any data is read, and each parameter
is created straight on its devices with ``jax.make_array_from_callback``: expert tensors are read
per device shard (a process reads only the experts its own devices hold; per-expert layouts stack
only those), replicated tensors once per process. Sharded checkpoints are found through
``model.safetensors.index.json``. Expert weights come per expert (``experts.{e}.gate_proj.weight``,
Mixtral's ``w1/w2/w3``) or fused (``experts.gate_up_proj`` ``[E, 2f, d]`` +
``experts.down_proj`` ``[E, d, f]``). Parameters keep the checkpoint's dtype unless ``dtype`` is
given. Every tensor must be used and every parameter filled, or loading stops with a message that
names the tensors. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moe_relayfree_models.config import ModelConfig
from moe_relayfree_models.hf_config import from_hf_config
from moe_relayfree_models.quant import SCALE_SUFFIX, parse_quantization
from moe_relayfree_models.tensor_index import CheckpointError, TensorIndex
from moe_relayfree_models.transformer import MoETransformer
from moe_relayfree.config import DispatchConfig, dispatch_config


def read_config(folder: str) -> ModelConfig:
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{folder} has no config.json")
    with open(path) as fh:
        return from_hf_config(json.load(fh))


def _mtp_layers(cfg: ModelConfig, folder: str) -> range:
    """DeepSeek-V3's multi-token-prediction layers (``model.layers.{i}`` for ``i`` past the
    last decoder layer, declared by ``num_nextn_predict_layers``): transformers skips them on
    load and so does this loader (next-token logits do not use them)."""
    if cfg.arch != "deepseek_v3":
        return range(0)
    with open(os.path.join(folder, "config.json")) as fh:
        extra = int(json.load(fh).get("num_nextn_predict_layers") or 0)
    return range(cfg.n_layers, cfg.n_layers + extra)


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        return int(parts[2])
    return None


def _check(index: TensorIndex, name: str, shape: tuple[int, ...], used: set[str]) -> None:
    if name not in index:
        raise CheckpointError(f"checkpoint is missing tensor {name!r}")
    if index.shape[name] != tuple(shape):
        raise CheckpointError(f"tensor {name!r} has shape {index.shape[name]}, expected {tuple(shape)}")
    used.add(name)
    used.update(index.companions(name))  # an FP8 weight's block scales


def _expert_reader(index: TensorIndex, prefix: str, cfg: ModelConfig, used: set[str]):
    """Checks the expert tensors of one MoE layer; returns ``read(which, e0, e1, part)`` giving
    experts ``[e0, e1)`` of ``which`` in {"gate", "up", "down"} as ``[n, d, f]`` / ``[n, f, d]``:
    ``part="weight"`` the weights (an FP8 checkpoint's dequantized), ``"values"`` / ``"scale"``
    an FP8 checkpoint's stored values and block scales, transposed alike."""
    e, d, f = cfg.num_experts, cfg.d_model, cfg.d_ff_expert
    fused = f"{prefix}.experts.gate_up_proj"

    def get(name, part, index_=()):
        if part == "weight":
            return index.read(name, index_)
        if not index.quantized(name):
            raise CheckpointError(f"{name!r} is not stored in FP8: its experts cannot stay FP8")
        if part == "values":
            return index.read_stored(name, index_)
        rows = index_[1] if len(index_) > 1 else slice(None)
        if rows != slice(None):  # gate or up half of a fused stack, in blocks
            bo = index.quant.block[0]
            if rows.start % bo or rows.stop % bo:
                raise CheckpointError(f"{name!r}: f={f} is not a multiple of the {bo}-row blocks, "
                                      "so its gate and up halves share blocks; load it dequantized")
            rows = slice(rows.start // bo, rows.stop // bo)
        return index.read_stored(name + SCALE_SUFFIX, tuple(index_[:1]) + (rows,))

    if fused in index:
        _check(index, fused, (e, 2 * f, d), used)
        _check(index, f"{prefix}.experts.down_proj", (e, d, f), used)

        def read(which, e0, e1, part="weight"):
            rows = slice(e0, e1)
            if which == "down":
                return np.swapaxes(get(f"{prefix}.experts.down_proj", part, (rows,)), 1, 2)
            half = slice(0, f) if which == "gate" else slice(f, 2 * f)
            return np.swapaxes(get(fused, part, (rows, half)), 1, 2)
        return read
    names = dict(zip(("gate", "up", "down"), ("w1", "w3", "w2") if cfg.arch == "mixtral"
                     else ("gate_proj", "up_proj", "down_proj")))
    for i in range(e):
        for which, torch_shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
            _check(index, f"{prefix}.experts.{i}.{names[which]}.weight", torch_shape, used)

    def read(which, e0, e1, part="weight"):
        return np.stack([get(f"{prefix}.experts.{i}.{names[which]}.weight", part).T
                         for i in range(e0, e1)])
    return read


def _entries(model: MoETransformer):
    """The one name mapping: ``(hf_name, variable, linear)`` for every non-expert parameter
    (``linear``: stored by torch as ``[out, in]``), and ``(prefix, moe_layer)`` per MoE layer."""
    cfg = model.cfg
    plain = [("model.embed_tokens.weight", model.embed, False), ("model.norm.weight", model.norm.weight, False)]
    if model.lm_head is not None:
        plain.append(("lm_head.weight", model.lm_head, True))
    experts = []
    for i, layer in enumerate(model.layers):
        pre = f"model.layers.{i}"
        a = layer.attn
        plain += [(f"{pre}.input_layernorm.weight", layer.attn_norm.weight, False),
                  (f"{pre}.post_attention_layernorm.weight", layer.mlp_norm.weight, False)]
        if cfg.is_mla:
            att = f"{pre}.self_attn"
            if a.wq is not None:
                plain.append((f"{att}.q_proj.weight", a.wq, True))
            else:
                plain += [(f"{att}.q_a_proj.weight", a.q_a, True),
                          (f"{att}.q_a_layernorm.weight", a.q_a_norm.weight, False),
                          (f"{att}.q_b_proj.weight", a.q_b, True)]
            plain += [(f"{att}.kv_a_proj_with_mqa.weight", a.kv_a, True),
                      (f"{att}.kv_a_layernorm.weight", a.kv_a_norm.weight, False),
                      (f"{att}.kv_b_proj.weight", a.kv_b, True), (f"{att}.o_proj.weight", a.wo, True)]
        else:
            plain += [(f"{pre}.self_attn.{n}_proj.weight", w, True)
                      for n, w in (("q", a.wq), ("k", a.wk), ("v", a.wv), ("o", a.wo))]
            if cfg.qkv_bias:
                plain += [(f"{pre}.self_attn.{n}_proj.bias", b, False)
                          for n, b in (("q", a.bq), ("k", a.bk), ("v", a.bv))]
            if cfg.o_bias:
                plain.append((f"{pre}.self_attn.o_proj.bias", a.bo, False))
            if a.q_norm is not None:
                plain += [(f"{pre}.self_attn.q_norm.weight", a.q_norm.weight, False),
                          (f"{pre}.self_attn.k_norm.weight", a.k_norm.weight, False)]
        m = layer.mlp
        if not cfg.moe_layers[i]:
            plain += [(f"{pre}.mlp.{n}_proj.weight", w, True)
                      for n, w in (("gate", m.w_gate), ("up", m.w_up), ("down", m.w_down))]
            continue
        mp = f"{pre}.block_sparse_moe" if cfg.arch == "mixtral" else f"{pre}.mlp"
        plain.append((f"{mp}.gate.weight", m.router, True))
        if m.router_bias is not None:
            plain.append((f"{mp}.gate.e_score_correction_bias", m.router_bias, False))
        if m.shared is not None:
            s = m.shared
            shared = "shared_experts" if cfg.arch == "deepseek_v3" else "shared_expert"
            plain += [(f"{mp}.{shared}.{n}_proj.weight", w, True)
                      for n, w in (("gate", s.w_gate), ("up", s.w_up), ("down", s.w_down))]
            if s.gate is not None:
                plain.append((f"{mp}.shared_expert_gate.weight", s.gate, True))
        experts.append((mp, m))
    return plain, experts


def _place(var: nnx.Variable, sharding: NamedSharding, build, dtype) -> None:
    """Creates ``var``'s array shard by shard from ``build(index) -> numpy``.

    Devices holding the same shard (replicas along a data axis) get one read, not one each.
    """
    shape = tuple(var.get_value().shape)
    read: dict = {}

    def shard(idx):
        key = tuple((s.start, s.stop, s.step) for s in idx)
        if key not in read:
            read[key] = np.asarray(build(idx)).astype(dtype, copy=False)
        return read[key]

    var.set_value(jax.make_array_from_callback(shape, sharding, shard))


def _aligned(value: np.ndarray, dtype, align: int = 64) -> np.ndarray:
    """A C-contiguous, ``align``-byte aligned copy of ``value`` in ``dtype``.

    XLA:CPU takes such a buffer without copying it, so every (emulated) device of the process
    shares this one copy of a replicated tensor instead of holding its own.
    """
    dtype = np.dtype(dtype)
    raw = np.empty(value.size * dtype.itemsize + align, np.uint8)
    start = (-raw.ctypes.data) % align
    out = raw[start:start + value.size * dtype.itemsize].view(dtype).reshape(value.shape)
    out[...] = value
    return out


def _replicated(read, dtype):
    """A shard builder for a replicated parameter: one read per process, one buffer shared by
    its devices."""
    cache = []

    def build(idx):
        if not cache:
            cache.append(_aligned(read(), dtype))
        return cache[0][idx]
    return build


def export_tensors(model: MoETransformer, *, fused_experts: bool = False, dtype=None) -> dict[str, np.ndarray]:
    """The model's weights under Hugging Face names (the inverse of :func:`load_weights`).

    FP8 experts (``cfg.expert_fp8_block``) are written as stored: ``float8_e4m3fn`` values and
    their ``_scale_inv`` blocks, in torch's ``[out, in]`` orientation (``dtype`` applies to the
    other tensors); the folder's ``config.json`` then needs the matching
    ``quantization_config``."""
    def host(var):
        a = np.asarray(jax.device_get(var[...]))
        return a.astype(dtype) if dtype is not None else a

    out = {}
    plain, experts = _entries(model)
    for name, var, linear in plain:
        out[name] = np.ascontiguousarray(host(var).T if linear else host(var))
    names = ("w1", "w3", "w2") if model.cfg.arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    for prefix, moe in experts:
        stacks = [{"": host(getattr(moe, n))} for n in ("w_gate", "w_up", "w_down")]
        if moe.expert_block is not None:
            for stack, n in zip(stacks, ("w_gate", "w_up", "w_down")):
                stack[""] = np.asarray(jax.device_get(getattr(moe, n)[...]))
                stack[SCALE_SUFFIX] = np.asarray(jax.device_get(getattr(moe, n + "_scale")[...]))
        gate, up, down = stacks
        for suffix in gate:
            if fused_experts:
                if suffix and model.cfg.d_ff_expert % moe.expert_block[1]:
                    raise ValueError("fused FP8 experts need f to be a multiple of the block")
                out[f"{prefix}.experts.gate_up_proj{suffix}"] = np.ascontiguousarray(
                    np.concatenate([gate[suffix], up[suffix]], axis=2).swapaxes(1, 2))
                out[f"{prefix}.experts.down_proj{suffix}"] = np.ascontiguousarray(
                    down[suffix].swapaxes(1, 2))
                continue
            for e in range(gate[suffix].shape[0]):
                for n, w in zip(names, (gate[suffix][e], up[suffix][e], down[suffix][e])):
                    out[f"{prefix}.experts.{e}.{n}.weight{suffix}"] = np.ascontiguousarray(w.T)
    return out


def load_model(folder: str, dispatch: DispatchConfig | None = None, *, dtype=None,
               fp8_experts: bool = False, stats: dict | None = None,
               **dispatch_settings) -> MoETransformer:
    """Builds the model described by ``folder/config.json`` and streams its safetensors in.

    Args:
      dispatch: the :class:`moe_relayfree.DispatchConfig` of every MoE layer (or its fields as
        keywords: ``mesh=..., schedule=...``): the mesh and its axis roles
        (:mod:`moe_relayfree.layout`); expert tensors are read per device, for the experts on
        that device's expert rank (with a tensor axis, the full ``f`` is read and sliced).
      dtype: parameter dtype; default the checkpoint's (that of its embedding).
      fp8_experts: an FP8 checkpoint's routed experts stay FP8 on the devices, with their block
        scales (half the bytes of bf16; dequantized where the experts run, see
        :class:`moe_relayfree.MoELayer`); every other weight is dequantized to ``dtype``.
      stats: if given, filled with ``bytes_read`` (tensor bytes this process read),
        ``tensor_bytes`` (all tensors of the checkpoint) and ``expert_bytes`` (their routed-expert
        part).
    """
    cfg = read_config(folder)
    with open(os.path.join(folder, "config.json")) as fh:
        quant = parse_quantization(json.load(fh).get("quantization_config"))
    if fp8_experts:
        if quant is None:
            raise CheckpointError(f"fp8_experts needs an FP8 checkpoint; {folder}/config.json has "
                                  "no quantization_config")
        # torch's [out, in] blocks (bo, bi) are (bi, bo) blocks of the transposed matrices
        cfg = dataclasses.replace(cfg, expert_fp8_block=quant.block[::-1])
    index = TensorIndex(folder, quant)
    if dtype is None:
        dtype = index.dtype.get("model.embed_tokens.weight", np.dtype(np.float32))
    dtype = jnp.dtype(dtype)
    index.dequant_dtype = np.dtype(dtype)  # FP8 weights come out in the model's dtype
    dispatch = dispatch_config(dispatch, **dispatch_settings).with_auto_mesh()
    mesh = dispatch.mesh
    model = nnx.eval_shape(lambda: MoETransformer(
        cfg, dispatch=dispatch, param_dtype=dtype, rngs=nnx.Rngs(0)))
    plain, experts = _entries(model)
    used: set[str] = set()
    for name, var, linear in plain:  # every name and shape checked before any data is read
        shape = tuple(var.get_value().shape)
        _check(index, name, shape[::-1] if linear else shape, used)
    plain_names = set(used)
    readers = [(moe, _expert_reader(index, prefix, cfg, used)) for prefix, moe in experts]
    mtp = _mtp_layers(cfg, folder)
    unused = sorted(n for n in set(index.file) - used if _layer_of(n) not in mtp)
    if unused:
        shown = ", ".join(unused[:8]) + (" ..." if len(unused) > 8 else "")
        raise CheckpointError(f"{len(unused)} checkpoint tensors were not used: {shown}")
    # Replicated parameters are placed on the mesh up front: left as single-device arrays, the
    # first jitted call would hand them back replicated and the second call would recompile.
    replicated = NamedSharding(mesh, P())
    for name, var, linear in plain:
        def read(name=name, linear=linear):
            value = index.read(name)
            return value.T if linear else value
        _place(var, replicated, _replicated(read, dtype), dtype)
    lay = dispatch.layout
    parts = (("values", "", jnp.float8_e4m3fn), ("scale", "_scale", jnp.float32)) if fp8_experts \
        else (("weight", "", dtype),)
    for moe, read in readers:
        for name, which, spec in (("w_gate", "gate", lay.w_in), ("w_up", "up", lay.w_in),
                                  ("w_down", "down", lay.w_out)):
            for part, suffix, part_dtype in parts:
                # a scale variable's shards come in blocks: the same slices of its own shape
                def build(idx, read=read, which=which, part=part):
                    rows = idx[0]
                    value = read(which, rows.start or 0,
                                 cfg.num_experts if rows.stop is None else rows.stop, part)
                    return value[(slice(None),) + tuple(idx[1:])]
                _place(getattr(moe, name + suffix), NamedSharding(mesh, spec), build, part_dtype)
    if stats is not None:
        stats.update(bytes_read=index.bytes_read,
                     tensor_bytes=sum(index.nbytes(n) for n in index.file),
                     expert_bytes=sum(index.nbytes(n) for n in used - plain_names))
    return model
