"""Decode-sized MoE layers: time on emulated CPU devices, bytes per rank at large P.

* :func:`layer_part`: whole-layer time at decode sizes (P=8 emulated CPU devices, k=8,
  d=1024) of the relay-free decode schedule, the prefill schedule, "auto", and the baselines
  that drop nothing (:mod:`.variants`), in interleaved rounds; ratios are medians of per-round
  ratios with a bootstrap 95% interval of that median.
* :func:`bytes_part`: the layer lowered for ``cuda`` (no GPU needed) at P = 8..64 emulated
  devices with DeepSeek-V3 shapes (E=256, k=8, d=7168, bf16), summing the buffer each
  collective moves per rank (``moe_relayfree.tools.analysis.collectives``). It needs 64
  devices: :func:`bytes_in_subprocess` runs it in a fresh process.

The command: ``scripts/bench_decode.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from moe_relayfree.tools.bench.inputs import case_inputs
from moe_relayfree.tools.bench.timing import interleaved, ratio_summary
from moe_relayfree.tools.bench.variants import EXCHANGES as EXCHANGE_IMPLS
from moe_relayfree.paths import PATHS
from moe_relayfree.tools.bench.variants import LAYERS as LAYER_IMPLS
from moe_relayfree.tools.bench.variants import layer_program

BYTES_IMPLS = ("decode", "decode_gather", "prefill_one_round", "ragged_baseline", "capacity_baseline")


MAX_ROUNDS = 400


def layer_part(smoke: bool, rounds: int, experts=None, tokens=None, seconds: float = 0.0) -> list[dict]:
    """Whole-layer times of :data:`LAYER_IMPLS` and :data:`EXCHANGE_IMPLS` at decode sizes,
    interleaved rounds until each case has run ``seconds``; ratios with intervals."""
    import numpy as np

    import moe_relayfree as mr

    mesh = mr.make_ep_mesh(8)
    if smoke:
        cases = [dict(E=16, f=16, T=t, k=2, d=32) for t in (1, 4)]
    else:
        cases = [dict(E=e, f=f, T=t, k=8, d=1024) for e, f in ((64, 512), (256, 256))
                 for t in (1, 8, 16, 64)
                 if (experts is None or e in experts) and (tokens is None or t in tokens)]
    rows = []
    for case in cases:
        e = case["E"]
        args = case_inputs(mesh, case)
        fns = {name: layer_program(mesh, name) for name in LAYER_IMPLS + EXCHANGE_IMPLS}
        outs = {name: np.asarray(fn(*args)) for name, fn in fns.items()}  # compile + check
        # a path that may drop copies (the bounded baseline) is timed, not compared
        err = max(float(np.abs(outs[n] - outs["prefill"]).max()) for n in LAYER_IMPLS
                  if n not in PATHS or not PATHS[n].drops)
        err = max(err, float(np.abs(outs["decode_exchange"] - outs["prefill_exchange"]).max()))
        # Rounds go on until the case's time budget is spent (at least `rounds`): at T <= 16
        # the schedules differ by a few percent of a weight-bound layer, and only many paired
        # rounds resolve that on a noisy machine. Each program runs once untimed right before
        # its timed call: otherwise whichever program follows the capacity baseline (seconds of
        # cache-thrashing at E=256) is always timed cold, which cost it up to 1.2x here.
        t = interleaved(fns, args, min_rounds=rounds, wall_seconds=seconds, max_rounds=MAX_ROUNDS)
        r = len(t["decode"])
        # the best baseline that drops nothing (what a user would pick instead)
        best_base = np.min([t[n] for n, p in PATHS.items()
                            if p.implementation != "relayfree" and not p.drops], axis=0)
        ratios = {"decode_vs_prefill": t["decode"] / t["prefill"],
                  "decode_vs_best_baseline": t["decode"] / best_base,
                  "auto_vs_faster": t["auto"] / np.minimum(t["decode"], t["prefill"]),
                  "exchange_decode_vs_prefill": t["decode_exchange"] / t["prefill_exchange"],
                  # one program timed twice where auto picks decode: this run's noise floor
                  "auto_vs_decode": t["auto"] / t["decode"]}
        row = dict(case, P=8, rounds=r, ms={name: float(np.median(v) * 1e3) for name, v in t.items()},
                   max_abs_diff=err, auto_schedule=mr.select_schedule(case["T"]))
        for key, v in ratios.items():
            summary = ratio_summary(v)
            row[key], row[key + "_quartiles"], row[key + "_ci95"] = (
                summary["median"], summary["quartiles"], summary["ci95"])
        rows.append(row)
        print(f"E={e:3d} T={case['T']:3d} rounds {r} " + " ".join(f"{k_} {v:7.1f}" for k_, v in row["ms"].items())
              + " | " + "; ".join(f"{key} {row[key]:.3f} [{row[key + '_ci95'][0]:.3f}, "
                                  f"{row[key + '_ci95'][1]:.3f}]" for key in ratios), flush=True)
    return rows


def bytes_part(smoke: bool) -> list[dict]:
    """Lowers every implementation for cuda at each P and sums its collectives' buffers."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import moe_relayfree as mr
    from moe_relayfree.tools import analysis

    shape = dict(T=2, E=64, k=4, d=512, f=32) if smoke else dict(T=8, E=256, k=8, d=7168, f=2048)
    ranks = (4, 8, 16) if smoke else (8, 16, 32, 64)
    t, e, k, d, f = (shape[c] for c in ("T", "E", "k", "d", "f"))
    rows = []
    for p in ranks:
        mesh = mr.make_ep_mesh(p)
        tok, exp = NamedSharding(mesh, P("ep")), NamedSharding(mesh, P("ep", None, None))
        spec = lambda s, dt, sh: jax.ShapeDtypeStruct(s, dt, sharding=sh)  # noqa: E731
        args = [spec((p * t, d), jnp.bfloat16, tok), spec((p * t, k), jnp.int32, tok),
                spec((p * t, k), jnp.float32, tok), spec((e, d, f), jnp.bfloat16, exp),
                spec((e, d, f), jnp.bfloat16, exp), spec((e, f, d), jnp.bfloat16, exp)]
        for name in BYTES_IMPLS:
            text = layer_program(mesh, name).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
            # each collective once: the rounds are one loop body, run once under uniform routing
            ops = analysis.collectives(text)
            moved = sum(c.moved.nbytes for c in ops)
            data = sum(c.moved.nbytes for c in ops if c.moved.elements >= d)
            exact = 2 * t * k * d * 2  # every copy out and back once, bf16
            rows.append(dict(shape, P=p, impl=name, bytes_per_rank=moved, data_bytes=data,
                             collectives=sorted(c.op for c in ops), vs_exact=moved / exact))
            print(f"P={p:3d} {name:18s} {moved / 2**20:9.2f} MiB/rank  x(2*T*k*d*2) {moved / exact:6.2f}  "
                  f"{', '.join(sorted(c.op for c in ops))}", flush=True)
    return rows


