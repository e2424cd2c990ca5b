"""Calibrating the decode/prefill threshold on this machine."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from moe_relayfree.selection import set_decode_threshold
from moe_relayfree.tools.bench.timing import interleaved


def crossover(tokens: Sequence[int], decode_s: Sequence[float], prefill_s: Sequence[float]) -> int:
    """The threshold (0 or one of ``tokens``) whose decode-below/prefill-above choice is fastest.

    Each size counts by its slowdown over the faster schedule at that size, so one noisy
    measurement moves the threshold by one step at most, not to 0.
    """
    rows = sorted(zip(tokens, decode_s, prefill_s))
    best, best_cost = 0, None
    for threshold in [0] + [t for t, _, _ in rows]:
        cost = sum((dec if t <= threshold else pre) / min(dec, pre) for t, dec, pre in rows)
        if best_cost is None or cost < best_cost - 1e-12:
            best, best_cost = threshold, cost
    return best


def calibrate_decode_threshold(
    mesh,
    *,
    d_model: int,
    d_ff: int,
    num_experts: int,
    k: int,
    axis: str = "ep",
    tokens_per_rank: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
    repeats: int = 5,
    dtype=None,
    apply: bool = False,
    seed: int = 0,
) -> dict:
    """Times both schedules on this machine and returns the crossover.

    Returns ``{"threshold": int, "tokens_per_rank": [...], "decode_s": [...], "prefill_s": [...]}``
    (median seconds per layer call); ``apply=True`` also makes it the process-wide threshold
    of the mesh's platform.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from moe_relayfree.api import expert_parallel_moe

    dtype = dtype or jnp.float32
    num_ranks = mesh.shape[axis]
    rng = np.random.default_rng(seed)
    # Inputs are placed once, so the timings are the layer's, not host-to-device copies.
    tok = NamedSharding(mesh, P(axis))
    exp = NamedSharding(mesh, P(axis, None, None))
    w = [
        jax.device_put(jnp.asarray(rng.standard_normal(s) / np.sqrt(s[1]), dtype), exp)
        for s in [(num_experts, d_model, d_ff)] * 2 + [(num_experts, d_ff, d_model)]
    ]
    results = {"tokens_per_rank": [], "decode_s": [], "prefill_s": []}
    for t in tokens_per_rank:
        n = t * num_ranks
        x = jax.device_put(jnp.asarray(rng.standard_normal((n, d_model)), dtype), tok)
        ids = np.argsort(rng.random((n, num_experts)), axis=1)[:, :k]
        ids = jax.device_put(jnp.asarray(ids, jnp.int32), tok)
        wts = jax.device_put(jnp.full((n, k), 1.0 / k, jnp.float32), tok)
        fns = {
            s: jax.jit(lambda x, ids, wts, *w, s=s: expert_parallel_moe(
                x, ids, wts, *w, mesh=mesh, axis=axis, schedule=s))
            for s in ("decode", "prefill")
        }
        for fn in fns.values():
            fn(x, ids, wts, *w).block_until_ready()
        times = interleaved(fns, (x, ids, wts, *w), min_rounds=repeats, warm_each=False)
        row = {s: float(np.median(v)) for s, v in times.items()}
        results["tokens_per_rank"].append(int(t))
        results["decode_s"].append(row["decode"])
        results["prefill_s"].append(row["prefill"])
    results["threshold"] = crossover(
        results["tokens_per_rank"], results["decode_s"], results["prefill_s"]
    )
    if apply:
        set_decode_threshold(results["threshold"], mesh.devices.flat[0].platform)
    return results
