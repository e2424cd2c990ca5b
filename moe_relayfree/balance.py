"""Load-balance statistics and training terms for a router (pure functions).

``N`` tokens, ``E`` experts, ``k`` choices per token. All results are float32.

* :func:`expert_load`: fraction of the ``N*k`` token copies each expert received (sums to 1).
* :func:`router_probabilities`: the per-token distribution over experts that the balance loss
  pushes toward uniform: softmax of the logits, or for sigmoid routers (DeepSeek-V3) the
  sigmoid scores normalised per token, as in DeepSeek-V3's sequence-wise balance loss.
* :func:`load_balancing_loss`: Switch Transformer / GShard auxiliary loss
  ``E * sum_e load_e * mean_prob_e``; 1.0 when both are uniform, up to ``E`` when one expert
  takes everything. Gradients flow through the probabilities only (top-k picks are discrete).
* :func:`router_z_loss`: ST-MoE z-loss ``mean_t logsumexp(logits_t)^2``.
* :func:`update_score_bias`: DeepSeek-V3's auxiliary-loss-free balancing: after each step,
  ``bias += rate * sign(mean_load - load)`` raises the selection bias of under-loaded experts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_F32 = jnp.float32

# Names the MoE layer sows its statistics and loss terms under (``nnx.Intermediate``).
STATS = ("router_load", "router_prob_mean")
LOSSES = ("load_balancing_loss", "router_z_loss")


def expert_load(topk_ids: jax.Array, num_experts: int) -> jax.Array:
    """topk_ids ``[N, k]`` int -> ``[E] f32``: share of the token copies per expert."""
    counts = jnp.zeros((num_experts,), _F32).at[topk_ids.reshape(-1)].add(1.0)
    return counts / max(topk_ids.size, 1)


def router_probabilities(logits: jax.Array, method: str) -> jax.Array:
    """logits ``[N, E]`` -> ``[N, E] f32`` rows summing to 1 (see the module docstring)."""
    logits = logits.astype(_F32)
    if method == "sigmoid_grouped":
        scores = jax.nn.sigmoid(logits)
        return scores / (scores.sum(axis=-1, keepdims=True) + 1e-20)
    return jax.nn.softmax(logits, axis=-1)


def load_balancing_loss(probs: jax.Array, topk_ids: jax.Array) -> jax.Array:
    """probs ``[N, E]``, topk_ids ``[N, k]`` -> ``[] f32``: ``E * sum_e load_e * mean_prob_e``."""
    num_experts = probs.shape[-1]
    load = jax.lax.stop_gradient(expert_load(topk_ids, num_experts))
    return num_experts * jnp.sum(load * probs.astype(_F32).mean(axis=0))


def router_z_loss(logits: jax.Array) -> jax.Array:
    """logits ``[N, E]`` -> ``[] f32``: mean squared log-partition function."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(_F32), axis=-1)))


def update_score_bias(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
    """bias ``[E]``, load ``[E]`` (any scale: shares or counts) -> ``[E] f32`` updated bias.

    DeepSeek-V3 report, auxiliary-loss-free load balancing (their rate: 0.001).
    """
    load = load.astype(_F32)
    return bias.astype(_F32) + rate * jnp.sign(load.mean() - load)


def total_aux_loss(intermediates) -> jax.Array:
    """Sum of every loss term the MoE layers of a model sowed, float32 scalar (0 if none).

    ``intermediates``: the state captured from a forward pass, e.g.
    ``y, inter = nnx.capture(model, nnx.Intermediate)(x)``; every layer's terms are added.
    """
    total = jnp.zeros((), _F32)
    for path, leaf in jax.tree_util.tree_leaves_with_path(intermediates):
        names = {getattr(p, "key", getattr(p, "name", None)) for p in path}
        if names & set(LOSSES):
            total = total + jnp.sum(jnp.asarray(leaf, _F32))
    return total
