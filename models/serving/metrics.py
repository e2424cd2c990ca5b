"""What ``/metrics`` reports (Prometheus text): the engine's counters, and per-request latency
histograms as a client sees them, timed when the engine hands tokens to their requests (a
step after they were computed: the host runs a step ahead): time to first token from arrival,
the gaps between a request's tokens, and end-to-end latency of finished requests (vLLM's
``time_to_first_token_seconds``, ``inter_token_latency_seconds``,
``e2e_request_latency_seconds``)."""

from __future__ import annotations

import bisect
import time

# seconds; the last bucket is +Inf
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                   1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class Histogram:
    """Counts of observations per bucket upper bound (cumulative in the text), their sum."""

    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0

    @property
    def count(self) -> int:
        return sum(self.counts)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def samples(self) -> list[tuple[str, str, float]]:
        """(suffix, labels, value) of the text format."""
        out, total = [], 0
        for bound, n in zip(self.buckets + (float("inf"),), self.counts):
            total += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(("_bucket", f'{{le="{le}"}}', total))
        return out + [("_sum", "", self.sum), ("_count", "", total)]


class Metrics:
    """Counters (steps per MoE schedule, tokens, step time) and the latency histograms."""

    def __init__(self):
        self.steps = {"prefill": 0, "decode": 0, "none": 0}
        self.step_seconds = 0.0
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.started = time.monotonic()
        self.ttft = Histogram()
        self.itl = Histogram()
        self.e2e = Histogram()

    def handed(self, before: dict, now: float) -> None:
        """After a step's tokens reached its requests (``before``: each one's output length
        before the step): the first token's TTFT, later ones' gaps, finished requests'
        latency."""
        for r in before:
            got = len(r.output) - before[r]
            if got:
                if before[r] == 0:
                    self.ttft.observe(now - r.arrival)
                else:
                    self.itl.observe(now - r.last_token_at)
                r.last_token_at = now
            if r.finish_reason in ("stop", "length") and not r.timed_end:
                r.timed_end = True
                self.e2e.observe(now - r.arrival)


def prometheus(engine) -> str:
    """``engine``'s metrics in Prometheus' text format, names prefixed ``moe_relayfree_``."""
    m, s, pool = engine.metrics, engine.scheduler, engine.pool
    lines = []

    def metric(name, kind, help_, samples):
        lines.append(f"# HELP moe_relayfree_{name} {help_}")
        lines.append(f"# TYPE moe_relayfree_{name} {kind}")
        for labels, value in samples:
            lines.append(f"moe_relayfree_{name}{labels} {value}")

    def histogram(name, help_, h: Histogram):
        lines.append(f"# HELP moe_relayfree_{name} {help_}")
        lines.append(f"# TYPE moe_relayfree_{name} histogram")
        for suffix, labels, value in h.samples():
            lines.append(f"moe_relayfree_{name}{suffix}{labels} {value}")

    metric("requests_running", "gauge", "Requests holding a sequence slot.", [("", len(s.running))])
    metric("requests_waiting", "gauge", "Requests in the waiting queue.", [("", len(s.waiting))])
    metric("kv_pages_in_use", "gauge", "KV cache pages held by requests.", [("", pool.in_use)])
    metric("kv_pages_total", "gauge", "KV cache pages in the pool (scratch excluded).",
           [("", pool.capacity)])
    metric("kv_pages_cached_idle", "gauge", "Cached prefix pages no request holds (taken "
           "when free pages run out).", [("", sum(len(i) for i in pool.idle))])
    metric("prefix_cache_hit_tokens_total", "counter", "Prompt tokens taken from the prefix "
           "cache instead of prefilled.", [("", pool.hit_tokens)])
    metric("preemptions_total", "counter", "Requests preempted for pages (recomputed when "
           "admitted again).", [("", s.preemptions)])
    metric("steps_total", "counter", "Engine steps by the MoE layers' schedule.",
           [(f'{{schedule="{k}"}}', v) for k, v in m.steps.items()])
    metric("step_seconds_total", "counter", "Time spent in engine steps.", [("", m.step_seconds)])
    metric("prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", m.prompt_tokens)])
    metric("generation_tokens_total", "counter", "Tokens generated.", [("", m.generated_tokens)])
    elapsed = max(time.monotonic() - m.started, 1e-9)
    metric("generation_tokens_per_second", "gauge", "Tokens generated per second since start.",
           [("", m.generated_tokens / elapsed)])
    histogram("time_to_first_token_seconds", "From a request's arrival to its first token.",
              m.ttft)
    histogram("inter_token_latency_seconds", "Between a request's consecutive tokens.", m.itl)
    histogram("e2e_request_latency_seconds", "From arrival to the last token, of requests that "
              "finished (stop or length).", m.e2e)
    return "\n".join(lines) + "\n"


__all__ = ["Histogram", "LATENCY_BUCKETS", "Metrics", "prometheus"]
