"""Relay-free MoE layer demo: prefill- and decode-sized batches, schedule, error, latency.

Runs on 8 emulated CPU devices by default (real accelerators are used where present):

    python scripts/demo.py [--devices 8] [--experts 64] [--k 8] [--d-model 256] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

from moe_relayfree.tools.bench import env
from moe_relayfree.tools.bench.timing import median_seconds


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=8, help="emulated CPU devices (CPU only)")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=512)
    p.add_argument("--prefill-tokens", type=int, default=1024, help="tokens per prefill batch")
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens per decode step")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    env.emulate_cpu_devices(args.devices)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import moe_relayfree as mr

    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("ep",))
    layer = mr.MoELayer(
        args.d_model, args.d_ff, args.experts, args.k, mesh=mesh, rngs=nnx.Rngs(0)
    )
    forward = nnx.jit(lambda m, x: m(x))
    params = [jnp.asarray(np.asarray(v[...])) for v in (layer.w_gate, layer.w_up, layer.w_down)]

    def reference(x):
        ids, w = layer.route(x)
        return mr.dense_moe_reference(x, ids, w, *params)

    report = {"platform": devices[0].platform, "devices": len(devices), "experts": args.experts,
              "k": args.k, "d_model": args.d_model, "d_ff": args.d_ff, "phases": []}
    rng = np.random.default_rng(0)
    for phase, n in (("prefill", args.prefill_tokens), ("decode", args.decode_tokens)):
        x = jnp.asarray(rng.standard_normal((n, args.d_model)), jnp.float32)
        y = forward(layer, x).block_until_ready()
        seconds = median_seconds(forward, layer, x, repeats=args.repeats)
        tokens_per_rank = -(-n // len(devices))
        report["phases"].append({
            "phase": phase,
            "tokens": n,
            "tokens_per_rank": tokens_per_rank,
            "schedule": mr.select_schedule(tokens_per_rank),
            "max_abs_err_vs_dense": float(jnp.abs(y - reference(x)).max()),
            "median_ms": 1e3 * seconds,
        })
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"moe-relayfree demo: {report['devices']} {report['platform']} devices, "
          f"E={args.experts} k={args.k} d={args.d_model} f={args.d_ff}")
    for r in report["phases"]:
        print(f"  {r['phase']:8s} {r['tokens']:6d} tokens ({r['tokens_per_rank']} per rank): "
              f"schedule={r['schedule']:8s} max|err| vs dense={r['max_abs_err_vs_dense']:.2e} "
              f"median {r['median_ms']:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
