"""Routers: logits ``[N, E]`` -> ``topk_ids [N, k] int32``, ``topk_weights [N, k] float32``.

Pure functions covering what released MoE models use:

* ``softmax_topk``: softmax over all experts, top-k, optional renormalisation
  (Mixtral and Qwen3-MoE renormalise; Qwen2-MoE and OLMoE do not).
* ``topk_softmax``: top-k on the logits, softmax over the k picked.
* ``sigmoid_grouped_topk``: DeepSeek-V3: sigmoid scores, a selection-only bias, experts in
  groups with only the best ``topk_group`` groups eligible, weights from the unbiased scores,
  optional renormalisation, then a routed scaling factor.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

_F32 = jnp.float32


def softmax_topk(logits: jax.Array, k: int, *, renormalize: bool) -> tuple[jax.Array, jax.Array]:
    probs = jax.nn.softmax(logits.astype(_F32), axis=-1)
    weights, ids = lax.top_k(probs, k)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return ids.astype(jnp.int32), weights


def topk_softmax(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    top, ids = lax.top_k(logits.astype(_F32), k)
    return ids.astype(jnp.int32), jax.nn.softmax(top, axis=-1)


def sigmoid_grouped_topk(
    logits: jax.Array,
    k: int,
    *,
    bias: jax.Array | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    renormalize: bool = True,
    routed_scaling_factor: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """DeepSeek-V3 routing (``noaux_tc``). Group score = sum of the group's top-2 biased scores."""
    n, num_experts = logits.shape
    if num_experts % n_group:
        raise ValueError(f"num_experts={num_experts} is not divisible by n_group={n_group}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group={topk_group} must be in [1, n_group={n_group}]")
    eligible = topk_group * (num_experts // n_group) if n_group > 1 else num_experts
    if k > eligible:
        # top_k over the masked scores would pick -inf experts of excluded groups
        raise ValueError(
            f"k={k} exceeds the {eligible} experts eligible per token (topk_group={topk_group} "
            f"of n_group={n_group} groups of {num_experts // n_group} experts)")
    scores = jax.nn.sigmoid(logits.astype(_F32))
    choice = scores if bias is None else scores + bias.astype(_F32)
    if n_group > 1:
        grouped = choice.reshape(n, n_group, num_experts // n_group)
        top2 = min(2, grouped.shape[-1])
        group_scores = lax.top_k(grouped, top2)[0].sum(-1)  # [n, n_group]
        _, keep = lax.top_k(group_scores, topk_group)
        group_mask = (keep[:, :, None] == jnp.arange(n_group)).any(axis=1)  # [n, n_group]
        expert_mask = jnp.repeat(group_mask, num_experts // n_group, axis=1)
        choice = jnp.where(expert_mask, choice, -jnp.inf)
    _, ids = lax.top_k(choice, k)
    weights = jnp.take_along_axis(scores, ids, axis=-1)
    if renormalize:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return ids.astype(jnp.int32), weights * routed_scaling_factor


#: A choice id meaning "no expert": the choice contributes nothing (DeepEP's and MaxText's
#: padding convention). Every other id outside ``[0, E)`` is an error.
NO_EXPERT = -1


def screen_choices(
    topk_ids: jax.Array, topk_weights: jax.Array, num_experts: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The one rule for choice ids, applied where user ids enter a schedule or a baseline.

    topk_ids ``[T, k] int``, topk_weights ``[T, k]`` -> (ids ``[T, k] int32`` where a
    :data:`NO_EXPERT` choice or an invalid id is ``num_experts``, the schedules' "no copy"
    (never sent, reads a 0 row); weights ``[T, k] float32`` with those choices' weights 0;
    invalid ``[T] bool``: tokens with an id outside ``[-1, E)``, whose output
    :func:`poison_rows` makes NaN: under jit an error cannot be raised, and a NaN in that
    token's row (never another token's, never zeros) is what says so. Eager callers
    raise first (:func:`check_choice_ids`).
    """
    ids = topk_ids.astype(jnp.int32)
    none = ids == NO_EXPERT
    bad = ((ids < NO_EXPERT) | (ids >= num_experts))
    skip = none | bad
    return (jnp.where(skip, num_experts, ids), jnp.where(skip, 0.0, topk_weights.astype(_F32)),
            bad.any(axis=-1))


def poison_rows(y: jax.Array, invalid: jax.Array) -> jax.Array:
    """y ``[T, d]`` with the rows of ``invalid`` ``[T] bool`` tokens NaN (see
    :func:`screen_choices`)."""
    return jnp.where(invalid[:, None], jnp.nan, y)


def check_choice_ids(topk_ids, num_experts: int, row0: int = 0) -> None:
    """Raises ``ValueError`` naming the first id outside ``[-1, E)`` of concrete ``topk_ids``
    (``-1`` is :data:`NO_EXPERT`); traced ids are left to :func:`screen_choices`. ``row0``:
    the global row of ``topk_ids[0]``, for the message."""
    import numpy as np

    if isinstance(topk_ids, jax.core.Tracer):
        return
    ids = np.asarray(topk_ids)
    bad = (ids < NO_EXPERT) | (ids >= num_experts)
    if bad.any():
        t, j = np.argwhere(bad)[0]
        raise ValueError(
            f"topk_ids out of range [0, {num_experts}) (or -1 for no expert): "
            f"topk_ids[{row0 + t}, {j}] = {ids[t, j]} ({int(bad.sum())} bad entries)")


def merge_repeated_choices(
    topk_ids: jax.Array, topk_weights: jax.Array, num_experts: int
) -> tuple[jax.Array, jax.Array]:
    """Folds a token's repeated expert choices into the first one: exact, since
    ``w1 * e(x) + w2 * e(x) = (w1 + w2) * e(x)``.

    topk_ids ``[T, k] int`` in ``[0, E]`` (``E``: no copy, as :func:`screen_choices` leaves
    it), topk_weights ``[T, k]`` -> (ids ``[T, k] int32``
    where a choice repeating an earlier one of its row is ``num_experts``, meaning "no copy";
    weights ``[T, k] float32``: a first occurrence carries the sum of its repeats' weights,
    a repeat 0). Rows without repeats come back unchanged. Schedules whose buffers are sized
    for at most ``min(k, El)`` copies of a token per rank (decode, the capacity baseline)
    rely on it: their bounds hold only for distinct ids.
    """
    ids = topk_ids.astype(jnp.int32)
    w = topk_weights.astype(_F32)
    k = ids.shape[-1]
    if k == 1:
        return ids, w
    same = ids[..., :, None] == ids[..., None, :]  # [T, k, k]: choice j repeats choice i
    repeat = (same & jnp.tri(k, k, -1, dtype=bool)).any(axis=-1)  # an earlier i has j's id
    merged = jnp.where(same, w[..., None, :], 0.0).sum(axis=-1)
    return jnp.where(repeat, num_experts, ids), jnp.where(repeat, 0.0, merged)


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """How a model routes. ``method``: "softmax_topk" | "topk_softmax" | "sigmoid_grouped"."""

    method: Literal["softmax_topk", "topk_softmax", "sigmoid_grouped"] = "softmax_topk"
    renormalize: bool = True
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    score_bias: bool = False  # a learned selection-only bias (DeepSeek-V3 e_score_correction_bias)

    def __post_init__(self):
        if self.method not in ("softmax_topk", "topk_softmax", "sigmoid_grouped"):
            raise ValueError(f"unknown routing method {self.method!r}")
        if self.score_bias and self.method != "sigmoid_grouped":
            raise ValueError("score_bias is only used by method='sigmoid_grouped'")


def route(
    logits: jax.Array, k: int, config: RouterConfig, bias: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """logits ``[N, E]`` -> (``topk_ids [N, k] int32``, ``topk_weights [N, k] float32``)."""
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"k={k} must be in [1, num_experts={logits.shape[-1]}]")
    if config.method == "softmax_topk":
        return softmax_topk(logits, k, renormalize=config.renormalize)
    if config.method == "topk_softmax":
        return topk_softmax(logits, k)
    return sigmoid_grouped_topk(
        logits,
        k,
        bias=bias,
        n_group=config.n_group,
        topk_group=config.topk_group,
        renormalize=config.renormalize,
        routed_scaling_factor=config.routed_scaling_factor,
    )
