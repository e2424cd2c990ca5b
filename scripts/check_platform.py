"""Checks moe-relayfree on the devices at hand: run it first on new hardware.

Every schedule, decode transport and baseline against the dense single-device reference
(uniform and adversarial routing, f32 and bf16, gradients), what each compiled program kept
(native ragged all-to-all or not, how the grouped GEMM compiled, conditionals), and with
``--time`` the layer time of the schedules and baselines at given tokens per device, measured
in one process with the programs alternating. Exits 1 if any check fails.

    python scripts/check_platform.py                       # GPU/TPU/plugin devices, else 8 CPU
    python scripts/check_platform.py --time 1 8 64 512     # and layer times (bf16)
    JAX_PLATFORMS=cpu python scripts/check_platform.py --devices 4

Writes ``check.json`` and ``check.md`` to ``--out`` (default ``results/check``).
"""

from __future__ import annotations

import argparse
import json
import platform as host_platform
import sys

from moe_relayfree.tools.bench import env
from moe_relayfree.tools.bench import report as bench_report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=8, help="emulated CPU devices (CPU only)")
    p.add_argument("--quick", action="store_true", help="f32 only, uniform and one_rank routing")
    p.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                   help="only these variants (default: those of moe_relayfree.tools.selfcheck.VARIANTS "
                   "that run compiled on the devices present)")
    p.add_argument("--time", type=int, nargs="*", default=[], metavar="TOKENS",
                   help="also time the layer at these tokens per device")
    p.add_argument("--local", type=int, default=8, help="timing: experts per device")
    p.add_argument("--k", type=int, default=8, help="timing: experts per token")
    p.add_argument("--d-model", type=int, default=2048, help="timing: model width")
    p.add_argument("--d-ff", type=int, default=1024, help="timing: expert width")
    p.add_argument("--rounds", type=int, default=20, help="timing: rounds per size")
    p.add_argument("--out", default="results/check")
    return p.parse_args(argv)


def markdown(report: dict) -> str:
    lines = [f"# Platform check: {report['platform']} x {report['devices']} "
             f"({report['device_kind']}), JAX {report['jax']}", "",
             f"Command: `{report['command']}`.", "",
             f"**{report['failed']} of {len(report['checks'])} checks failed.**", "",
             "| check | variant | routing | dtype | error | tolerance | ok | note |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {c['check']} | {c['variant']} | {c['routing']} | {c['dtype']} | {c['error']:.2e} "
              f"| {c['tolerance']:.0e} | {'yes' if c['ok'] else '**no**'} | {c['note']} |"
              for c in report["checks"]]
    lines += ["", "## Compiled programs (bf16)", "",
              "| variant | native ragged all-to-all | grouped GEMM | ops |", "|---|---|---|---|"]
    for v, f in report["programs"].items():
        ops = ", ".join(f"{k} {n}" for k, n in f["ops"].items() if k != "custom_call_targets")
        targets = ", ".join(f["ops"]["custom_call_targets"])
        lines.append(f"| {v} | {f['native_ragged_all_to_all']} | {f['grouped_gemm']} | {ops}"
                     + (f"; custom calls: {targets}" if targets else "") + " |")
    if report["timing"]:
        t = report["timing"][0]
        names = [k for k in t if not k.startswith("tokens") and "/" not in k]
        ratios = [k for k in t if "/" in k]
        lines += ["", f"## Layer time (ms, median; bf16, {report['timing_shapes']})", "",
                  "| tokens/device | " + " | ".join(names + ratios) + " |",
                  "|---|" + "---|" * (len(names) + len(ratios))]
        lines += [f"| {row['tokens']} | " + " | ".join([f"{row[n] * 1e3:.3f}" for n in names]
                                                       + [f"{row[r]:.2f}" for r in ratios]) + " |"
                  for row in report["timing"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    env.emulate_cpu_devices(args.devices)  # affects the CPU platform only
    import dataclasses

    import jax
    import jax.numpy as jnp

    from moe_relayfree import make_ep_mesh, platform
    from moe_relayfree.tools import selfcheck

    devices = jax.devices()
    mesh = make_ep_mesh(len(devices))
    kw = dict(dtypes=(jnp.float32,), routings=("uniform", "one_rank")) if args.quick else {}
    variants = tuple(args.variants or selfcheck.variants_for(devices[0].platform))
    unknown = set(variants) - set(selfcheck.VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {selfcheck.VARIANTS}")
    checks = selfcheck.run_checks(mesh, variants=variants, **kw,
                                  grad_variants=[v for v in selfcheck.GRAD_VARIANTS if v in variants])
    for c in checks:
        print(f"{'ok  ' if c.ok else 'FAIL'} {c.check:14s} {c.variant:18s} {c.routing:13s} "
              f"{c.dtype:8s} {c.error:.2e} {c.note}", flush=True)
    programs = selfcheck.program_facts(mesh, variants=variants)
    shapes = selfcheck.Shapes(local=args.local, k=args.k, d=args.d_model, f=args.d_ff)
    timing = []
    timed = [v for v in selfcheck.TIMED if v in variants] or ["decode"]
    for t in args.time:
        row = dict(tokens=t, **selfcheck.time_variants(mesh, t, shapes=shapes, rounds=args.rounds,
                                                       variants=timed))
        print("time", json.dumps(row), flush=True)
        timing.append(row)
    report = dict(
        platform=devices[0].platform, device_kind=devices[0].device_kind, devices=len(devices),
        jax=jax.__version__, machine=host_platform.machine(),
        capabilities=platform.capabilities(),
        command=env.command("check_platform.py", argv),
        checks=[dict(dataclasses.asdict(c), ok=c.ok) for c in checks],
        failed=sum(not c.ok for c in checks), programs=programs, timing=timing,
        timing_shapes={k: v for k, v in dataclasses.asdict(shapes).items() if k != "tokens"}
        if timing else None)
    paths = bench_report.write(args.out, "check", report, markdown(report))
    print(f"{report['failed']} of {len(checks)} checks failed; wrote " + ", ".join(paths))
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
