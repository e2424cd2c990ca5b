"""Relay-free vs buffer-centric expert parallelism: dispatch, combine, whole layer, memory, HLO.

All implementations run in the same process on the same inputs; every comparison is a ratio
measured in the same run (``moe_relayfree.tools.bench.layer``).

    python scripts/bench.py --quick            # a few minutes on 2 CPU cores
    python scripts/bench.py                    # the tables in docs/benchmarks.md
    python scripts/bench.py --smoke --out /tmp/b   # seconds; used by the tests

Writes ``bench.json``, ``bench.md`` and PNG plots to ``--out`` (default ``results/bench``).
"""

from __future__ import annotations

import argparse
import sys

from moe_relayfree.tools.bench import env


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer and smaller shapes")
    mode.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script")
    p.add_argument("--devices", type=int, default=8, help="emulated CPU devices (CPU only)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--out", default="results/bench")
    p.add_argument("--memory-budget-gb", type=float, default=14.0,
                   help="skip an implementation whose estimated buffers exceed this (all ranks)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--scaling-only", action="store_true",
                   help="only the token and rank sweeps (and auto's choice over them)")
    p.add_argument("--meshes-only", action="store_true",
                   help="only the multi-axis mesh comparison (needs 8 devices)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    env.emulate_cpu_devices(a.devices)
    from moe_relayfree.tools.bench import layer

    layer.run("smoke" if a.smoke else "quick" if a.quick else "full", repeats=a.repeats,
              budget_gb=a.memory_budget_gb, out=a.out, scaling_only=a.scaling_only,
              meshes_only=a.meshes_only, with_plots=not a.no_plots,
              command=env.command("bench.py", argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
