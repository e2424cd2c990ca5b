"""Serving-level sweep: TTFT and TPOT over batch sizes and prompt lengths, per dispatch path,
and the largest batch that meets a TPOT target (the "feasible scheduling space").

    python scripts/sweep.py [--quick] [--checkpoint DIR] [--tpot-target-ms X] [--out results/sweep]
    python scripts/sweep.py --mesh data=2,ep=4 [--tensor-axis NAME] [--expert-axis NAME]

All dispatch paths run in the same process on the same model and prompts. Each point is
measured ``--repeats`` times with the paths interleaved (A, B, C, then B, C, A, ...), and every
reported time is the median over those rounds (TPOT: of each round's median decode step);
TPOT is also compared per round with the faster baseline of that round (median of the ratios).
Without ``--tpot-target-ms`` the target is 1.5x the lowest batch-1 TPOT of any path measured
in the same run (the best single-request latency this machine gives, whichever path has it).
Where the paths' TPOT curves run close, the feasible batch at one target is decided by noise at
the boundary, so the report also gives it at 1.25x, 1.5x, 2x and 3x that batch-1 TPOT.
Writes ``sweep.json``, ``sweep.md`` and ``sweep.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from infer import DEFAULT_CHECKPOINT, DISPATCH, ROOT, add_mesh_args, mesh_from_args, setup_devices  # noqa: E402


# TPOT targets of the feasibility table, as multiples of the best batch-1 TPOT of the run
SLO_MULTIPLES = (1.25, 1.5, 2.0, 3.0)


def feasible_batches(decode_rows: list[dict], target_ms: float) -> dict[str, int]:
    """Per dispatch path, the largest batch whose median TPOT is at most ``target_ms`` (0: none).

    decode_rows: the sweep's rows of one prompt length (``dispatch``, ``batch``, ``tpot_ms``)."""
    out: dict[str, int] = {}
    for r in decode_rows:
        ok = r["tpot_ms"] <= target_ms
        out[r["dispatch"]] = max(out.get(r["dispatch"], 0), r["batch"] if ok else 0)
    return out


