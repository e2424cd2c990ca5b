"""Model-level costs outside the MoE layer, as A/Bs on emulated CPU devices: prefill logits of
the last position only against all, sampling settings against greedy, MLA's absorbed against
expanded decode step, FP8 experts kept on the devices against dequantized at load, padded
against unpadded dense rows at one token per device (what each
measures and how: ``moe_relayfree_models.tools.bench.generation``). Writes ``generation.json`` and
``generation.md`` to ``--out``.

    python scripts/bench_generation.py --checkpoint models/default --batches 1 8 16
    python scripts/make_random_checkpoint.py --vocab 151936 --out /tmp/moe64v
    python scripts/bench_generation.py --checkpoint /tmp/moe64v --prompt-lengths 256 1024
    python scripts/bench_generation.py --batches --prompt-lengths --fp8-batches 1 8 64
"""

from __future__ import annotations

import argparse
import os
import sys

from moe_relayfree.tools.bench import env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", help="repeatable (default: the built-in model)")
    p.add_argument("--batches", type=int, nargs="*", default=[1, 8, 16], help="decode-step batches")
    p.add_argument("--prompt-lengths", type=int, nargs="*", default=[256], help="prefill, batch 8")
    p.add_argument("--sampling-batch", type=int, default=None,
                   help="also time a decode step per sampling setting against greedy at this batch")
    p.add_argument("--mla-contexts", type=int, nargs="*", default=[],
                   help="MLA checkpoints: decode step absorbed / expanded at these cache lengths")
    p.add_argument("--fp8-batches", type=int, nargs="*", default=[],
                   help="also time the checkpoint quantized to FP8, experts kept FP8 against "
                   "dequantized at load: the decode step at these batches, and one prefill")
    p.add_argument("--fp8-prompt", type=int, default=256, help="the FP8 A/B's prefill length")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=32, help="decode steps per run (step A/B)")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--out", default=os.path.join(ROOT, "results", "generation"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    env.emulate_cpu_devices(a.devices)
    from moe_relayfree_models.tools.bench import generation

    generation.run(a, env.command("bench_generation.py", argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
