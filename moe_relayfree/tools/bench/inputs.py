"""Inputs of one MoE layer call, placed on a mesh: the shapes every layer benchmark uses."""

from __future__ import annotations

import numpy as np


def layer_inputs(mesh, tokens_per_rank: int, num_experts: int, k: int, d: int, f: int, *,
                 axis: str = "ep", seed: int = 0, dtype=None) -> list:
    """``[x, ids, weights, w_gate, w_up, w_down]`` for ``N = P * tokens_per_rank`` tokens:

    x ``[N, d]`` standard normal; ids ``[N, k]`` int32, ``k`` distinct experts per token drawn
    uniformly; weights ``[N, k]`` f32 uniform in [0.1, 1); expert weights ``[E, d, f]``,
    ``[E, d, f]``, ``[E, f, d]`` scaled by 1/sqrt(fan-in). Tokens and experts split over
    ``axis``; x and the expert weights in ``dtype`` (default f32).
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    dtype = dtype or jnp.float32
    tok, exp = NamedSharding(mesh, P(axis)), NamedSharding(mesh, P(axis, None, None))
    rng = np.random.default_rng(seed)
    n, e = mesh.shape[axis] * tokens_per_rank, num_experts
    ids = np.argsort(rng.random((n, e)), axis=1)[:, :k].astype(np.int32)
    args = [jax.device_put(jnp.asarray(rng.standard_normal((n, d)), dtype), tok),
            jax.device_put(jnp.asarray(ids), tok),
            jax.device_put(jnp.asarray(rng.uniform(0.1, 1, (n, k)), jnp.float32), tok)]
    args += [jax.device_put(jnp.asarray(rng.standard_normal(s) / np.sqrt(s[1]), dtype), exp)
             for s in ((e, d, f), (e, d, f), (e, f, d))]
    return args


def case_inputs(mesh, case: dict, **kw) -> list:
    """:func:`layer_inputs` of a case dict with keys ``T`` (per rank), ``E``, ``k``, ``d``, ``f``."""
    return layer_inputs(mesh, case["T"], case["E"], case["k"], case["d"], case["f"], **kw)
