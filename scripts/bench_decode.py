"""Decode-sized MoE layers: time on emulated CPU devices, bytes per rank at large P.

Two parts, one JSON + markdown report (``--out``, default ``results/decode``):

* ``layer``: whole-layer time at decode sizes (P=8 emulated CPU devices, k=8, d=1024) for the
  relay-free decode schedule, the relay-free prefill schedule, "auto", and the baselines that
  drop nothing (MaxText-style ragged, GShard-style capacity with C=T). Every implementation is
  timed once per round (warm: right after an untimed call), rounds interleaved in a rotating
  order; ratios are medians of per-round ratios.
* ``bytes``: the dispatch+combine lowered for ``cuda`` (no GPU needed) at P = 8..64 emulated
  devices with DeepSeek-V3 shapes (E=256, k=8, d=7168, bf16), summing the buffer each
  collective moves per rank (``moe_relayfree.analysis.collectives``). Runs in a subprocess
  with 64 emulated devices.

    python scripts/bench_decode.py                 # both parts (about 10 min on 2 cores)
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
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds")
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
    from moe_relayfree.experts import grouped_swiglu
    from moe_relayfree.plan import rows_per_round

    def body(x, ids, w, wg, wu, wd):
        def experts(win):
            return grouped_swiglu(win.rows, win.group_sizes, wg, wu, wd) if gemm else win.rows

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


def layer_part(smoke: bool, rounds: int, experts=None, tokens=None) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import moe_relayfree as mr

    mesh = mr.make_ep_mesh(8)
    tok, exp = NamedSharding(mesh, P("ep")), NamedSharding(mesh, P("ep", None, None))
    if smoke:
        cases = [dict(E=16, f=16, T=t, k=2, d=32) for t in (1, 4)]
    else:
        cases = [dict(E=e, f=f, T=t, k=8, d=1024) for e, f in ((64, 512), (256, 256))
                 for t in (1, 8, 16, 64)
                 if (experts is None or e in experts) and (tokens is None or t in tokens)]
    rows = []
    for case in cases:
        rng = np.random.default_rng(0)
        n, d, f, e, k = 8 * case["T"], case["d"], case["f"], case["E"], case["k"]
        ids = np.argsort(rng.random((n, e)), axis=1)[:, :k].astype(np.int32)
        args = [jax.device_put(jnp.asarray(rng.standard_normal((n, d)), jnp.float32), tok),
                jax.device_put(jnp.asarray(ids), tok),
                jax.device_put(jnp.asarray(rng.uniform(0.1, 1, (n, k)), jnp.float32), tok)]
        args += [jax.device_put(jnp.asarray(rng.standard_normal(s) / np.sqrt(s[1]), jnp.float32), exp)
                 for s in ((e, d, f), (e, d, f), (e, f, d))]
        fns = {name: _layer_fn(mesh, name) for name in LAYER_IMPLS + EXCHANGE_IMPLS}
        outs = {name: np.asarray(fn(*args)) for name, fn in fns.items()}  # compile + check
        err = max(float(np.abs(outs[n] - outs["prefill"]).max()) for n in LAYER_IMPLS)
        err = max(err, float(np.abs(outs["decode_exchange"] - outs["prefill_exchange"]).max()))
        times = {name: [] for name in fns}
        names = list(fns)
        for r in range(rounds):
            # The order rotates every round and each program runs once untimed right before its
            # timed call: otherwise whichever program follows the capacity baseline (seconds of
            # cache-thrashing at E=256) is always timed cold, which cost it up to 1.2x here.
            for name in names[r % len(names):] + names[:r % len(names)]:
                jax.block_until_ready(fns[name](*args))
                start = time.perf_counter()
                jax.block_until_ready(fns[name](*args))
                times[name].append(time.perf_counter() - start)
        t = {name: np.asarray(v) for name, v in times.items()}
        best_base = np.minimum(t["ragged_baseline"], t["capacity_baseline"])
        row = dict(case, P=8, ms={name: float(np.median(v) * 1e3) for name, v in t.items()},
                   max_abs_diff=err,
                   auto_schedule=mr.select_schedule(case["T"]),
                   decode_vs_prefill=float(np.median(t["decode"] / t["prefill"])),
                   decode_vs_best_baseline=float(np.median(t["decode"] / best_base)),
                   auto_vs_faster=float(np.median(t["auto"] / np.minimum(t["decode"], t["prefill"]))),
                   exchange_decode_vs_prefill=float(np.median(t["decode_exchange"]
                                                              / t["prefill_exchange"])),
                   # spread of the per-round ratio, and of auto/decode where both are one
                   # program (the noise floor of this run)
                   decode_vs_prefill_quartiles=np.percentile(t["decode"] / t["prefill"],
                                                             [25, 75]).tolist(),
                   auto_vs_decode_quartiles=np.percentile(t["auto"] / t["decode"],
                                                          [25, 75]).tolist())
        rows.append(row)
        print(f"E={e:3d} T={case['T']:3d} " + " ".join(f"{k_} {v:7.1f}" for k_, v in row["ms"].items())
              + f" | decode/prefill {row['decode_vs_prefill']:.2f} (quartiles "
              + "/".join(f"{q:.2f}" for q in row["decode_vs_prefill_quartiles"])
              + ", auto/decode " + "/".join(f"{q:.2f}" for q in row["auto_vs_decode_quartiles"])
              + f"; own work {row['exchange_decode_vs_prefill']:.2f}) decode/best-baseline "
              f"{row['decode_vs_best_baseline']:.2f} auto/faster {row['auto_vs_faster']:.2f}", flush=True)
    return rows


def bytes_part(smoke: bool) -> list[dict]:
    """Lowers every implementation for cuda at each P and sums its collectives' buffers."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import moe_relayfree as mr
    from moe_relayfree import analysis

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
        lines += ["## Layer time, P=8 emulated CPU devices (median ms; ratios: median of per-round ratios)", "",
                  "| E | T/rank | " + " | ".join(LAYER_IMPLS + EXCHANGE_IMPLS)
                  + " | decode/prefill | own work: decode/prefill | decode/best baseline | auto picks | auto/faster |",
                  "|" + "---|" * (len(LAYER_IMPLS + EXCHANGE_IMPLS) + 7)]
        for r in report["layer"]:
            lines.append(f"| {r['E']} | {r['T']} | "
                         + " | ".join(f"{r['ms'][n]:.1f}" for n in LAYER_IMPLS + EXCHANGE_IMPLS)
                         + f" | {r['decode_vs_prefill']:.2f} | {r['exchange_decode_vs_prefill']:.2f} "
                         f"| {r['decode_vs_best_baseline']:.2f} "
                         f"| {r['auto_schedule']} | {r['auto_vs_faster']:.2f} |")
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
    _setup_jax(a.devices)
    import platform

    import jax

    report = {"mode": "smoke" if a.smoke else "full", "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "jax": jax.__version__,
              "command": "python scripts/bench_decode.py" + (" --smoke" if a.smoke else "")
              + ("" if a.part == "all" else f" --part {a.part}")}
    if a.part in ("all", "layer"):
        report["layer"] = layer_part(a.smoke, a.rounds or (2 if a.smoke else 7), a.experts,
                                     a.tokens)
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