def feasibility(decode_rows: list[dict], target_ms: float, multiple: float | None = None) -> dict:
    """:func:`feasible_batches` at one target, with relay-free's over the best baseline's
    (``None`` when no baseline meets the target)."""
    feasible = feasible_batches(decode_rows, target_ms)
    best = max(v for k, v in feasible.items() if k != "relayfree")
    return dict(multiple=multiple, tpot_target_ms=target_ms, feasible_batch=feasible,
                feasible_vs_best_baseline=feasible["relayfree"] / best if best else None)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    p.add_argument("--devices", type=int, default=8)
    add_mesh_args(p)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batches", type=int, nargs="+", default=None)
    p.add_argument("--prompt-lengths", type=int, nargs="+", default=None)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds per point")
    p.add_argument("--tpot-target-ms", type=float, default=None)
    p.add_argument("--out", default=os.path.join(ROOT, "results", "sweep"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_devices(args.devices)
    import jax
    import numpy as np

    import moe_relayfree as mr
    from moe_relayfree_models import checkpoint, tokenizer
    from moe_relayfree_models.generation import generate

    batches = args.batches or ([1, 4, 16] if args.quick else [1, 4, 16, 64, 96, 128, 192, 256, 512])
    lengths = args.prompt_lengths or ([16, 64] if args.quick else [16, 64, 256, 1024])
    base_len, base_batch = lengths[0], 8 if not args.quick else 4
    try:
        mesh, lay = mesh_from_args(args, len(jax.devices()))
    except ValueError as e:
        print(f"--mesh: {e}", file=sys.stderr)
        return 2
    shards = lay.num_token_shards  # tokens per rank = tokens / shards
    rng = np.random.default_rng(0)
    models = {name: checkpoint.load_model(args.checkpoint, mesh=mesh, axis=args.expert_axis,
                                          tensor_axis=args.tensor_axis, implementation=impl)
              for name, impl in DISPATCH.items()}
    rows = []

    # Timing does not depend on the text; the byte-level default model gets its BOS.
    bos = [tokenizer.BOS] if next(iter(models.values())).cfg.vocab_size == tokenizer.VOCAB_SIZE else []

    def measure(batch, length):
        prompts = [bos + rng.integers(32, 127, size=length - len(bos)).tolist() for _ in range(batch)]
        outs, ttft, tpot = {}, {n: [] for n in models}, {n: [] for n in models}
        names = list(models)
        for i in range(args.repeats):
            # rotated so no path always runs first (or right after the same other path)
            for name in names[i % len(names):] + names[:i % len(names)]:
                r = generate(models[name], prompts, args.new_tokens)
                outs[name] = r["tokens"]
                ttft[name].append(1e3 * r["ttft_s"])
                tpot[name].append(1e3 * float(np.median(r["step_s"])))
        for name in models:
            row = dict(dispatch=name, batch=batch, prompt=length,
                       ttft_ms=float(np.median(ttft[name])), tpot_ms=float(np.median(tpot[name])),
                       tpot_rounds_ms=tpot[name], ttft_rounds_ms=ttft[name],
                       prefill_schedule=mr.select_schedule(-(-batch * length // shards)),
                       decode_schedule=mr.select_schedule(-(-batch // shards)))
            rows.append(row)
            print(f"  batch {batch:3d} prompt {length:4d} {name:18s} TTFT {row['ttft_ms']:9.1f} ms  "
                  f"TPOT {row['tpot_ms']:8.1f} ms", flush=True)
        same = all(t == outs["relayfree"] for t in outs.values())
        point = rows[-len(models):]
        best = min(r["tpot_ms"] for r in point if r["dispatch"] != "relayfree")
        # per round: the faster baseline of that round (the paths ran back to back in it)
        best_round = np.min([tpot[n] for n in models if n != "relayfree"], axis=0)
        for row in point:
            row["tokens_identical"] = same
            row["tpot_vs_best_baseline"] = row["tpot_ms"] / best
            row["tpot_paired_vs_best_baseline"] = float(
                np.median(np.asarray(tpot[row["dispatch"]]) / best_round))

    for batch in batches:
        measure(batch, base_len)
    for length in lengths[1:]:
        measure(base_batch, length)

    decode_rows = [r for r in rows if r["prompt"] == base_len]
    base = min(r["tpot_ms"] for r in decode_rows if r["batch"] == batches[0])
    target = args.tpot_target_ms or 1.5 * base
    main_point = feasibility(decode_rows, target)
    feasible = main_point["feasible_batch"]
    # one target decides little where the curves run close: the same over a range of targets
    slo = [feasibility(decode_rows, m * base, m) for m in SLO_MULTIPLES]
    report = dict(checkpoint=os.path.relpath(args.checkpoint, ROOT), devices=len(jax.devices()),
                  platform=jax.devices()[0].platform, new_tokens=args.new_tokens,
                  repeats=args.repeats, tpot_target_ms=target, feasible_batch=feasible,
                  feasible_vs_best_baseline=main_point["feasible_vs_best_baseline"],
                  best_batch1_tpot_ms=base, feasible_by_target=slo,
                  mesh=dict(mesh.shape), expert_axis=lay.axis, tensor_axis=lay.tensor_axis,
                  rows=rows, command=" ".join(["python scripts/sweep.py"]
                                              + (sys.argv[1:] if argv is None else list(argv))))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sweep.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    lines = [f"# Serving sweep ({report['command']})", "",
             f"{report['devices']} {report['platform']} devices (mesh "
             + ",".join(f"{a}={n}" for a, n in report["mesh"].items())
             + f"), {args.new_tokens} new tokens, "
             f"medians of {args.repeats} interleaved rounds, TPOT target {target:.1f} ms. "
             "Schedules are relay-free's (`auto`); the baselines have one path.", "",
             "*TPOT / best baseline*: ratio of the medians; *paired*: median over rounds of the "
             "path's TPOT over the faster baseline's in the same round.", "",
             "| dispatch | batch | prompt | TTFT ms | TPOT ms | TPOT / best baseline | paired "
             "| TPOT rounds ms | prefill | decode | same tokens |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rounds = " / ".join(f"{t:.1f}" for t in r["tpot_rounds_ms"])
        lines.append(f"| {r['dispatch']} | {r['batch']} | {r['prompt']} | {r['ttft_ms']:.1f} | "
                     f"{r['tpot_ms']:.1f} | {r['tpot_vs_best_baseline']:.2f} | "
                     f"{r['tpot_paired_vs_best_baseline']:.2f} | {rounds} "
                     f"| {r['prefill_schedule']} | {r['decode_schedule']} | {r['tokens_identical']} |")
    ratio = report["feasible_vs_best_baseline"]
    lines += ["", "Largest batch meeting the TPOT target: "
              + ", ".join(f"{k} {v}" for k, v in feasible.items())
              + (f" (relay-free / best baseline: {ratio:.2f}x)" if ratio else ""), "",
              f"Largest batch meeting other TPOT targets (multiples of the best batch-1 TPOT, "
              f"{base:.1f} ms):", "",
              "| target | ms | " + " | ".join(models) + " | relay-free / best baseline |",
              "|---|---|" + "---|" * len(models) + "---|"]
    for point in slo:
        r = point["feasible_vs_best_baseline"]
        lines.append(f"| {point['multiple']:.2f}x | {point['tpot_target_ms']:.1f} | "
                     + " | ".join(str(point["feasible_batch"][n]) for n in models)
                     + f" | {'no baseline meets it' if r is None else f'{r:.2f}x'} |")
    lines.append("")
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
