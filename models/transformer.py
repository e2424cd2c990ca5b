"""Decoder-only MoE transformer (Flax NNX) on top of ``moe_relayfree.MoELayer``.

Covers Qwen3-MoE, Qwen2-MoE, Mixtral and OLMoE (GQA attention with RoPE) and DeepSeek-V3
(multi-head latent attention, ``models/mla.py``) by configuration.
Shapes: tokens ``[B, S] int32``; hidden ``[B, S, d]``; KV cache per layer
``k, v [B, L, n_kv, head_dim]`` with ``L`` the cache length.

Batches are left-padded: ``pad [B] int32`` counts padding tokens at the start of each row;
a row's positions (RoPE) start at 0 after its padding, and padded keys are never attended.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from moe_relayfree_models.config import ModelConfig
from moe_relayfree_models.layers import RMSNorm, attention_mask, rope, rope_frequencies
from moe_relayfree_models.mla import MLAttention
from moe_relayfree.ffn import dense_dot
from moe_relayfree.config import DispatchConfig, Lowering, dispatch_config
from moe_relayfree.layer import MoELayer, SwiGLUMLP, normal_init

_F32 = jnp.float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Per-layer caches (lists over layers); shapes in :func:`init_cache`."""

    k: list
    v: list


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype) -> KVCache:
    """GQA: k, v ``[B, L, n_kv, head_dim]``; MLA: latent ``[B, L, kv_lora]``, rope key ``[B, L, rope]``."""
    if cfg.is_mla:
        k_shape, v_shape = (batch, length, cfg.kv_lora_rank), (batch, length, cfg.qk_rope_head_dim)
    else:
        k_shape = v_shape = (batch, length, cfg.n_kv_heads, cfg.head_dim)
    return KVCache([jnp.zeros(k_shape, dtype) for _ in range(cfg.n_layers)],
                   [jnp.zeros(v_shape, dtype) for _ in range(cfg.n_layers)])


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, param_dtype, rngs: nnx.Rngs, window: int | None = None,
                 min_rows: int = Lowering().dense_min_rows):
        d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.cfg = cfg
        self.min_rows = min_rows  # dense_dot's (Lowering.dense_min_rows)
        self.window = window  # sliding-window attention over the last `window` keys, or None
        std = d**-0.5
        self.wq = nnx.Param(normal_init(rngs, (d, h * hd), std, param_dtype))
        self.wk = nnx.Param(normal_init(rngs, (d, kv * hd), std, param_dtype))
        self.wv = nnx.Param(normal_init(rngs, (d, kv * hd), std, param_dtype))
        self.wo = nnx.Param(normal_init(rngs, (h * hd, d), (h * hd) ** -0.5, param_dtype))
        if cfg.qkv_bias:
            self.bq = nnx.Param(jnp.zeros((h * hd,), param_dtype))
            self.bk = nnx.Param(jnp.zeros((kv * hd,), param_dtype))
            self.bv = nnx.Param(jnp.zeros((kv * hd,), param_dtype))
        else:
            self.bq = self.bk = self.bv = None
        self.bo = nnx.Param(jnp.zeros((d,), param_dtype)) if cfg.o_bias else None
        if cfg.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(hd, cfg.rms_eps, param_dtype), RMSNorm(hd, cfg.rms_eps, param_dtype)
        elif cfg.qk_norm == "full":
            self.q_norm = RMSNorm(h * hd, cfg.rms_eps, param_dtype)
            self.k_norm = RMSNorm(kv * hd, cfg.rms_eps, param_dtype)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x, positions, key_valid, cache_k, cache_v, start: int, rows: int | None = None):
        """x ``[B, S, d]``; positions ``[B, S]``; key_valid ``[B, L]`` bool (padding False);
        cache ``[B, L, kv, hd]``; ``start`` (static) is where this chunk goes in the cache;
        rows: x's rows per device, if known (``dense_dot``).
        Returns (out ``[B, S, d]``, new cache_k, new cache_v)."""
        q, k, v = self.project(x, positions, rows)
        cache_k = jax.lax.dynamic_update_slice_in_dim(cache_k, k.astype(cache_k.dtype), start, 1)
        cache_v = jax.lax.dynamic_update_slice_in_dim(cache_v, v.astype(cache_v.dtype), start, 1)
        mask = attention_mask(start, x.shape[1], key_valid, self.window)  # [B, S, L]
        return self.attend(q, cache_k, cache_v, mask, rows), cache_k, cache_v

    def project(self, x, positions, rows: int | None = None):
        """x ``[B, S, d]``, positions ``[B, S]`` -> q ``[B, S, h, hd]``, k and v ``[B, S, kv,
        hd]`` in x's dtype, RoPE applied (norms, biases and clipping as the family has them)."""
        cfg = self.cfg
        b, s, _ = x.shape
        dt = x.dtype

        def proj(w, bias):
            y = dense_dot(x, w[...].astype(dt), rows_per_device=rows, min_rows=self.min_rows)
            if bias is not None:
                y = y + bias[...].astype(_F32)
            return y.astype(dt)

        q, k, v = proj(self.wq, self.bq), proj(self.wk, self.bk), proj(self.wv, self.bv)
        if cfg.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.clip_qkv is not None:  # OLMoE: after the projection norms, before RoPE
            q, k, v = (jnp.clip(a, -cfg.clip_qkv, cfg.clip_qkv) for a in (q, k, v))
        q = q.reshape(b, s, cfg.n_heads, cfg.head_dim)
        k = k.reshape(b, s, cfg.n_kv_heads, cfg.head_dim)
        v = v.reshape(b, s, cfg.n_kv_heads, cfg.head_dim)
        if cfg.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq, factor = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling,
                                            cfg.max_position)
        q, k = (rope(a, positions, inv_freq, attention_factor=factor) for a in (q, k))
        return q, k, v

    def attend(self, q, keys, values, mask, rows: int | None = None):
        """q ``[B, S, h, hd]`` over keys, values ``[B, L, kv, hd]`` where mask ``[B, S, L]``
        -> ``[B, S, d]`` (the output projection applied), in q's dtype."""
        cfg = self.cfg
        b, s = q.shape[:2]
        dt = q.dtype
        groups = cfg.n_heads // cfg.n_kv_heads
        qg = q.reshape(b, s, cfg.n_kv_heads, groups, cfg.head_dim)
        scores = jnp.einsum("bsngh,blnh->bngsl", qg, keys.astype(dt),
                            preferred_element_type=_F32) * cfg.head_dim**-0.5
        scores = jnp.where(mask[:, None, None], scores, -1e30)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        out = jnp.einsum("bngsl,blnh->bsngh", probs, values.astype(dt), preferred_element_type=_F32)
        out = out.reshape(b, s, cfg.n_heads * cfg.head_dim).astype(dt)
        y = dense_dot(out, self.wo[...].astype(dt), rows_per_device=rows, min_rows=self.min_rows)
        if self.bo is not None:
            y = y + self.bo[...].astype(_F32)
        return y.astype(dt)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, index: int, *, dispatch: DispatchConfig, param_dtype,
                 rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_eps, param_dtype)
        min_rows = dispatch.lowering.dense_min_rows
        if cfg.is_mla:
            self.attn = MLAttention(cfg, param_dtype=param_dtype, rngs=rngs, min_rows=min_rows)
        else:
            self.attn = Attention(cfg, param_dtype=param_dtype, rngs=rngs,
                                  window=cfg.attention_window(index), min_rows=min_rows)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.rms_eps, param_dtype)
        if cfg.moe_layers[index]:
            self.mlp = MoELayer(
                cfg.d_model, cfg.d_ff_expert, cfg.num_experts, cfg.k, dispatch=dispatch,
                router=cfg.router, shared_d_ff=cfg.shared_d_ff, shared_gate=cfg.shared_gate,
                param_dtype=param_dtype, expert_block=cfg.expert_fp8_block, rngs=rngs,
            )
        else:
            self.mlp = SwiGLUMLP(cfg.d_model, cfg.d_ff, param_dtype=param_dtype, rngs=rngs,
                                 lowering=dispatch.lowering)

    def __call__(self, x, positions, key_valid, cache_k, cache_v, start: int, rows: int | None = None):
        h, cache_k, cache_v = self.attn(self.attn_norm(x), positions, key_valid, cache_k, cache_v,
                                        start, rows)
        x = x + h
        mlp = self.mlp(self.mlp_norm(x)) if isinstance(self.mlp, MoELayer) else \
            self.mlp(self.mlp_norm(x), rows_per_device=rows)  # a MoE layer knows its own rows
        return x + mlp, cache_k, cache_v


