"""Serving-level sweep: TTFT and TPOT over batch sizes and prompt lengths, per dispatch path,
and the largest batch that meets a TPOT target (the "feasible scheduling space").

    python scripts/sweep.py [--quick] [--checkpoint DIR] [--tpot-target-ms X] [--out results/sweep]

All dispatch paths run in the same process on the same model and prompts. Without
``--tpot-target-ms`` the target is 1.5x relay-free's TPOT at batch 1 measured in the same run.
Writes ``sweep.json``, ``sweep.md`` and ``sweep.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from infer import DEFAULT_CHECKPOINT, DISPATCH, ROOT, setup_devices  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batches", type=int, nargs="+", default=None)
    p.add_argument("--prompt-lengths", type=int, nargs="+", default=None)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--tpot-target-ms", type=float, default=None)
    p.add_argument("--out", default=os.path.join(ROOT, "results", "sweep"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_devices(args.devices)
    import jax
    import numpy as np

    import moe_relayfree as mr
    from infer import generate
    from models import checkpoint

    batches = args.batches or ([1, 4, 16] if args.quick else [1, 4, 16, 64, 128, 256, 512])
    lengths = args.prompt_lengths or ([16, 64] if args.quick else [16, 64, 256, 1024])
    base_len, base_batch = lengths[0], 8 if not args.quick else 4
    mesh = mr.make_ep_mesh()
    rng = np.random.default_rng(0)
    models = {name: checkpoint.load_model(args.checkpoint, mesh=mesh, implementation=impl)
              for name, impl in DISPATCH.items()}
    rows = []

    def measure(batch, length):
        prompts = [[256] + rng.integers(32, 127, size=length - 1).tolist() for _ in range(batch)]
        outs = {}
        for name, model in models.items():
            r = generate(model, prompts, args.new_tokens)
            outs[name] = r["tokens"]
            row = dict(dispatch=name, batch=batch, prompt=length,
                       ttft_ms=1e3 * r["ttft_s"], tpot_ms=1e3 * float(np.median(r["step_s"])),
                       prefill_schedule=mr.select_schedule(-(-batch * length // len(jax.devices()))),
                       decode_schedule=mr.select_schedule(-(-batch // len(jax.devices()))))
            rows.append(row)
            print(f"  batch {batch:3d} prompt {length:4d} {name:18s} TTFT {row['ttft_ms']:9.1f} ms  "
                  f"TPOT {row['tpot_ms']:8.1f} ms", flush=True)
        same = all(t == outs["relayfree"] for t in outs.values())
        for row in rows[-len(models):]:
            row["tokens_identical"] = same

    for batch in batches:
        measure(batch, base_len)
    for length in lengths[1:]:
        measure(base_batch, length)

    decode_rows = [r for r in rows if r["prompt"] == base_len]
    base = next(r for r in decode_rows if r["dispatch"] == "relayfree" and r["batch"] == batches[0])
    target = args.tpot_target_ms or 1.5 * base["tpot_ms"]
    feasible = {}
    for name in models:
        ok = [r["batch"] for r in decode_rows if r["dispatch"] == name and r["tpot_ms"] <= target]
        feasible[name] = max(ok) if ok else 0
    report = dict(checkpoint=os.path.relpath(args.checkpoint, ROOT), devices=len(jax.devices()),
                  platform=jax.devices()[0].platform, new_tokens=args.new_tokens,
                  tpot_target_ms=target, feasible_batch=feasible, rows=rows,
                  command="python scripts/sweep.py" + (" --quick" if args.quick else ""))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sweep.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    lines = [f"# Serving sweep ({report['command']})", "",
             f"{report['devices']} {report['platform']} devices, {args.new_tokens} new tokens, "
             f"TPOT target {target:.1f} ms.", "",
             "| dispatch | batch | prompt | TTFT ms | TPOT ms | prefill | decode | same tokens |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dispatch']} | {r['batch']} | {r['prompt']} | {r['ttft_ms']:.1f} | "
                     f"{r['tpot_ms']:.1f} | {r['prefill_schedule']} | {r['decode_schedule']} | "
                     f"{r['tokens_identical']} |")
    lines += ["", "Largest batch meeting the TPOT target: "
              + ", ".join(f"{k} {v}" for k, v in feasible.items()), ""]
    with open(os.path.join(args.out, "sweep.md"), "w") as fh:
        fh.write("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        for name in models:
            pts = [(r["batch"], r["tpot_ms"]) for r in decode_rows if r["dispatch"] == name]
            a1.plot(*zip(*pts), marker="o", label=name)
            pts = sorted((r["prompt"], r["ttft_ms"]) for r in rows
                         if r["dispatch"] == name and r["batch"] == base_batch)
            if pts:
                a2.plot(*zip(*pts), marker="o", label=name)
        a1.axhline(target, color="gray", ls="--", label="TPOT target")
        a1.set(xscale="log", xlabel="batch", ylabel="TPOT ms (median)", title=f"decode, prompt {base_len}")
        a2.set(xscale="log", xlabel="prompt tokens", ylabel="TTFT ms", title=f"prefill, batch {base_batch}")
        for a in (a1, a2):
            a.legend()
            a.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "sweep.png"), dpi=110)
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
    print(f"feasible batch at TPOT <= {target:.1f} ms: {feasible}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
