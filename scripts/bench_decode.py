"""Decode-sized MoE layers: time on emulated CPU devices, bytes per rank at large P.

Two parts, one JSON + markdown report (``--out``, default ``results/decode``):

* ``layer``: whole-layer time at decode sizes (P=8 emulated CPU devices, k=8, d=1024) for the
  relay-free decode schedule, the relay-free prefill schedule, "auto", and the baselines that
  drop nothing (MaxText-style ragged, GShard-style capacity with C=T). Every implementation is
  timed once per round (warm: right after an untimed call), rounds interleaved in a rotating
  order and repeated until each case has been timed ``--seconds``; ratios are medians of
  per-round ratios with a bootstrap 95% interval of that median.
* ``bytes``: the dispatch+combine lowered for ``cuda`` (no GPU needed) at P = 8..64 emulated
  devices with DeepSeek-V3 shapes (E=256, k=8, d=7168, bf16), summing the buffer each
  collective moves per rank (``moe_relayfree.tools.analysis.collectives``). Runs in a subprocess
  with 64 emulated devices.

    python scripts/bench_decode.py                 # both parts (about 15 min on 2 cores)
    python scripts/bench_decode.py --part bytes    # seconds
    python scripts/bench_decode.py --smoke --out /tmp/d   # tiny, for the tests
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

LAYER_IMPLS = ("decode", "prefill", "auto", "ragged_baseline", "capacity_baseline")
# the two schedules with the expert compute replaced by a copy: their own work alone
EXCHANGE_IMPLS = ("decode_exchange", "prefill_exchange")
BYTES_IMPLS = ("decode", "decode_gather", "prefill_one_round", "ragged_baseline", "capacity_baseline")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("all", "layer", "bytes"), default="all")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script")
    p.add_argument("--rounds", type=int, default=None,
                   help="layer part: at least this many interleaved timing rounds per case")
    p.add_argument("--seconds", type=float, default=None,
                   help="layer part: go on with rounds until a case has been timed this long "
                   "(default 75; smoke 0)")
    p.add_argument("--experts", type=int, nargs="+", default=None,
                   help="layer part: only these E (64 and/or 256)")
    p.add_argument("--tokens", type=int, nargs="+", default=None,
                   help="layer part: only these tokens per rank (of 1, 8, 16, 64)")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--out", default="results/decode")
    p.add_argument("--bytes-child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _setup_jax(devices: int):
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _schedule_fn(mesh, schedule: str, *, transport: str = "auto", gemm: bool = True):
    """One schedule called directly (``decode_moe`` / ``prefill_moe``). ``gemm=False``: the
    expert compute is a copy of the window rows, leaving the schedule's own work (exchange,
    windows, combine) to be timed apart from the weight reads both schedules share."""
    import jax
    from jax.sharding import PartitionSpec as P

    from moe_relayfree import decode, prefill
    from moe_relayfree.experts import windows_swiglu
    from moe_relayfree.plan import rows_per_round

    def body(x, ids, w, wg, wu, wd):
        def experts(win):
            return windows_swiglu(win, wg, wu, wd) if gemm else win.rows

        common = dict(num_experts=wg.shape[0] * mesh.shape["ep"], axis_name="ep")
        if schedule == "decode":
            return decode.decode_moe(x, ids, w, experts, transport=transport, **common)
        rows = rows_per_round(x.shape[0], ids.shape[1], mesh.shape["ep"], 2.0)
        return prefill.prefill_moe(x, ids, w, experts, rows_per_round=rows, **common)

    tok, exp = P("ep"), P("ep", None, None)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(tok,) * 3 + (exp,) * 3, out_specs=tok))


def _layer_fn(mesh, name):
    import jax

    import moe_relayfree as mr

    if name == "decode_gather":
        return _schedule_fn(mesh, "decode", transport="gather")
    if name.endswith("_exchange"):
        return _schedule_fn(mesh, name.split("_")[0], gemm=False)

    kw = {"decode": dict(schedule="decode"), "prefill": dict(schedule="prefill"),
          "auto": dict(schedule="auto"), "ragged_baseline": dict(implementation="ragged_baseline"),
          "capacity_baseline": dict(implementation="capacity_baseline"),
          # one round (the worst-case buffer): skewed batches add rounds, bytes are the same
          "prefill_one_round": dict(schedule="prefill", capacity_factor=None)}[name]
    return jax.jit(lambda *a: mr.expert_parallel_moe(*a, mesh=mesh, **kw))


MAX_ROUNDS = 400


def median_ci(ratios, level: float = 0.95, draws: int = 4000) -> list[float]:
    """Bootstrap confidence interval of the median of per-round ratios (fixed seed)."""
    import numpy as np

    v = np.asarray(ratios, np.float64)
    medians = np.median(np.random.default_rng(0).choice(v, (draws, v.size)), axis=1)
    tail = (1 - level) / 2 * 100
    return np.percentile(medians, [tail, 100 - tail]).tolist()


def case_inputs(mesh, case: dict, seed: int = 0) -> list:
    """x ``[P*T, d]``, ids ``[P*T, k]`` (k distinct experts, uniform), weights ``[P*T, k]`` and
    the three stacked expert weights, f32, placed on ``mesh`` (tokens and experts over "ep")."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    tok, exp = NamedSharding(mesh, P("ep")), NamedSharding(mesh, P("ep", None, None))
    rng = np.random.default_rng(seed)
    n, d, f, e, k = mesh.shape["ep"] * case["T"], case["d"], case["f"], case["E"], case["k"]
    ids = np.argsort(rng.random((n, e)), axis=1)[:, :k].astype(np.int32)
    args = [jax.device_put(jnp.asarray(rng.standard_normal((n, d)), jnp.float32), tok),
            jax.device_put(jnp.asarray(ids), tok),
            jax.device_put(jnp.asarray(rng.uniform(0.1, 1, (n, k)), jnp.float32), tok)]
    args += [jax.device_put(jnp.asarray(rng.standard_normal(s) / np.sqrt(s[1]), jnp.float32), exp)
             for s in ((e, d, f), (e, d, f), (e, f, d))]
    return args


