"""The serving benchmark's client side without a server: seeded workloads and arrivals, the
report's statistics and goodput, and the feasible rate (the HTTP run itself:
tests/test_server.py)."""


import numpy as np
import pytest

from moe_relayfree_models.serving.loadgen import Result, Workload, parse_goodput, summarize
from moe_relayfree_models.tools.bench.serve import highest_rate


def test_workload_is_seeded_and_arrivals_follow_the_rate():
    w = Workload(num_prompts=4000, input_len=100, output_len=20, range_ratio=0.5, rate=8.0, seed=3)
    reqs = w.requests()
    assert reqs == Workload(num_prompts=4000, input_len=100, output_len=20, seed=3).requests()
    lengths = np.array([len(p) for p, _ in reqs])
    assert lengths.min() >= 50 and lengths.max() <= 150 and abs(lengths.mean() - 100) < 2
    assert all(10 <= m <= 30 and all(3 <= t < 250 for t in p[:5]) for p, m in reqs[:50])
    gaps = np.diff(w.arrivals())
    assert abs(gaps.mean() - 1 / 8) < 0.01 and abs(gaps.std() - 1 / 8) < 0.01  # exponential
    bursty = np.diff(Workload(num_prompts=4000, rate=8.0, burstiness=0.25).arrivals())
    assert abs(bursty.mean() - 1 / 8) < 0.02 and bursty.std() > 1.8 * gaps.std()  # gamma, k=1/4
    assert not Workload(num_prompts=5).arrivals().any()  # rate inf: all at once


def test_summary_statistics_and_goodput_count_a_request_only_if_it_meets_every_limit():
    def res(ttft, e2el, out, itl=()):
        return Result(prompt_tokens=10, ok=True, output_tokens=out, ttft=ttft, e2el=e2el,
                      itl=list(itl))

    results = [res(0.1, 1.1, 11, [0.1] * 10),  # TPOT 100 ms
               res(0.5, 0.7, 5, [0.05] * 4),  # TPOT 50 ms
               res(0.2, 0.2, 1),  # one token: no TPOT
               Result(prompt_tokens=10, error="HTTP 429")]
    s = summarize(results, duration_s=2.0, limits={"ttft": 300, "tpot": 60})
    assert (s["completed"], s["failed"]) == (3, 1) and s["errors"] == ["HTTP 429"]
    assert s["output_throughput"] == 17 / 2 and s["total_token_throughput"] == (17 + 30) / 2
    assert s["ttft_ms"]["median"] == pytest.approx(200)
    assert s["tpot_ms"]["mean"] == pytest.approx(75)  # over the two multi-token requests
    assert s["itl_ms"]["median"] == pytest.approx(100) and len(results[0].itl) == 10
    # request 0: TPOT 100 > 60; request 1: TTFT 500 > 300; request 2 meets both
    assert s["good_requests"] == 1 and s["goodput"] == 0.5
    assert summarize(results, 2.0, {"e2el": 800})["good_requests"] == 2


def test_goodput_limits_parse_or_are_refused():
    assert parse_goodput(["ttft:500", "tpot:50"]) == {"ttft": 500.0, "tpot": 50.0}
    for bad in (["ttft=500"], ["itl:5"], ["tpot:0"], ["ttft:"]):
        with pytest.raises(ValueError, match="goodput limit"):
            parse_goodput(bad)


def test_the_feasible_rate_is_the_highest_before_attainment_falls_short():
    points = [dict(rate=r, attainment=a) for r, a in ((2, 1.0), (4, 0.92), (8, 0.6), (16, 0.95))]
    assert highest_rate(points, 0.9) == 4  # 8 falls short; 16 after it does not count
    assert highest_rate(points, 0.99) == 2 and highest_rate(points[1:], 0.99) == 0
