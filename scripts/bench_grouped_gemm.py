"""Grouped SwiGLU on expert-major windows: the CPU tiled kernel vs ``lax.ragged_dot``.

Single device, same inputs, same run; prints JSON with median seconds and ratios.

    python scripts/bench_grouped_gemm.py [--rows 2048 --d 512 --f 1024 --experts 8]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from moe_relayfree.experts import grouped_swiglu_native
from moe_relayfree.ffn import swiglu
from moe_relayfree.tiled import grouped_swiglu_tiled
from moe_relayfree.tools.bench.timing import median_seconds


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--f", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--fill", type=float, default=0.9, help="fraction of rows inside windows")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    used = int(args.rows * args.fill)
    cuts = np.sort(rng.choice(used, args.experts - 1, replace=False))
    sizes = np.diff(np.concatenate([[0], cuts, [used]])).astype(np.int32)
    x = jnp.asarray(rng.standard_normal((args.rows, args.d)), jnp.float32)
    wg = jnp.asarray(rng.standard_normal((args.experts, args.d, args.f)) / np.sqrt(args.d), jnp.float32)
    wu = jnp.asarray(rng.standard_normal((args.experts, args.d, args.f)) / np.sqrt(args.d), jnp.float32)
    wd = jnp.asarray(rng.standard_normal((args.experts, args.f, args.d)) / np.sqrt(args.f), jnp.float32)
    gs = jnp.asarray(sizes)

    def static_slices(x, wg, wu, wd):  # the per-expert loop a user would write with known sizes
        outs, start = [], 0
        for e, n in enumerate(sizes):
            outs.append(swiglu(x[start : start + n], wg[e], wu[e], wd[e]))
            start += n
        return jnp.concatenate(outs + [jnp.zeros((args.rows - start, args.d), x.dtype)])

    results = {"device": jax.devices()[0].device_kind, "rows": args.rows, "used_rows": used,
               "d": args.d, "f": args.f, "experts": args.experts, "median_s": {}}
    impls = {
        "tiled_cpu": jax.jit(grouped_swiglu_tiled),
        "ragged_dot": jax.jit(grouped_swiglu_native),
    }
    for name, fn in impls.items():
        results["median_s"][name] = median_seconds(fn, x, gs, wg, wu, wd, repeats=args.repeats)
    results["median_s"]["static_slices"] = median_seconds(
        jax.jit(static_slices), x, wg, wu, wd, repeats=args.repeats
    )
    base = results["median_s"]["tiled_cpu"]
    results["ratio_to_tiled"] = {k: v / base for k, v in results["median_s"].items()}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
