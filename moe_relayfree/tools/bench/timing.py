"""Comparing programs on a noisy machine: interleaved rounds, medians, paired ratios.

Every benchmark compares implementations measured in the same process, round by round: each
round times every program once, in an order that rotates from round to round, so a slow spell
of the machine (or the cache state one program leaves behind) falls on every program, not on
one. Ratios are medians of per-round ratios; :func:`median_ci` gives their bootstrap interval.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np


def rotations(names: Sequence[str], rounds: int | None = None) -> Iterator[list[str]]:
    """Round ``r``'s order: ``names`` rotated by ``r`` (with two names: A B, B A, A B, ...);
    ``rounds=None``: without end."""
    names = list(names)
    r = 0
    while rounds is None or r < rounds:
        shift = r % len(names)
        yield names[shift:] + names[:shift]
        r += 1


def _ready(value):
    import jax

    return jax.block_until_ready(value)


def median_seconds(fn: Callable, *args, repeats: int) -> float:
    """Median wall seconds of ``fn(*args)`` over ``repeats`` calls, after one untimed call."""
    _ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def interleaved(fns: dict[str, Callable], args: Sequence = (), *, min_rounds: int,
                seconds: float = 0.0, wall_seconds: float = 0.0, max_rounds: int | None = None,
                warm_each: bool = True) -> dict[str, np.ndarray]:
    """Times each of ``fns`` (called as ``fn(*args)``) once per round, orders rotating.

    Rounds go on past ``min_rounds`` until every program has been timed ``seconds`` in all
    and ``wall_seconds`` have passed since the first round (at most ``max_rounds``): many
    paired rounds are what resolves a few percent between programs. ``warm_each``: an untimed call right before each timed one, so
    no program is timed cold after another one evicted its data. Returns
    ``{name: [rounds] float64 seconds}``; round ``i`` of every program is paired.
    """
    times: dict[str, list[float]] = {n: [] for n in fns}
    begin = time.perf_counter()
    for r, order in enumerate(rotations(list(fns))):
        enough = (r >= min_rounds and min(sum(t) for t in times.values()) >= seconds
                  and time.perf_counter() - begin >= wall_seconds)
        if enough or (r >= min_rounds and max_rounds is not None and r >= max_rounds):
            break
        for n in order:
            if warm_each:
                _ready(fns[n](*args))
            start = time.perf_counter()
            _ready(fns[n](*args))
            times[n].append(time.perf_counter() - start)
    return {n: np.asarray(t) for n, t in times.items()}


def interleaved_calls(calls: dict[str, Callable[[], tuple[Any, float]]],
                      rounds: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Like :func:`interleaved` for calls that time themselves (a whole ``generate``, a
    fresh process): each returns ``(output, seconds)``. Returns the per-round seconds and
    each call's last output."""
    times: dict[str, list[float]] = {n: [] for n in calls}
    outs: dict[str, Any] = {}
    for order in rotations(list(calls), rounds):
        for n in order:
            outs[n], seconds = calls[n]()
            times[n].append(seconds)
    return {n: np.asarray(t) for n, t in times.items()}, outs


def median_ci(ratios: Sequence[float], level: float = 0.95, draws: int = 4000) -> list[float]:
    """Bootstrap interval (fixed seed) of the median of per-round ratios: ``[low, high]``."""
    v = np.asarray(ratios, np.float64)
    medians = np.median(np.random.default_rng(0).choice(v, (draws, v.size)), axis=1)
    tail = (1 - level) / 2 * 100
    return np.percentile(medians, [tail, 100 - tail]).tolist()


def ratio_summary(ratios: Sequence[float]) -> dict:
    """``{"median", "quartiles", "ci95"}`` of per-round ratios."""
    v = np.asarray(ratios, np.float64)
    return {"median": float(np.median(v)), "quartiles": np.percentile(v, [25, 75]).tolist(),
            "ci95": median_ci(v)}
