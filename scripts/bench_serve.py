"""Serving benchmark over HTTP, as ``vllm bench serve`` measures (what and how:
``moe_relayfree_models.serving.loadgen`` and ``moe_relayfree_models.tools.bench.serve``).
Writes ``serve.json``, ``serve.md`` and ``serve.png`` to ``--out`` (a sweep also
``serve-map.png``: the (rate, budget / max concurrency) map of each path).

One run against a server already up (``bash scripts/serve.sh`` in another shell):

    python scripts/bench_serve.py --base-url http://127.0.0.1:8000 --request-rate 4 \\
        --num-prompts 64 --goodput ttft:500 tpot:50

The feasible region: servers started here, one per dispatch path and prefill budget, the same
seeded workloads sent to each in turn at every request rate:

    python scripts/bench_serve.py --sweep --dispatch relayfree ragged-baseline allgather-baseline \\
        --budgets 256 1024 --rates 2 4 8 16 --limits ttft:500,tpot:50 ttft:1000,tpot:100
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from moe_relayfree.tools.bench import env
from moe_relayfree_models.cli import DEFAULT_CHECKPOINT


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", help="a running server (one run); without it, --sweep")
    p.add_argument("--sweep", action="store_true", help="start servers and sweep (see above)")
    p.add_argument("--model", default="default", help="the served model name")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--range-ratio", type=float, default=0.5,
                   help="lengths drawn uniformly within this fraction of --input-len/--output-len")
    p.add_argument("--prefix-len", type=int, default=0,
                   help="tokens every prompt starts with (a shared system prompt), before "
                        "its --input-len own")
    p.add_argument("--request-rate", type=float, default=math.inf, help="req/s (inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape (1: Poisson)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--goodput", nargs="*", default=[], help="limits as ttft:MS tpot:MS e2el:MS")
    # the sweep
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    p.add_argument("--dispatch", nargs="+", default=["relayfree", "ragged-baseline",
                                                     "ragged-baseline-bounded", "capacity-baseline",
                                                     "allgather-baseline"])
    p.add_argument("--budgets", type=int, nargs="+", default=[256])
    p.add_argument("--max-seqs", type=int, nargs="+", default=None,
                   help="max concurrencies to sweep (the servers' --max-seqs; default: "
                   "--server-args')")
    p.add_argument("--rates", type=float, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--limits", nargs="+", default=["ttft:500,tpot:50"],
                   help="limit pairs, each as ttft:MS,tpot:MS")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--fraction", type=float, default=0.9,
                   help="feasible: goodput >= this fraction of the offered rate")
    p.add_argument("--server-args", default="--max-seqs 16 --max-model-len 512",
                   help="more serve.py flags for every server of the sweep")
    p.add_argument("--out", default="results/serve")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    from moe_relayfree.tools.bench.report import write
    from moe_relayfree_models.serving import loadgen
    from moe_relayfree_models.tools.bench import serve

    try:
        workload = loadgen.Workload(a.num_prompts, a.input_len, a.output_len, a.range_ratio,
                                    a.request_rate, a.burstiness, a.max_concurrency, a.seed,
                                    prefix_len=a.prefix_len)
        limits = loadgen.parse_goodput(a.goodput)
        pairs = [loadgen.parse_goodput(pair.split(",")) for pair in a.limits]
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    report = {"command": env.command("bench_serve.py", argv),
              "checkpoint": os.path.relpath(a.checkpoint, serve.ROOT)}
    if a.base_url:
        report["run"], report["_results"] = serve.one_run(a.base_url.rstrip("/"), a.model,
                                                          workload, limits)
        print(json.dumps(report["run"], indent=1), flush=True)
    elif a.sweep:
        server_args = ["--checkpoint", a.checkpoint, *a.server_args.split()]
        report["sweep"] = serve.sweep(paths=a.dispatch, budgets=a.budgets, rates=a.rates,
                                      limit_pairs=pairs, workload=workload, rounds=a.rounds,
                                      server_args=server_args, fraction=a.fraction,
                                      model=os.path.basename(os.path.normpath(a.checkpoint)),
                                      max_seqs=a.max_seqs or [None],
                                      log=lambda m: print(m, flush=True))
        print(json.dumps(report["sweep"]["feasible"], indent=1), flush=True)
    else:
        print("give --base-url URL (one run) or --sweep", file=sys.stderr)
        return 2
    os.makedirs(a.out, exist_ok=True)
    serve.plot(report, os.path.join(a.out, "serve.png"))
    if "sweep" in report:
        serve.plot_map(report, os.path.join(a.out, "serve-map.png"))
    report.pop("_results", None)
    write(a.out, "serve", report, serve.markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
