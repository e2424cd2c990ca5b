"""Shared fixtures-as-functions for the tests."""

import jax
import jax.numpy as jnp
import numpy as np


def make_mesh(num_ranks: int, axis: str = "ep"):
    return jax.make_mesh((num_ranks,), (axis,), devices=jax.devices()[:num_ranks])


def moe_inputs(n, d, f, e, k, *, seed=0, dtype=jnp.float32, ids=None):
    """Random tokens, distinct top-k ids per token, positive weights, expert weights."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    if ids is None:
        ids = np.stack([rng.choice(e, size=k, replace=False) for _ in range(n)]).astype(np.int32)
    w = rng.uniform(0.1, 1.0, size=(n, k)).astype(np.float32)
    wg = (rng.standard_normal((e, d, f)) / np.sqrt(d)).astype(np.float32)
    wu = (rng.standard_normal((e, d, f)) / np.sqrt(d)).astype(np.float32)
    wd = (rng.standard_normal((e, f, d)) / np.sqrt(f)).astype(np.float32)
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    return cast(x), jnp.asarray(ids), jnp.asarray(w), cast(wg), cast(wu), cast(wd)


def skewed_ids(kind, n, k, num_experts, num_ranks):
    """Adversarial routing: ``one_expert`` (every first choice is expert 0), ``one_rank``
    (every copy lands on the last rank), ``empty_experts`` (only even experts chosen)."""
    rng = np.random.default_rng(0)
    local = num_experts // num_ranks
    if kind == "one_expert":
        rest = [rng.choice(np.arange(1, num_experts), k - 1, replace=False) for _ in range(n)]
        return np.array([[0, *r] for r in rest], np.int32)
    if kind == "one_rank":
        base = (num_ranks - 1) * local
        return np.stack([base + rng.choice(local, k, replace=False) for _ in range(n)]).astype(np.int32)
    if kind == "empty_experts":
        return np.stack([2 * rng.choice(num_experts // 2, k, replace=False) for _ in range(n)]).astype(np.int32)
    raise ValueError(kind)
