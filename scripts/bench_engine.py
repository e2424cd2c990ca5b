"""The serving engine's decode step, throughput at saturation and time to first token against
static-batch ``generate``, as ratios measured in one process (what is measured and how:
``moe_relayfree_models.tools.bench.engine``). Writes ``engine.json`` and ``engine.md``.

    python scripts/bench_engine.py                       # default model, batches 8 and 64
    python scripts/bench_engine.py --batches 8 --rounds 5 --out /tmp/e   # quicker
    python scripts/bench_engine.py --preemption --batches 32 --prompt 32 --max-model-len 256 \
        --repeats 5 --out results/preemption-b32   # docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import sys

from moe_relayfree.tools.bench import env
from moe_relayfree_models.cli import DEFAULT_CHECKPOINT


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--batches", type=int, nargs="+", default=[8, 64])
    p.add_argument("--context", type=int, default=200, help="tokens in each sequence for the step A/B")
    p.add_argument("--new", type=int, default=64, help="tokens each request asks for")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (throughput, TTFT)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--others-new", type=int, nargs=2, default=[16, 512],
                   help="TTFT: the tokens the other requests asked for, few and many")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--load-minutes", type=float, default=0,
                   help="then a load run this long (Poisson arrivals, compiles counted)")
    p.add_argument("--load-rate", type=float, default=20, help="requests per second in the load run")
    p.add_argument("--preemption", action="store_true",
                   help="only the preemption A/B: a pool of one full-length sequence per "
                        "device, 4x --batches[0] requests, with and without preemption")
    p.add_argument("--max-model-len", type=int, default=512, help="with --preemption")
    p.add_argument("--mean-tokens", type=int, default=48,
                   help="with --preemption: the early-stop workload's mean output tokens")
    p.add_argument("--out", default="results/engine")
    a = p.parse_args(argv)
    env.emulate_cpu_devices(a.devices)
    from moe_relayfree_models.tools.bench import engine

    engine.run(a, env.command("bench_engine.py", argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
