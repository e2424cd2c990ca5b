"""Measures the decode/prefill crossover on this machine and prints it as JSON.

    python scripts/calibrate.py [--devices 8] [--experts 64 --k 8 --d-model 256 --d-ff 512]

Apply the result process-wide with ``moe_relayfree.set_decode_threshold(threshold, platform)``
(layers and models then use it) or per call with ``expert_parallel_moe(..., decode_threshold=)``.
"""

from __future__ import annotations

import argparse
import json

from moe_relayfree.tools.bench import env


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, default=8, help="emulated CPU devices (CPU only)")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=512)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    env.emulate_cpu_devices(args.devices)
    import jax

    from moe_relayfree.tools.calibration import calibrate_decode_threshold

    mesh = jax.make_mesh((len(jax.devices()),), ("ep",))
    result = calibrate_decode_threshold(
        mesh, d_model=args.d_model, d_ff=args.d_ff, num_experts=args.experts, k=args.k,
        tokens_per_rank=args.tokens, repeats=args.repeats,
    )
    result.update(platform=jax.devices()[0].platform, devices=len(jax.devices()),
                  experts=args.experts, k=args.k, d_model=args.d_model, d_ff=args.d_ff,
                  repeats=args.repeats, jax=jax.__version__,
                  command=env.command("calibrate.py", argv))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
