"""Choosing between the prefill and decode schedules by tokens per rank, and calibrating it."""

from __future__ import annotations

import time
from typing import Literal, Sequence

import numpy as np

Schedule = Literal["auto", "prefill", "decode"]

# Tokens per rank at or below which "auto" picks the decode schedule. DeepEP's low-latency
# mode is sized for 128 tokens per rank and vllm-ascend switches at 512; decode here runs every
# local expert on all P*T slots, so the default is lower. Calibrate per machine and model shape
# with calibrate_decode_threshold.
DEFAULT_DECODE_THRESHOLD = 64

_threshold_override: int | None = None


def set_decode_threshold(tokens_per_rank: int | None) -> None:
    """Sets the process-wide auto threshold (``None`` restores the default)."""
    global _threshold_override
    if tokens_per_rank is not None and tokens_per_rank < 0:
        raise ValueError("tokens_per_rank must be >= 0")
    _threshold_override = tokens_per_rank


def decode_threshold() -> int:
    return DEFAULT_DECODE_THRESHOLD if _threshold_override is None else _threshold_override


def select_schedule(
    tokens_per_rank: int, schedule: Schedule = "auto", threshold: int | None = None
) -> Literal["prefill", "decode"]:
    """Resolves ``schedule``; "auto" picks decode when ``tokens_per_rank <= threshold``."""
    if schedule in ("prefill", "decode"):
        return schedule
    if schedule != "auto":
        raise ValueError(f"schedule must be 'auto', 'prefill' or 'decode', got {schedule!r}")
    limit = decode_threshold() if threshold is None else threshold
    return "decode" if tokens_per_rank <= limit else "prefill"


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
    tokens_per_rank: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128, 256),
    repeats: int = 5,
    dtype=None,
    apply: bool = False,
    seed: int = 0,
) -> dict:
    """Times both schedules on this machine and returns the crossover.

    Returns ``{"threshold": int, "tokens_per_rank": [...], "decode_s": [...], "prefill_s": [...]}``
    (median seconds per layer call); ``apply=True`` also makes it the process-wide threshold.
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
        row = {}
        for schedule in ("decode", "prefill"):
            fn = jax.jit(
                lambda x, ids, wts, *w, s=schedule: expert_parallel_moe(
                    x, ids, wts, *w, mesh=mesh, axis=axis, schedule=s
                )
            )
            fn(x, ids, wts, *w).block_until_ready()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn(x, ids, wts, *w).block_until_ready()
                times.append(time.perf_counter() - start)
            row[schedule] = float(np.median(times))
        results["tokens_per_rank"].append(int(t))
        results["decode_s"].append(row["decode"])
        results["prefill_s"].append(row["prefill"])
    results["threshold"] = crossover(
        results["tokens_per_rank"], results["decode_s"], results["prefill_s"]
    )
    if apply:
        set_decode_threshold(results["threshold"])
    return results