def layer_part(smoke: bool, rounds: int, experts=None, tokens=None, seconds: float = 0.0) -> list[dict]:
    import jax
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
        fns = {name: _layer_fn(mesh, name) for name in LAYER_IMPLS + EXCHANGE_IMPLS}
        outs = {name: np.asarray(fn(*args)) for name, fn in fns.items()}  # compile + check
        err = max(float(np.abs(outs[n] - outs["prefill"]).max()) for n in LAYER_IMPLS)
        err = max(err, float(np.abs(outs["decode_exchange"] - outs["prefill_exchange"]).max()))
        times = {name: [] for name in fns}
        names = list(fns)
        begin, r = time.perf_counter(), 0
        # Rounds go on until the case's time budget is spent (at least `rounds`): at T <= 16
        # the schedules differ by a few percent of a weight-bound layer, and only many paired
        # rounds resolve that on a noisy machine.
        while r < rounds or (time.perf_counter() - begin < seconds and r < MAX_ROUNDS):
            # The order rotates every round and each program runs once untimed right before its
            # timed call: otherwise whichever program follows the capacity baseline (seconds of
            # cache-thrashing at E=256) is always timed cold, which cost it up to 1.2x here.
            for name in names[r % len(names):] + names[:r % len(names)]:
                jax.block_until_ready(fns[name](*args))
                start = time.perf_counter()
                jax.block_until_ready(fns[name](*args))
                times[name].append(time.perf_counter() - start)
            r += 1
        t = {name: np.asarray(v) for name, v in times.items()}
        best_base = np.minimum(t["ragged_baseline"], t["capacity_baseline"])
        ratios = {"decode_vs_prefill": t["decode"] / t["prefill"],
                  "decode_vs_best_baseline": t["decode"] / best_base,
                  "auto_vs_faster": t["auto"] / np.minimum(t["decode"], t["prefill"]),
                  "exchange_decode_vs_prefill": t["decode_exchange"] / t["prefill_exchange"],
                  # one program timed twice where auto picks decode: this run's noise floor
                  "auto_vs_decode": t["auto"] / t["decode"]}
        row = dict(case, P=8, rounds=r, ms={name: float(np.median(v) * 1e3) for name, v in t.items()},
                   max_abs_diff=err, auto_schedule=mr.select_schedule(case["T"]))
        for key, v in ratios.items():
            row[key] = float(np.median(v))
            row[key + "_quartiles"] = np.percentile(v, [25, 75]).tolist()
            row[key + "_ci95"] = median_ci(v)
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
            text = _layer_fn(mesh, name).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
            # a skewed batch's extra rounds (a loop) move nothing under this uniform routing
            ops = [c for c in analysis.collectives(text) if not c.in_loop]
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
                  "| E | T/rank | rounds | decode | prefill | auto | ragged | capacity "
                  "| decode/prefill | auto/decode (noise) | own work: decode / prefill ms "
                  "| decode/best baseline | auto/faster |",
                  "|---" * 13 + "|"]
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


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.bytes_child:
        _setup_jax(16 if a.smoke else 64)
        json.dump(bytes_part(a.smoke), sys.stdout if a.out == "-" else open(a.out, "w"))
        return 0
    # flags the caller set (e.g. XLA:CPU's dot path), recorded with the command
    user_flags = os.environ.get("XLA_FLAGS", "").strip()
    _setup_jax(a.devices)
    import platform

    import jax

    report = {"mode": "smoke" if a.smoke else "full", "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "jax": jax.__version__,
              "command": " ".join(([f'XLA_FLAGS="{user_flags}"'] if user_flags else [])
                                  + ["python scripts/bench_decode.py"]
                                  + (sys.argv[1:] if argv is None else list(argv)))}
    if a.part in ("all", "layer"):
        seconds = a.seconds if a.seconds is not None else (0.0 if a.smoke else 75.0)
        report["layer"] = layer_part(a.smoke, a.rounds or (2 if a.smoke else 9), a.experts,
                                     a.tokens, seconds)
    if a.part in ("all", "bytes"):
        os.makedirs(a.out, exist_ok=True)
        child = os.path.join(a.out, "bytes.json")
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        subprocess.run([sys.executable, __file__, "--bytes-child", "--out", child]
                       + (["--smoke"] if a.smoke else []), check=True, env=env)
        with open(child) as fh:
            report["bytes"] = json.load(fh)
        os.remove(child)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "decode.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    with open(os.path.join(a.out, "decode.md"), "w") as fh:
        fh.write(markdown(report))
    print(f"wrote {a.out}/decode.json, decode.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
