"""Small building blocks shared by the attention variants: RMSNorm and rotary embeddings."""

from __future__ import annotations

import math

import jax
import numpy as np
import jax.numpy as jnp
from flax import nnx

from moe_relayfree_models.config import RopeScaling

_F32 = jnp.float32


class RMSNorm(nnx.Module):
    def __init__(self, size: int, eps: float, param_dtype):
        self.weight = nnx.Param(jnp.ones((size,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(_F32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.weight[...].astype(_F32)).astype(x.dtype)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction ``0.1 * mscale * ln(scale) + 1`` (1 for ``scale <= 1``)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(dim: int, theta: float, scaling: RopeScaling | None = None,
                     max_position: int | None = None) -> tuple[np.ndarray, float]:
    """(inverse frequencies ``[dim/2] float32``, attention factor): what transformers'
    ``ROPE_INIT_FUNCTIONS[rope_type]`` computes for a rotary width ``dim`` (in float32, as it
    does), static per model. The attention factor scales cos and sin (YaRN; 1 otherwise)."""
    f32 = np.float32
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(f32) / f32(dim)
    pos_freqs = np.power(f32(theta), exponents, dtype=f32)
    inv_freq = (f32(1.0) / pos_freqs).astype(f32)
    if scaling is None:
        return inv_freq, 1.0
    if scaling.kind == "linear":
        return (inv_freq / f32(scaling.factor)).astype(f32), 1.0
    if scaling.kind == "llama3":
        old = scaling.original_max_position
        low_wavelen = old / scaling.low_freq_factor
        high_wavelen = old / scaling.high_freq_factor
        wavelen = f32(2 * math.pi) / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / f32(scaling.factor), inv_freq)
        smooth = ((old / wavelen - scaling.low_freq_factor)
                  / (scaling.high_freq_factor - scaling.low_freq_factor)).astype(f32)
        smoothed = ((1 - smooth) * scaled / f32(scaling.factor) + smooth * scaled).astype(f32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(f32), 1.0
    # yarn
    factor = scaling.factor
    if factor is None:
        factor = max_position / scaling.original_max_position
    attention = scaling.attention_factor
    if attention is None:
        if scaling.mscale and scaling.mscale_all_dim:
            attention = yarn_mscale(factor, scaling.mscale) / yarn_mscale(factor, scaling.mscale_all_dim)
        else:
            attention = yarn_mscale(factor)

    def correction_dim(rotations):
        return (dim * math.log(scaling.original_max_position / (rotations * 2 * math.pi))
                / (2 * math.log(theta)))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=f32) - f32(low)) / f32(high - low), 0, 1).astype(f32)
    extrapolation = (f32(1) - ramp).astype(f32)
    interpolation = (f32(1.0) / (f32(factor) * pos_freqs)).astype(f32)
    inv = interpolation * (f32(1) - extrapolation) + inv_freq * extrapolation
    return inv.astype(f32), float(attention)


def rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, interleave: bool = False,
         attention_factor: float = 1.0) -> jax.Array:
    """Rotary embedding on the last dim of x ``[B, S, H, D]``; positions ``[B, S]``;
    inv_freq ``[D/2]`` (:func:`rope_frequencies`); cos and sin scaled by ``attention_factor``.

    Default: rotate-half pairs ``(x_i, x_{i+D/2})`` (the Hugging Face Llama layout).
    ``interleave``: pairs ``(x0, x1), (x2, x3), ...`` (DeepSeek checkpoints), output in the
    de-interleaved order Hugging Face computes it in (the same for queries and keys).
    """
    half = x.shape[-1] // 2
    if inv_freq.shape != (half,):
        raise ValueError(f"inv_freq must be [{half}] for a rotary width {x.shape[-1]}, "
                         f"got {inv_freq.shape}")
    angles = positions.astype(_F32)[..., None] * jnp.asarray(inv_freq, _F32)  # [B, S, half]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
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