class MoETransformer(nnx.Module):
    """Embedding -> decoder layers (dense or MoE per ``cfg.moe_layers``) -> norm -> LM head.

    ``dispatch``: one :class:`moe_relayfree.DispatchConfig` (or its fields as keywords:
    ``mesh=..., schedule=...``) for every :class:`moe_relayfree.MoELayer`; its mesh may have
    several axes (see :mod:`moe_relayfree.layout`).
    """

    def __init__(self, cfg: ModelConfig, *, dispatch: DispatchConfig | None = None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs, **dispatch_settings):
        # One mesh type for the whole model: an Explicit axis would give the MoE outputs an
        # explicit sharding type that then meets the unsharded rest of the model.
        dispatch = dispatch_config(dispatch, **dispatch_settings).with_auto_mesh()
        self.dispatch = dispatch
        self.cfg = cfg
        self.embed = nnx.Param(normal_init(rngs, (cfg.vocab_size, cfg.d_model), 1.0, param_dtype))
        self.layers = nnx.List([
            DecoderLayer(cfg, i, dispatch=dispatch, param_dtype=param_dtype, rngs=rngs)
            for i in range(cfg.n_layers)
        ])
        self.norm = RMSNorm(cfg.d_model, cfg.rms_eps, param_dtype)
        self.lm_head = None if cfg.tie_embeddings else nnx.Param(
            normal_init(rngs, (cfg.d_model, cfg.vocab_size), cfg.d_model**-0.5, param_dtype))

    def rows_per_device(self, b: int, s: int) -> int | None:
        """Rows of ``[b, s, d]`` activations per device, as the MoE layers place their tokens
        (XLA spreads the attention's the same way); None without MoE layers."""
        moe = [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoELayer)]
        return moe[0].rows_per_device(b * s) if moe else None

    def set_mla_form(self, form: str) -> None:
        """Makes every MLA attention layer attend in ``form`` ("auto", "absorbed",
        "expanded": ``ModelConfig.mla_form``); a program traced after this sees it (the
        config is part of the module's graph, so of a jitted program's cache key)."""
        cfg = dataclasses.replace(self.cfg, mla_form=form)  # validated
        self.cfg = cfg
        for layer in self.layers:
            if hasattr(layer.attn, "cfg"):
                layer.attn.cfg = cfg

    @property
    def compute_dtype(self) -> jnp.dtype:
        """The activations' default dtype: the parameters' (a bf16 checkpoint runs in bf16)."""
        return self.embed[...].dtype

    def __call__(self, tokens: jax.Array, pad: jax.Array, cache: KVCache, start: int,
                 dtype=None, logits_to_keep: int = 0) -> tuple[jax.Array, KVCache]:
        """tokens ``[B, S]`` written at cache rows ``[start, start+S)`` (static ``start``);
        pad ``[B]`` left-padding per row; dtype: the activations' (default
        :attr:`compute_dtype`; matmuls accumulate in f32, norms and softmax run in f32 either
        way); logits_to_keep: the last positions to compute logits for (0: all, as in
        transformers). Returns (logits ``[B, S or logits_to_keep, V] f32``, cache).

        A prefill that samples keeps 1: the LM head over every prompt position was an
        ``[B, S, V]`` f32 temporary and ``S`` times the head's work (for a 152k vocabulary and
        2048 prompt tokens, 1.2 GB per sequence).

        Activations follow the parameters by default because each layer casts its weights to
        the activations' dtype: f32 activations over bf16 weights converted every weight
        matrix of the model on every call (docs/benchmarks.md, "bf16 on the CPU")."""
        dtype = self.compute_dtype if dtype is None else dtype
        b, s = tokens.shape
        length = cache.k[0].shape[1]
        x = jnp.take(self.embed[...], tokens, axis=0).astype(dtype)
        positions = jnp.maximum(start + jnp.arange(s)[None, :] - pad[:, None], 0)
        key_valid = jnp.arange(length)[None, :] >= pad[:, None]
        rows = self.rows_per_device(b, s)
        new_k, new_v = [], []
        for layer, ck, cv in zip(self.layers, cache.k, cache.v):
            x, ck, cv = layer(x, positions, key_valid, ck, cv, start, rows)
            new_k.append(ck)
            new_v.append(cv)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
            rows = self.rows_per_device(b, x.shape[1])
        x = self.norm(x)
        head = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        logits = dense_dot(x, head.astype(dtype), rows_per_device=rows,
                           min_rows=self.dispatch.lowering.dense_min_rows)
        return logits, KVCache(new_k, new_v)
