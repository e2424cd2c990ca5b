"""Load a local Hugging Face checkpoint folder (``config.json`` + ``*.safetensors``).

Expert weights come per expert (``experts.{e}.gate_proj.weight``, Mixtral's ``w1/w2/w3``) or
fused (``experts.gate_up_proj`` ``[E, 2f, d]`` + ``experts.down_proj`` ``[E, d, f]``). Every
tensor of the checkpoint must be used and every parameter of the model filled, or loading
stops with a message that names the tensors. Nothing is downloaded.
"""

from __future__ import annotations

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from models import safetensors_io
from models.config import ModelConfig
from models.hf_config import from_hf_config
from models.transformer import MoETransformer
from moe_relayfree.api import auto_mesh


class CheckpointError(ValueError):
    pass


def read_tensors(folder: str) -> dict[str, np.ndarray]:
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {folder}")
    tensors: dict[str, np.ndarray] = {}
    for path in files:
        for name, value in safetensors_io.load(path).items():
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} appears in more than one file")
            tensors[name] = value
    return tensors


def read_config(folder: str) -> ModelConfig:
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{folder} has no config.json")
    with open(path) as fh:
        return from_hf_config(json.load(fh))


class _Tensors:
    """Takes tensors by name, remembering which were used."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        self.tensors, self.used = tensors, set()

    def has(self, name: str) -> bool:
        return name in self.tensors

    def take(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        if name not in self.tensors:
            raise CheckpointError(f"checkpoint is missing tensor {name!r}")
        value = self.tensors[name]
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise CheckpointError(f"tensor {name!r} has shape {tuple(value.shape)}, expected {shape}")
        self.used.add(name)
        return value

    def linear(self, name: str, d_in: int, d_out: int) -> np.ndarray:
        """A torch Linear weight ``[out, in]`` as ``[in, out]``."""
        return self.take(name, (d_out, d_in)).T

    def unused(self) -> list[str]:
        return sorted(set(self.tensors) - self.used)


def _experts(t: _Tensors, prefix: str, cfg: ModelConfig):
    """Stacked ``w_gate, w_up [E, d, f]``, ``w_down [E, f, d]`` from per-expert or fused layouts."""
    e, d, f = cfg.num_experts, cfg.d_model, cfg.d_ff_expert
    if t.has(f"{prefix}.experts.gate_up_proj"):
        gate_up = t.take(f"{prefix}.experts.gate_up_proj", (e, 2 * f, d))
        down = t.take(f"{prefix}.experts.down_proj", (e, d, f))
        return (np.swapaxes(gate_up[:, :f], 1, 2), np.swapaxes(gate_up[:, f:], 1, 2),
                np.swapaxes(down, 1, 2))
    names = ("w1", "w3", "w2") if cfg.arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    gate = np.stack([t.linear(f"{prefix}.experts.{i}.{names[0]}.weight", d, f) for i in range(e)])
    up = np.stack([t.linear(f"{prefix}.experts.{i}.{names[1]}.weight", d, f) for i in range(e)])
    down = np.stack([t.linear(f"{prefix}.experts.{i}.{names[2]}.weight", f, d) for i in range(e)])
    return gate, up, down


def _assign(param: nnx.Variable, value: np.ndarray, sharding=None) -> None:
    target = param[...]
    if tuple(target.shape) != tuple(value.shape):
        raise CheckpointError(f"internal: parameter shape {target.shape} vs tensor {value.shape}")
    array = jnp.asarray(value, target.dtype)
    param[...] = jax.device_put(array, sharding) if sharding is not None else array


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


def load_weights(model: MoETransformer, tensors: dict[str, np.ndarray], *, mesh: Mesh, axis: str) -> None:
    """Fills ``model`` from Hugging Face tensor names; raises on missing/mismatched/unused."""
    mesh = auto_mesh(mesh)
    t = _Tensors(tensors)
    plain, experts = _entries(model)
    # Replicated parameters are placed on the mesh up front: left as single-device arrays, the
    # first jitted call would hand them back replicated and the second call would recompile.
    replicated = NamedSharding(mesh, P())
    for name, var, linear in plain:
        shape = tuple(var[...].shape)
        _assign(var, t.take(name, shape[::-1]).T if linear else t.take(name, shape), replicated)
    ep = NamedSharding(mesh, P(axis, None, None))
    for prefix, moe in experts:
        for var, value in zip((moe.w_gate, moe.w_up, moe.w_down), _experts(t, prefix, model.cfg)):
            _assign(var, value, ep)
    unused = t.unused()
    if unused:
        shown = ", ".join(unused[:8]) + (" ..." if len(unused) > 8 else "")
        raise CheckpointError(f"{len(unused)} checkpoint tensors were not used: {shown}")


def export_tensors(model: MoETransformer, *, fused_experts: bool = False, dtype=None) -> dict[str, np.ndarray]:
    """The model's weights under Hugging Face names (the inverse of :func:`load_weights`)."""
    def host(var):
        a = np.asarray(jax.device_get(var[...]))
        return a.astype(dtype) if dtype is not None else a

    out = {}
    plain, experts = _entries(model)
    for name, var, linear in plain:
        out[name] = np.ascontiguousarray(host(var).T if linear else host(var))
    names = ("w1", "w3", "w2") if model.cfg.arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    for prefix, moe in experts:
        gate, up, down = host(moe.w_gate), host(moe.w_up), host(moe.w_down)
        if fused_experts:
            out[f"{prefix}.experts.gate_up_proj"] = np.ascontiguousarray(
                np.concatenate([gate, up], axis=2).swapaxes(1, 2))
            out[f"{prefix}.experts.down_proj"] = np.ascontiguousarray(down.swapaxes(1, 2))
            continue
        for e in range(gate.shape[0]):
            for n, w in zip(names, (gate[e], up[e], down[e])):
                out[f"{prefix}.experts.{e}.{n}.weight"] = np.ascontiguousarray(w.T)
    return out


def load_model(folder: str, *, mesh: Mesh, axis: str = "ep", schedule: str = "auto",
               implementation: str = "relayfree", param_dtype=jnp.float32) -> MoETransformer:
    """Builds the model described by ``folder/config.json`` and loads its safetensors."""
    cfg = read_config(folder)
    model = MoETransformer(cfg, mesh=mesh, axis=axis, schedule=schedule,
                           implementation=implementation, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    load_weights(model, read_tensors(folder), mesh=mesh, axis=axis)
    return model
