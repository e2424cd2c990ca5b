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
