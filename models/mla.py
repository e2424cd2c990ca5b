"""Multi-head latent attention (DeepSeek-V2/V3), caching the compressed latent.

Per layer the cache holds ``ckv [B, L, kv_lora_rank]`` (the normed latent) and
``krope [B, L, qk_rope_head_dim]`` (the shared rotary key), not per-head keys and values:
that is MLA's memory saving. Keys and values are expanded from the latent at attention time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.layers import RMSNorm, attention_mask, rope
from moe_relayfree.experts import dense_dot
from moe_relayfree.layer import normal_init

_F32 = jnp.float32
LATENT_NORM_EPS = 1e-6  # DeepseekV3RMSNorm's default, used for q_a/kv_a norms


class MLAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h = cfg.d_model, cfg.n_heads
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        std = d**-0.5
        if cfg.q_lora_rank:
            self.q_a = nnx.Param(normal_init(rngs, (d, cfg.q_lora_rank), std, param_dtype))
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS, param_dtype)
            self.q_b = nnx.Param(normal_init(rngs, (cfg.q_lora_rank, h * qk), cfg.q_lora_rank**-0.5, param_dtype))
            self.wq = None
        else:
            self.wq = nnx.Param(normal_init(rngs, (d, h * qk), std, param_dtype))
            self.q_a = self.q_a_norm = self.q_b = None
        self.kv_a = nnx.Param(normal_init(rngs, (d, cfg.kv_lora_rank + cfg.qk_rope_head_dim), std, param_dtype))
        self.kv_a_norm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS, param_dtype)
        self.kv_b = nnx.Param(normal_init(rngs, (cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim)),
                                      cfg.kv_lora_rank**-0.5, param_dtype))
        self.wo = nnx.Param(normal_init(rngs, (h * cfg.v_head_dim, d), (h * cfg.v_head_dim) ** -0.5, param_dtype))

    def __call__(self, x, positions, key_valid, cache_ckv, cache_krope, start, rows=None):
        """x ``[B, S, d]``; cache_ckv ``[B, L, kv_lora]``, cache_krope ``[B, L, rope]``; rows:
        x's rows per device, if known (``dense_dot``)."""
        cfg = self.cfg
        b, s, _ = x.shape
        dt = x.dtype
        h, nope, rdim, vdim = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim

        def mm(a, w, rows=rows):
            return dense_dot(a, w[...].astype(dt), rows_per_device=rows).astype(dt)

        q = mm(self.q_a_norm(mm(x, self.q_a)), self.q_b) if self.wq is None else mm(x, self.wq)
        q = q.reshape(b, s, h, nope + rdim)
        q_nope, q_rope = q[..., :nope], q[..., nope:]
        kv = mm(x, self.kv_a)
        ckv, k_rope = self.kv_a_norm(kv[..., : cfg.kv_lora_rank]), kv[..., cfg.kv_lora_rank :]
        q_rope = rope(q_rope, positions, cfg.rope_theta, cfg.rope_interleave)
        k_rope = rope(k_rope[:, :, None, :], positions, cfg.rope_theta, cfg.rope_interleave)[:, :, 0]
        cache_ckv = jax.lax.dynamic_update_slice_in_dim(cache_ckv, ckv.astype(cache_ckv.dtype), start, 1)
        cache_krope = jax.lax.dynamic_update_slice_in_dim(cache_krope, k_rope.astype(cache_krope.dtype), start, 1)
        length = cache_ckv.shape[1]
        # over the cache's rows, not the tokens'
        expanded = mm(cache_ckv.astype(dt), self.kv_b, None).reshape(b, length, h, nope + vdim)
        k_nope, v = expanded[..., :nope], expanded[..., nope:]
        scores = (jnp.einsum("bshd,blhd->bhsl", q_nope, k_nope, preferred_element_type=_F32)
                  + jnp.einsum("bshd,bld->bhsl", q_rope, cache_krope.astype(dt), preferred_element_type=_F32))
        scores = scores * (nope + rdim) ** -0.5
        scores = jnp.where(attention_mask(start, s, key_valid)[:, None], scores, -1e30)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        out = jnp.einsum("bhsl,blhd->bshd", probs, v, preferred_element_type=_F32).astype(dt)
        return mm(out.reshape(b, s, h * vdim), self.wo), cache_ckv, cache_krope
