"""Multi-head latent attention (DeepSeek-V2/V3), caching the compressed latent.

Per layer the cache holds ``ckv [B, L, kv_lora_rank]`` (the normed latent) and
``krope [B, L, qk_rope_head_dim]`` (the shared rotary key), not per-head keys and values:
that is MLA's memory saving. Attention over it takes one of two forms (the same math):

* **absorbed** (DeepSeek's own inference code, vLLM's and SGLang's MLA): ``kv_b``'s key half
  ``W_UK [c, h, nope]`` is folded into the queries (``q_nope @ W_UK^T``: ``[B, S, h, c]``) and
  its value half ``W_UV`` into the output, so attention runs over the latent cache as it is:
  no ``[B, L, h, nope + v]`` expansion of the cache on every step;
* **expanded** (transformers' form): keys and values expanded from the whole cache, then
  ordinary attention.

:func:`absorbed` picks by the multiply-adds of each for ``S`` queries: decode (``S = 1``)
always absorbs; a long prefill chunk expands (for DeepSeek-V3's shapes, past ~170 queries).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_relayfree_models.config import ModelConfig
from moe_relayfree_models.layers import (RMSNorm, attention_mask, rope, rope_frequencies,
                                         yarn_mscale)
from moe_relayfree.config import Lowering
from moe_relayfree.ffn import dense_dot
from moe_relayfree.layer import normal_init

_F32 = jnp.float32
LATENT_NORM_EPS = 1e-6  # DeepseekV3RMSNorm's default, used for q_a/kv_a norms


# Cache rows per step of the absorbed form's attention: its scores and probabilities are
# [B, h, S, chunk] whatever the context (at 8 sequences, 128 heads and 8192 rows unchunked,
# each f32 copy of the scores was 32 MiB; docs/benchmarks.md, "At scale").
KEY_CHUNK = 1024


def einsum_f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """``jnp.einsum(spec, a, b)`` accumulated in float32. XLA:CPU has no bf16 x bf16 -> f32
    kernel for some batched dots (``DotThunk``: "Unsupported element type", e.g. the latent
    attention's ``bhsl,blc->bshc``), so there bf16 operands are widened first: a bf16 product
    is exact in f32, so the result is the same. Other platforms take the bf16 operands."""
    def native(a, b):
        return jnp.einsum(spec, a, b, preferred_element_type=_F32)

    def widened(a, b):
        return native(a.astype(_F32), b.astype(_F32))

    if jnp.bfloat16 not in (a.dtype, b.dtype):
        return native(a, b)
    return jax.lax.platform_dependent(a, b, cpu=widened, default=native)


def latent_attention(q_latent, q_rope, latent, k_rope, mask, scale: float,
                     chunk: int = KEY_CHUNK) -> jax.Array:
    """``softmax((q_latent . latent + q_rope . k_rope) * scale) @ latent`` over the cache rows,
    ``chunk`` rows at a time with a running maximum and sum (online softmax).

    q_latent ``[B, S, h, c]``, q_rope ``[B, S, h, r]``, latent ``[B, L, c]``, k_rope
    ``[B, L, r]`` (one dtype), mask ``[B, 1, S, L]`` bool -> ``[B, S, h, c]`` in that dtype.
    Scores in f32, probabilities rounded to the dtype before they weight the latent. Rows with
    no visible key (padding queries) get the mean of the masked rows, as the one-pass softmax
    over scores filled with -1e30 gives them."""
    dt = latent.dtype
    b, length, c = latent.shape
    _, s, h, _ = q_latent.shape
    chunk = min(chunk, length)

    def scores_of(lat, kr):
        return (einsum_f32("bshc,blc->bhsl", q_latent, lat)
                + einsum_f32("bshd,bld->bhsl", q_rope, kr)) * scale

    if chunk == length:
        probs = jax.nn.softmax(jnp.where(mask, scores_of(latent, k_rope), -1e30), axis=-1)
        return einsum_f32("bhsl,blc->bshc", probs.astype(dt), latent).astype(dt)

    def step(i, carry):
        top, total, acc = carry
        # the last chunk ends at the cache's end; rows an earlier chunk had are masked out
        start = jnp.minimum(i * chunk, length - chunk)
        lat = jax.lax.dynamic_slice_in_dim(latent, start, chunk, 1)
        kr = jax.lax.dynamic_slice_in_dim(k_rope, start, chunk, 1)
        new = (start + jnp.arange(chunk)) >= i * chunk
        keep = jax.lax.dynamic_slice_in_dim(mask, start, chunk, 3) & new
        sc = jnp.where(keep, scores_of(lat, kr), -1e30)
        # rows an earlier chunk had count nowhere, not even as masked -1e30 rows
        sc = jnp.where(new, sc, -jnp.inf)
        top_new = jnp.maximum(top, sc.max(-1))
        p = jnp.exp(sc - top_new[..., None])
        scale_old = jnp.exp(top - top_new)
        total = total * scale_old + p.sum(-1)
        weighted = einsum_f32("bhsl,blc->bshc", p.astype(dt), lat)
        acc = acc * scale_old.transpose(0, 2, 1)[..., None] + weighted
        return top_new, total, acc

    init = (jnp.full((b, h, s), -jnp.inf, _F32), jnp.zeros((b, h, s), _F32),
            jnp.zeros((b, s, h, c), _F32))
    _, total, acc = jax.lax.fori_loop(0, -(-length // chunk), step, init)
    return (acc / total.transpose(0, 2, 1)[..., None]).astype(dt)


def softmax_scale(cfg: ModelConfig) -> float:
    """``qk_head_dim ** -0.5``, times ``mscale**2`` under a scaled RoPE with ``mscale_all_dim``
    (DeepSeek-V3's YaRN correction, as its reference code and transformers apply it:
    ``mscale = 0.1 * mscale_all_dim * ln(factor) + 1``)."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    rs = cfg.rope_scaling
    if rs is not None and rs.mscale_all_dim:
        factor = rs.factor or cfg.max_position / rs.original_max_position
        scale *= yarn_mscale(factor, rs.mscale_all_dim) ** 2
    return scale


def absorbed(cfg: ModelConfig, num_queries: int) -> bool:
    """Whether :class:`MLAttention` attends over the latent for ``num_queries`` queries: per
    query and cache row it costs ``2c + rope`` multiply-adds (scores in the latent, values
    summed in it), where expanding costs ``c * (nope + v)`` per cache row once plus
    ``nope + rope + v`` per query (``c`` = kv_lora_rank)."""
    c, nope, r, v = cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    return num_queries * (2 * c + r) <= c * (nope + v) + num_queries * (nope + r + v)


class MLAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, param_dtype, rngs: nnx.Rngs,
                 min_rows: int = Lowering().dense_min_rows):
        self.cfg = cfg
        self.min_rows = min_rows  # dense_dot's (Lowering.dense_min_rows)
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

    def __call__(self, x, positions, key_valid, cache_ckv, cache_krope, start, rows=None,
                 form: str | None = None):
        """x ``[B, S, d]``; cache_ckv ``[B, L, kv_lora]``, cache_krope ``[B, L, rope]``; rows:
        x's rows per device, if known (``dense_dot``); form: "absorbed" or "expanded" (default
        ``cfg.mla_form``, where "auto" is :func:`absorbed`'s choice)."""
        q_nope, q_rope, ckv, k_rope = self.project(x, positions, rows)
        cache_ckv = jax.lax.dynamic_update_slice_in_dim(cache_ckv, ckv.astype(cache_ckv.dtype), start, 1)
        cache_krope = jax.lax.dynamic_update_slice_in_dim(cache_krope, k_rope.astype(cache_krope.dtype), start, 1)
        mask = attention_mask(start, x.shape[1], key_valid)
        return (self.attend(q_nope, q_rope, cache_ckv, cache_krope, mask, rows, form),
                cache_ckv, cache_krope)

    def _mm(self, a, w, rows):
        return dense_dot(a, w[...].astype(a.dtype), rows_per_device=rows,
                         min_rows=self.min_rows).astype(a.dtype)

    def project(self, x, positions, rows=None):
        """x ``[B, S, d]``, positions ``[B, S]`` -> (q_nope ``[B, S, h, nope]``, q_rope ``[B, S,
        h, rope]``, latent ``[B, S, kv_lora]`` (normed), k_rope ``[B, S, rope]``), RoPE
        applied, in x's dtype: what the latent cache stores and what attends over it."""
        cfg = self.cfg
        b, s, _ = x.shape
        h, nope, rdim = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim

        def mm(a, w):
            return self._mm(a, w, rows)

        q = mm(self.q_a_norm(mm(x, self.q_a)), self.q_b) if self.wq is None else mm(x, self.wq)
        q = q.reshape(b, s, h, nope + rdim)
        q_nope, q_rope = q[..., :nope], q[..., nope:]
        kv = mm(x, self.kv_a)
        ckv, k_rope = self.kv_a_norm(kv[..., : cfg.kv_lora_rank]), kv[..., cfg.kv_lora_rank :]
        inv_freq, factor = rope_frequencies(rdim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position)
        q_rope = rope(q_rope, positions, inv_freq, cfg.rope_interleave, factor)
        k_rope = rope(k_rope[:, :, None, :], positions, inv_freq, cfg.rope_interleave, factor)[:, :, 0]
        return q_nope, q_rope, ckv, k_rope

    def attend(self, q_nope, q_rope, cache_ckv, cache_krope, mask, rows=None,
               form: str | None = None):
        """The queries over a latent cache ``[B, L, kv_lora]`` and rope keys ``[B, L, rope]``
        where mask ``[B, S, L]`` -> ``[B, S, d]`` (output projection applied)."""
        cfg = self.cfg
        b, s = q_nope.shape[:2]
        dt = q_nope.dtype
        h, nope, vdim = cfg.n_heads, cfg.qk_nope_head_dim, cfg.v_head_dim

        def mm(a, w, rows=rows):
            return self._mm(a, w, rows)

        form = form or (cfg.mla_form if cfg.mla_form != "auto"
                        else "absorbed" if absorbed(cfg, s) else "expanded")
        if form not in ("absorbed", "expanded"):
            raise ValueError(f"form must be 'absorbed' or 'expanded', got {form!r}")
        latent, k_rope_all = cache_ckv.astype(dt), cache_krope.astype(dt)
        mask = mask[:, None]
        scale = softmax_scale(cfg)
        if form == "absorbed":
            w = self.kv_b[...].astype(dt).reshape(cfg.kv_lora_rank, h, nope + vdim)
            q_latent = jnp.einsum("bshn,chn->bshc", q_nope, w[..., :nope],
                                  preferred_element_type=_F32).astype(dt)
            out_latent = latent_attention(q_latent, q_rope, latent, k_rope_all, mask, scale)
            out = jnp.einsum("bshc,chv->bshv", out_latent, w[..., nope:],
                             preferred_element_type=_F32).astype(dt)
        else:
            rope_scores = jnp.einsum("bshd,bld->bhsl", q_rope, k_rope_all,
                                     preferred_element_type=_F32)

            def softmax(nope_scores):
                scores = (nope_scores + rope_scores) * scale
                return jax.nn.softmax(jnp.where(mask, scores, -1e30), axis=-1).astype(dt)

            length = cache_ckv.shape[1]
            # over the cache's rows, not the tokens'
            expanded = mm(latent, self.kv_b, None).reshape(b, length, h, nope + vdim)
            k_nope, v = expanded[..., :nope], expanded[..., nope:]
            probs = softmax(jnp.einsum("bshd,blhd->bhsl", q_nope, k_nope,
                                       preferred_element_type=_F32))
            out = jnp.einsum("bhsl,blhd->bshd", probs, v, preferred_element_type=_F32).astype(dt)
        return mm(out.reshape(b, s, h * vdim), self.wo)