def markdown(report) -> str:
    lines = [f"# Decode-sized layers ({report['mode']})", "",
             f"Machine: {report['machine']}; JAX {report['jax']}. Command: `{report['command']}`.", ""]
    if report.get("layer"):
        def ci(r, key):
            lo, hi = r[key + "_ci95"]
            return f"{r[key]:.2f} [{lo:.2f}, {hi:.2f}]"

        lines += ["## Layer time, P=8 emulated CPU devices", "",
                  "Median ms; ratios: median of per-round ratios [bootstrap 95% interval of that "
                  "median]. auto/decode: one program timed twice (where auto picks decode), the "
                  "run's noise floor.", "",
                  "| E | T/rank | rounds | " + " | ".join(LAYER_IMPLS)
                  + " | decode/prefill | auto/decode (noise) | own work: decode / prefill ms "
                  "| decode/best baseline | auto/faster |",
                  "|---" * (len(LAYER_IMPLS) + 8) + "|"]
        for r in report["layer"]:
            ms = r["ms"]
            lines.append(f"| {r['E']} | {r['T']} | {r['rounds']} | "
                         + " | ".join(f"{ms[n]:.1f}" for n in LAYER_IMPLS)
                         + f" | {ci(r, 'decode_vs_prefill')} | {ci(r, 'auto_vs_decode')} "
                         f"| {ms['decode_exchange']:.1f} / {ms['prefill_exchange']:.1f} = "
                         f"{r['exchange_decode_vs_prefill']:.2f} | {ci(r, 'decode_vs_best_baseline')} "
                         f"| {r['auto_vs_faster']:.2f} |")
    if report.get("bytes"):
        first = report["bytes"][0]
        lines += ["", f"## Bytes moved per rank by the collectives, lowered for cuda (T={first['T']}, "
                  f"E={first['E']}, k={first['k']}, d={first['d']}, bf16): MiB, and in brackets the ratio to "
                  "2*T*k*d*2 bytes, every copy out and back once", "",
                  "| impl | " + " | ".join(f"P={p}" for p in sorted({r['P'] for r in report['bytes']})) + " | collectives |",
                  "|---" * (2 + len({r['P'] for r in report['bytes']})) + "|"]
        for name in BYTES_IMPLS:
            cells = [r for r in report["bytes"] if r["impl"] == name]
            lines.append(f"| {name} | " + " | ".join(f"{r['bytes_per_rank'] / 2**20:.2f} ({r['vs_exact']:.2f}x)" for r in cells)
                         + f" | {', '.join(cells[-1]['collectives'])} |")
    return "\n".join(lines) + "\n"


def bytes_in_subprocess(smoke: bool, scratch: str) -> list[dict]:
    """:func:`bytes_part` in a fresh process with 64 emulated devices (16 for ``smoke``),
    without the caller's ``XLA_FLAGS``."""
    os.makedirs(scratch, exist_ok=True)
    child = os.path.join(scratch, "bytes.json")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    subprocess.run([sys.executable, "-m", __name__, child] + (["--smoke"] if smoke else []),
                   check=True, env=env)
    with open(child) as fh:
        rows = json.load(fh)
    os.remove(child)
    return rows


if __name__ == "__main__":  # the subprocess of bytes_in_subprocess: OUT [--smoke]
    from moe_relayfree.tools.bench import env as _env

    _smoke = "--smoke" in sys.argv
    _env.emulate_cpu_devices(16 if _smoke else 64)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    with open(sys.argv[1], "w") as _fh:
        json.dump(bytes_part(_smoke), _fh)
