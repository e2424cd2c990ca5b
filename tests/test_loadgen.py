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
    shared = Workload(num_prompts=20, input_len=8, seed=3, prefix_len=6).requests()
    assert all(p[:6] == shared[0][0][:6] and 10 <= len(p) <= 18 for p, _ in shared)
    assert len({tuple(p[6:]) for p, _ in shared}) == 20  # each its own after the prefix


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


def test_the_sweep_reports_each_budget_and_max_concurrency_and_draws_the_map(tmp_path):
    """A sweep's points over two settings (budget 256 with 8 and 16 sequences at once): the
    highest feasible rate per path and setting from the median over rounds, relay-free's ratio
    to the best baseline, the max-concurrency column, and the (rate, setting) map drawn."""
    from moe_relayfree_models.tools.bench import serve

    limits = {"ttft": 300.0, "tpot": 30.0}
    # attainment per (path, max_seqs) at rates 4, 8, 12; round 1 is round 0 less 0.02
    share = {("relayfree", 8): [1.0, 0.95, 0.5], ("relayfree", 16): [1.0, 1.0, 0.92],
             ("allgather-baseline", 8): [1.0, 0.6, 0.95],
             ("allgather-baseline", 16): [1.0, 0.9, 0.1]}
    points = [dict(path=p, budget=256, max_seqs=n, rate=rate, round=r, limits=limits,
                   goodput=rate * a, attainment=a - 0.02 * r, ttft_p90_ms=100.0, tpot_p90_ms=20.0)
              for (p, n), shares in share.items() for r in (0, 1)
              for rate, a in zip((4.0, 8.0, 12.0), shares)]
    rows = serve.feasible(points, ["relayfree", "allgather-baseline"], [256], [limits], 0.9,
                          [8, 16])
    got = {r["max_seqs"]: (r["highest_rate"], r["relayfree_vs_best_baseline"]) for r in rows}
    # medians 0.94 / 0.49 (relay-free at 8 seqs); the baseline's 12/s does not count once 8/s
    # fell short; at 16 seqs relay-free holds 12/s (median 0.91), the baseline 8/s (0.89: no)
    assert got == {8: ({"relayfree": 8.0, "allgather-baseline": 4.0}, 2.0),
                   16: ({"relayfree": 12.0, "allgather-baseline": 4.0}, 3.0)}
    report = {"command": "x", "sweep": dict(points=points, feasible=rows, fraction=0.9)}
    text = serve.markdown(report)
    assert "| budget | max seqs | limits (ms) |" in text
    assert "| 256 | 16 | ttft 300, tpot 30 |" in text
    serve.plot_map(report, str(tmp_path / "map.png"))
    assert (tmp_path / "map.png").stat().st_size > 1000
