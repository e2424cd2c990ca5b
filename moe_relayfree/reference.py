"""Dense single-device reference: the math every schedule must reproduce."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_relayfree.ffn import swiglu
from moe_relayfree.routing import check_choice_ids, poison_rows, screen_choices


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

    Ids follow the library's one rule (:func:`~moe_relayfree.routing.screen_choices`): ``-1``
    is "no expert" (the choice adds nothing); any other id outside ``[0, E)`` raises
    ``ValueError`` when the ids are concrete and makes that token's row NaN under jit. A
    reference never judges what it cannot compute (out-of-range ids used to read expert E-1).
    """
    check_choice_ids(topk_ids, w_gate.shape[0])
    return _reference(x, topk_ids, topk_weights, w_gate, w_up, w_down)


@jax.jit  # one compiled program per shape: op-by-op dispatch of it cost tests seconds
def _reference(x, topk_ids, topk_weights, w_gate, w_up, w_down):
    num_experts = w_gate.shape[0]
    ids, topk_weights, invalid = screen_choices(topk_ids, topk_weights, num_experts)
    topk_ids = jnp.minimum(ids, num_experts - 1)  # "no copy" reads any expert, with weight 0
    per_expert = jax.vmap(swiglu, in_axes=(None, 0, 0, 0))(x, w_gate, w_up, w_down)  # [E, N, d]
    # Each choice reads its own expert's row (no dense [N, E] combine matrix, whose zeros
    # times a NaN of an expert no token picked would make every output NaN); repeated
    # choices each count, in choice order.
    rows = per_expert[topk_ids, jnp.arange(x.shape[0])[:, None]].astype(jnp.float32)  # [N, k, d]
    y = jnp.zeros((x.shape[0], x.shape[1]), jnp.float32)
    for j in range(topk_ids.shape[1]):
        # a no-expert choice adds exactly nothing (0 * a NaN expert row would not)
        y = y + jnp.where(ids[:, j, None] < num_experts,
                          topk_weights[:, j, None].astype(jnp.float32) * rows[:, j], 0.0)
    return poison_rows(y, invalid).astype(x.dtype)
