"""The feed-forward math every path shares: one SwiGLU expert and a dense projection.

Numerics, shared by every path and the dense reference: matmuls accumulate in float32, the
hidden activation is cast to the input dtype before the down projection (as bf16 checkpoints
run in Hugging Face), the expert output is cast to the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from moe_relayfree.config import Lowering

_F32 = jnp.float32


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """One expert. x ``[n, d]``, w_gate/w_up ``[d, f]``, w_down ``[f, d]`` -> ``[n, d]`` (x.dtype)."""
    return _swiglu_f32(x, w_gate, w_up, w_down, x.dtype).astype(x.dtype)


def _swiglu_f32(x, w_gate, w_up, w_down, dtype, rows_kept=None) -> jax.Array:
    """:func:`swiglu` for inputs of ``dtype``, before its last rounding: the f32 output. x and
    the weights may already be widened to f32 (the CPU kernel): the products and f32 sums are
    the same, and the hidden activation is still rounded to ``dtype``. ``rows_kept`` ``[n]
    bool``: the other rows' hidden activations (so their outputs) are 0."""
    g = jnp.dot(x, w_gate, preferred_element_type=_F32)
    u = jnp.dot(x, w_up, preferred_element_type=_F32)
    h = jax.nn.silu(g) * u
    if rows_kept is not None:
        h = jnp.where(rows_kept[:, None], h, 0.0)
    return jnp.dot(h.astype(dtype), w_down, preferred_element_type=_F32)



def dense_dot(x: jax.Array, w: jax.Array, *, rows_per_device: int | None = None,
              min_rows: int = Lowering().dense_min_rows) -> jax.Array:
    """``x [..., S, d] @ w [d, n]`` -> ``[..., S, n]`` float32: a dense projection (every
    token through the same matrix).

    On XLA:CPU a bf16 dot of one row is a matrix-vector product, which YNNPACK does not take:
    XLA converts all of ``w`` to f32 on every call. A decode step with one token per device did
    that for every dense matrix of the model, the LM head included. There the rows are padded
    with zeros to ``min_rows`` per device (``Lowering.dense_min_rows``) and the extra rows
    dropped. Other platforms, and dots that already have the rows, run as they are.

    rows_per_device: how many rows of x each device holds when x is ``[N, d]`` split over the
    devices; without it, x's second-to-last axis ``S`` (each device holds at least one row of
    the axes before it).
    """
    def plain(x, w):
        return jnp.dot(x, w, preferred_element_type=_F32)

    if x.ndim < 2 or x.dtype != jnp.bfloat16 or w.dtype != jnp.bfloat16:
        return plain(x, w)
    if (x.shape[-2] if rows_per_device is None else rows_per_device) >= min_rows:
        return plain(x, w)
    # with rows_per_device, each row becomes its own group of S=1 (x may hold many rows in all)
    grouped = x[..., None, :] if rows_per_device is not None else x
    s = grouped.shape[-2]

    def padded(x, w):
        zeros = [(0, 0)] * (x.ndim - 2) + [(0, min_rows - s), (0, 0)]
        return plain(jnp.pad(x, zeros), w)[..., :s, :]

    y = lax.platform_dependent(grouped, w, cpu=padded, default=plain)
    return y[..., 0, :] if rows_per_device is not None else y
