"""Calibrating the decode/prefill threshold on this machine, and alternating timing loops."""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from moe_relayfree.selection import set_decode_threshold


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


def time_alternately(fns: dict, args: Sequence, *, min_rounds: int, seconds: float = 0.0,
                     max_rounds: int | None = None, warm_each: bool = False) -> dict:
    """Times each program of ``fns`` once per round, in an order that alternates from round to
    round, so a slow spell of the machine hits every program rather than one.

    Rounds go on past ``min_rounds`` until every program has been timed ``seconds`` in all (at
    most ``max_rounds``). ``warm_each``: an untimed call right before each timed one. Returns
    ``{name: [rounds] float64 seconds}``; round ``i`` of every program is paired.
    """
    import jax

    names = list(fns)
    times = {n: [] for n in names}
    r = 0
    while r < min_rounds or (min(sum(t) for t in times.values()) < seconds
                             and (max_rounds is None or r < max_rounds)):
        for n in (names if r % 2 == 0 else names[::-1]):
            if warm_each:
                jax.block_until_ready(fns[n](*args))
            start = time.perf_counter()
            jax.block_until_ready(fns[n](*args))
            times[n].append(time.perf_counter() - start)
        r += 1
    return {n: np.asarray(t) for n, t in times.items()}


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
        times = time_alternately(fns, (x, ids, wts, *w), min_rounds=repeats)
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
