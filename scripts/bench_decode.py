"""Decode-sized MoE layers: time on emulated CPU devices, bytes per rank at large P.

Two parts, one JSON + markdown report (``--out``, default ``results/decode``;
``moe_relayfree.tools.bench.decode`` says what each measures):

* ``layer``: whole-layer time at decode sizes (P=8, k=8, d=1024) of the relay-free schedules,
  "auto" and the baselines that drop nothing, interleaved rounds until each case has run
  ``--seconds``; ratios are medians of per-round ratios with bootstrap 95% intervals.
* ``bytes``: bytes each collective moves per rank, lowered for ``cuda`` at P = 8..64 with
  DeepSeek-V3 shapes (a subprocess with 64 emulated devices).

    python scripts/bench_decode.py                 # both parts (about 15 min on 2 cores)
    python scripts/bench_decode.py --part bytes    # seconds
    python scripts/bench_decode.py --smoke --out /tmp/d   # tiny, for the tests
"""

from __future__ import annotations

import argparse
import os
import sys

from moe_relayfree.tools.bench import env


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
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    env.emulate_cpu_devices(a.devices)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from moe_relayfree.tools.bench import decode, report

    out = {"mode": "smoke" if a.smoke else "full", "machine": env.machine(), "jax": jax.__version__,
           "command": env.command("bench_decode.py", argv)}
    if a.part in ("all", "layer"):
        seconds = a.seconds if a.seconds is not None else (0.0 if a.smoke else 75.0)
        out["layer"] = decode.layer_part(a.smoke, a.rounds or (2 if a.smoke else 9), a.experts,
                                         a.tokens, seconds)
    if a.part in ("all", "bytes"):
        out["bytes"] = decode.bytes_in_subprocess(a.smoke, a.out)
    paths = report.write(a.out, "decode", out, decode.markdown(out))
    print("wrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
