"""Dense single-device reference: the math every schedule must reproduce."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_relayfree.experts import swiglu


@jax.jit  # one compiled program per shape: op-by-op dispatch of it cost tests seconds
def dense_moe_reference(
    x: jax.Array,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
) -> jax.Array:
    """``y[t] = sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t])``.

    x ``[N, d]``, topk_ids ``[N, k] int``, topk_weights ``[N, k]``, w_gate/w_up ``[E, d, f]``,
    w_down ``[E, f, d]`` -> ``[N, d]`` in x.dtype (weighted sum accumulated in float32).
    Every expert runs on every token; meant for tests and small shapes.
    """
    num_experts = w_gate.shape[0]
    combine = jnp.zeros((x.shape[0], num_experts), jnp.float32)
    combine = combine.at[jnp.arange(x.shape[0])[:, None], topk_ids].add(
        topk_weights.astype(jnp.float32)
    )
    per_expert = jax.vmap(swiglu, in_axes=(None, 0, 0, 0))(x, w_gate, w_up, w_down)  # [E, N, d]
    y = jnp.einsum("ne,end->nd", combine, per_expert.astype(jnp.float32))
    return y.astype(x.dtype)
