"""Small building blocks shared by the attention variants: RMSNorm and rotary embeddings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

_F32 = jnp.float32


class RMSNorm(nnx.Module):
    def __init__(self, size: int, eps: float, param_dtype):
        self.weight = nnx.Param(jnp.ones((size,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(_F32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.weight[...].astype(_F32)).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float, interleave: bool = False) -> jax.Array:
    """Rotary embedding on the last dim of x ``[B, S, H, D]``; positions ``[B, S]``.

    Default: rotate-half pairs ``(x_i, x_{i+D/2})`` (the Hugging Face Llama layout).
    ``interleave``: pairs ``(x0, x1), (x2, x3), ...`` (DeepSeek checkpoints), output in the
    de-interleaved order Hugging Face computes it in (the same for queries and keys).
    """
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, half, dtype=_F32) * 2.0 / x.shape[-1]))
    angles = positions.astype(_F32)[..., None] * inv_freq  # [B, S, half]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    xf = x.astype(_F32)
    x1, x2 = (xf[..., 0::2], xf[..., 1::2]) if interleave else (xf[..., :half], xf[..., half:])
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention_mask(start, num_queries: int, key_valid: jax.Array,
                   window: int | None = None) -> jax.Array:
    """Queries at cache rows ``[start, start+S)`` see earlier-or-equal keys that are not padding,
    and with a sliding ``window`` only the last ``window`` of them (query row ``q`` sees key
    row ``j`` when ``q - window < j <= q``, as Hugging Face's sliding-window mask does).
    key_valid ``[B, L]`` bool -> ``[B, S, L]`` bool."""
    length = key_valid.shape[1]
    q = (start + jnp.arange(num_queries))[:, None]
    j = jnp.arange(length)[None, :]
    visible = q >= j
    if window is not None:
        visible = visible & (q - j < window)
    return visible[None] & key_valid[:, None, :]
