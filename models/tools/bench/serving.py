"""Serving-level sweep: TTFT and TPOT over batch sizes and prompt lengths, per dispatch path,
and the largest batch that meets a TPOT target (the "feasible scheduling space").

All dispatch paths run in the same process on the same model and prompts. Each point is
measured ``repeats`` times with the paths interleaved (A, B, C, then B, C, A, ...), and every
reported time is the median over those rounds (TPOT: of each round's median decode step);
TPOT is also compared per round with the faster baseline of that round (median of the ratios).
Without a target the TPOT target is 1.5x the lowest batch-1 TPOT of any path measured in the
same run (the best single-request latency this machine gives, whichever path has it). Where
the paths' TPOT curves run close, the feasible batch at one target is decided by noise at the
boundary, so the report also gives it at 1.25x, 1.5x, 2x and 3x that batch-1 TPOT. The
command: ``scripts/sweep.py``.
"""

from __future__ import annotations

import sys

import numpy as np

from moe_relayfree.tools.bench.report import table
from moe_relayfree.tools.bench.timing import interleaved_calls

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


def measure_point(models: dict, prompts: list[list[int]], new_tokens: int, repeats: int,
                  shards: int) -> list[dict]:
    """One (batch, prompt length) point: every path's ``generate`` of ``prompts`` in
    ``repeats`` interleaved rounds; one row per path (``shards``: token shards of the mesh,
    for the schedule each phase ran)."""
    import moe_relayfree as mr
    from moe_relayfree_models.generation import generate

    batch, length = len(prompts), len(prompts[0])

    def call(name):
        r = generate(models[name], prompts, new_tokens)
        # one round's TTFT is kept with its TPOT: the timer's seconds are the TPOT
        ttft[name].append(1e3 * r["ttft_s"])
        return r["tokens"], 1e3 * float(np.median(r["step_s"]))

    ttft = {n: [] for n in models}
    tpot, outs = interleaved_calls({n: (lambda n=n: call(n)) for n in models}, repeats)
    rows = []
    for name in models:
        row = dict(dispatch=name, batch=batch, prompt=length,
                   ttft_ms=float(np.median(ttft[name])), tpot_ms=float(np.median(tpot[name])),
                   tpot_rounds_ms=tpot[name].tolist(), ttft_rounds_ms=ttft[name],
                   prefill_schedule=mr.select_schedule(-(-batch * length // shards)),
                   decode_schedule=mr.select_schedule(-(-batch // shards)))
        rows.append(row)
        print(f"  batch {batch:3d} prompt {length:4d} {name:18s} TTFT {row['ttft_ms']:9.1f} ms  "
              f"TPOT {row['tpot_ms']:8.1f} ms", flush=True)
    same = all(t == outs["relayfree"] for t in outs.values())
    best = min(r["tpot_ms"] for r in rows if r["dispatch"] != "relayfree")
    # per round: the faster baseline of that round (the paths ran back to back in it)
    best_round = np.min([tpot[n] for n in models if n != "relayfree"], axis=0)
    for row in rows:
        row["tokens_identical"] = same
        row["tpot_vs_best_baseline"] = row["tpot_ms"] / best
        row["tpot_paired_vs_best_baseline"] = float(np.median(tpot[row["dispatch"]] / best_round))
    return rows


def summarize(rows: list[dict], base_len: int, first_batch: int,
              target_ms: float | None) -> dict:
    """The feasible batches of the decode rows (prompt ``base_len``) at ``target_ms`` (default
    1.5x the best batch-``first_batch`` TPOT) and at :data:`SLO_MULTIPLES` of that TPOT."""
    decode_rows = [r for r in rows if r["prompt"] == base_len]
    base = min(r["tpot_ms"] for r in decode_rows if r["batch"] == first_batch)
    target = target_ms or 1.5 * base
    main_point = feasibility(decode_rows, target)
    return dict(tpot_target_ms=target, feasible_batch=main_point["feasible_batch"],
                feasible_vs_best_baseline=main_point["feasible_vs_best_baseline"],
                best_batch1_tpot_ms=base,
                feasible_by_target=[feasibility(decode_rows, m * base, m) for m in SLO_MULTIPLES])


def markdown(report: dict) -> str:
    names = list(report["feasible_batch"])
    lines = [f"# Serving sweep ({report['command']})", "",
             f"{report['devices']} {report['platform']} devices (mesh "
             + ",".join(f"{a}={n}" for a, n in report["mesh"].items())
             + f"), {report['new_tokens']} new tokens, "
             f"medians of {report['repeats']} interleaved rounds, TPOT target "
             f"{report['tpot_target_ms']:.1f} ms. "
             "Schedules are relay-free's (`auto`); the baselines have one path.", "",
             "*TPOT / best baseline*: ratio of the medians; *paired*: median over rounds of the "
             "path's TPOT over the faster baseline's in the same round.", ""]
    lines += table(["dispatch", "batch", "prompt", "TTFT ms", "TPOT ms", "TPOT / best baseline",
                    "paired", "TPOT rounds ms", "prefill", "decode", "same tokens"],
                   [[r["dispatch"], r["batch"], r["prompt"], f"{r['ttft_ms']:.1f}",
                     f"{r['tpot_ms']:.1f}", f"{r['tpot_vs_best_baseline']:.2f}",
                     f"{r['tpot_paired_vs_best_baseline']:.2f}",
                     " / ".join(f"{t:.1f}" for t in r["tpot_rounds_ms"]), r["prefill_schedule"],
                     r["decode_schedule"], r["tokens_identical"]] for r in report["rows"]])
    ratio = report["feasible_vs_best_baseline"]
    lines += ["", "Largest batch meeting the TPOT target: "
              + ", ".join(f"{k} {v}" for k, v in report["feasible_batch"].items())
              + (f" (relay-free / best baseline: {ratio:.2f}x)" if ratio else ""), "",
              f"Largest batch meeting other TPOT targets (multiples of the best batch-1 TPOT, "
              f"{report['best_batch1_tpot_ms']:.1f} ms):", ""]
    rows = []
    for point in report["feasible_by_target"]:
        r = point["feasible_vs_best_baseline"]
        rows.append([f"{point['multiple']:.2f}x", f"{point['tpot_target_ms']:.1f}"]
                    + [point["feasible_batch"][n] for n in names]
                    + ["no baseline meets it" if r is None else f"{r:.2f}x"])
    lines += table(["target", "ms", *names, "relay-free / best baseline"], rows)
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str, base_len: int, base_batch: int) -> bool:
    """TPOT over batch and TTFT over prompt length per path, to ``path`` (False: no matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return False
    rows = report["rows"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for name in report["feasible_batch"]:
        pts = [(r["batch"], r["tpot_ms"]) for r in rows if r["dispatch"] == name and r["prompt"] == base_len]
        a1.plot(*zip(*pts), marker="o", label=name)
        pts = sorted((r["prompt"], r["ttft_ms"]) for r in rows
                     if r["dispatch"] == name and r["batch"] == base_batch)
        if pts:
            a2.plot(*zip(*pts), marker="o", label=name)
    a1.axhline(report["tpot_target_ms"], color="gray", ls="--", label="TPOT target")
    a1.set(xscale="log", xlabel="batch", ylabel="TPOT ms (median)", title=f"decode, prompt {base_len}")
    a2.set(xscale="log", xlabel="prompt tokens", ylabel="TTFT ms", title=f"prefill, batch {base_batch}")
    for a in (a1, a2):
        a.legend()
        a.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
