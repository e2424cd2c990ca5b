"""Dense single-device reference: the math every schedule must reproduce."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_relayfree.ffn import swiglu


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
    per_expert = jax.vmap(swiglu, in_axes=(None, 0, 0, 0))(x, w_gate, w_up, w_down)  # [E, N, d]
    # Each choice reads its own expert's row (no dense [N, E] combine matrix, whose zeros
    # times a NaN of an expert no token picked would make every output NaN); repeated
    # choices each count, in choice order.
    rows = per_expert[topk_ids, jnp.arange(x.shape[0])[:, None]].astype(jnp.float32)  # [N, k, d]
    y = jnp.zeros((x.shape[0], x.shape[1]), jnp.float32)
    for j in range(topk_ids.shape[1]):
        y = y + topk_weights[:, j, None].astype(jnp.float32) * rows[:, j]
    return y.astype(x.dtype)
