"""A serving benchmark's client side, as ``vllm bench serve`` measures: requests with seeded
synthetic prompt and output lengths, sent at a request rate (Poisson arrivals, or gamma with a
burstiness) or all at once, optionally under a max concurrency, each streamed through
``/v1/completions``; then per request time to first token (TTFT), time per output token
(TPOT), the gaps between tokens (ITL) and end-to-end latency (E2EL), and the run's
throughput and goodput under latency limits (DistServe: requests per second that meet every
limit). Nothing is downloaded: prompts are random token ids.

Definitions (vLLM's): TTFT = first token received - request sent; TPOT = (E2EL - TTFT) /
(output tokens - 1), for requests of more than one token; ITL = every gap between consecutive
streamed chunks, pooled over requests; output tokens from the stream's final usage chunk
(``stream_options.include_usage``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time

import numpy as np

METRICS = ("ttft", "tpot", "itl", "e2el")


@dataclasses.dataclass(frozen=True)
class Workload:
    """``num_prompts`` requests of ``input_len`` and ``output_len`` tokens (each drawn uniformly
    within ``range_ratio`` of it), token ids in ``[low, high)``, after ``prefix_len`` tokens
    every prompt starts with (a shared system prompt: vLLM's ``--random-prefix-len``), sent at
    ``rate`` per second (``inf``: all at once) with gamma ``burstiness`` (1: Poisson), at most
    ``max_concurrency`` in flight (None: no cap); ``seed`` fixes lengths, ids and arrivals."""

    num_prompts: int = 64
    input_len: int = 64
    output_len: int = 32
    range_ratio: float = 0.5
    rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    seed: int = 0
    low: int = 3
    high: int = 250
    prefix_len: int = 0

    def requests(self) -> list[tuple[list[int], int]]:
        """(prompt token ids, max_tokens) per request."""
        rng = np.random.default_rng(self.seed)

        def lengths(mean):
            lo, hi = max(1, int(mean * (1 - self.range_ratio))), int(mean * (1 + self.range_ratio))
            return rng.integers(lo, max(lo, hi) + 1, self.num_prompts)

        ins, outs = lengths(self.input_len), lengths(self.output_len)
        prefix = np.random.default_rng([self.seed, 2]).integers(self.low, self.high,
                                                                self.prefix_len).tolist()
        return [(prefix + rng.integers(self.low, self.high, n).tolist(), int(m))
                for n, m in zip(ins, outs)]

    def arrivals(self) -> np.ndarray:
        """Send times in seconds from the start ``[num_prompts]``: cumulative gamma intervals of
        mean ``1 / rate`` (shape ``burstiness``), all zero at an infinite rate."""
        if math.isinf(self.rate):
            return np.zeros(self.num_prompts)
        rng = np.random.default_rng(self.seed + 1)
        theta = 1.0 / (self.rate * self.burstiness)
        return np.cumsum(rng.gamma(self.burstiness, theta, self.num_prompts))


@dataclasses.dataclass
class Result:
    """One request as the client saw it (seconds; ``error``: why it failed)."""

    prompt_tokens: int
    ok: bool = False
    output_tokens: int = 0
    ttft: float = math.nan
    e2el: float = math.nan
    itl: list = dataclasses.field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> float:
        return ((self.e2el - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1
                else math.nan)


async def _send(client, url: str, model: str, prompt: list[int], max_tokens: int) -> Result:
    result = Result(len(prompt))
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                now = time.perf_counter()
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices"):
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
        result.e2el = time.perf_counter() - start
        result.ok = last is not None and result.output_tokens > 0
        if not result.ok:
            result.error = "no tokens streamed"
    except Exception as e:  # a refused connection, a reset: counted as failed
        result.error = f"{type(e).__name__}: {e}"
    return result


async def run_async(url: str, model: str, workload: Workload, timeout_s: float = 600) -> dict:
    """Sends ``workload`` to the server at ``url``; returns ``{"results": [Result],
    "duration_s"}`` (from the first send to the last answer)."""
    import httpx

    requests, arrivals = workload.requests(), workload.arrivals()
    gate = asyncio.Semaphore(workload.max_concurrency or len(requests))
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        start = time.perf_counter()

        async def one(i):
            await asyncio.sleep(max(0.0, start + arrivals[i] - time.perf_counter()))
            async with gate:
                return await _send(client, url, model, *requests[i])

        results = await asyncio.gather(*(one(i) for i in range(len(requests))))
        return {"results": list(results), "duration_s": time.perf_counter() - start}


def run(url: str, model: str, workload: Workload, timeout_s: float = 600) -> dict:
    return asyncio.run(run_async(url, model, workload, timeout_s))


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> ``{"ttft": 500.0, "tpot": 50.0}`` (milliseconds)."""
    limits = {}
    for item in items or []:
        name, _, value = item.partition(":")
        if name not in ("ttft", "tpot", "e2el") or not value:
            raise ValueError(f"a goodput limit is ttft:MS, tpot:MS or e2el:MS, got {item!r}")
        limits[name] = float(value)
        if not limits[name] > 0:
            raise ValueError(f"a goodput limit must be > 0 ms, got {item!r}")
    return limits


def summarize(results: list[Result], duration_s: float, limits: dict[str, float] | None = None,
              percentiles=(50, 90, 99)) -> dict:
    """The run's report: completed / failed, request, output and total token throughput, per
    metric the mean, median, std and ``percentiles`` in ms, and goodput under ``limits`` (ms;
    a request counts only if it meets every one; a one-token request has no TPOT and meets a
    TPOT limit)."""
    done = [r for r in results if r.ok]
    out = sum(r.output_tokens for r in done)
    report = {"completed": len(done), "failed": len(results) - len(done),
              "duration_s": duration_s,
              "request_throughput": len(done) / duration_s,
              "output_throughput": out / duration_s,
              "total_token_throughput": (out + sum(r.prompt_tokens for r in done)) / duration_s,
              "errors": sorted({r.error for r in results if r.error})[:5]}
    values = {"ttft": [r.ttft for r in done], "tpot": [r.tpot for r in done if r.output_tokens > 1],
              "itl": [g for r in done for g in r.itl], "e2el": [r.e2el for r in done]}
    for name in METRICS:
        v = 1e3 * np.asarray(values[name], np.float64)
        stats = {"mean": float(v.mean()) if v.size else math.nan,
                 "median": float(np.median(v)) if v.size else math.nan,
                 "std": float(v.std()) if v.size else math.nan}
        for p in percentiles:
            stats[f"p{p}"] = float(np.percentile(v, p)) if v.size else math.nan
        report[f"{name}_ms"] = stats
    if limits:
        def good(r):
            got = {"ttft": r.ttft, "tpot": r.tpot if r.output_tokens > 1 else 0.0, "e2el": r.e2el}
            return all(1e3 * got[k] <= ms for k, ms in limits.items())

        report["goodput_limits_ms"] = dict(limits)
        report["good_requests"] = sum(good(r) for r in done)
        report["goodput"] = report["good_requests"] / duration_s
    return report


__all__ = ["METRICS", "Result", "Workload", "parse_goodput", "run", "run_async", "summarize"]
