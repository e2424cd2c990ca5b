"""Model-level costs outside the MoE layer, as A/Bs on emulated CPU devices.

* ``prefill``: the prefill program computing logits for the last position only (what
  ``models.generation`` runs) against every position (the model's default,
  ``logits_to_keep=0``): time to first token and XLA's temporary buffer bytes per device.
* ``sampling`` (``--sampling-batch N``): the decode step of ``generate`` with temperature,
  top-k and top-p settings against greedy, in one process (median step of ``--new-tokens``).
* ``mla`` (``--mla-contexts L ...``, MLA checkpoints only): the decode step with attention in
  the absorbed form (over the latent cache) against the expanded one (keys and values expanded
  from the cache every step), at caches of ``L`` rows, in one process.
* ``step``: the decode step with dense projections padded to ``DENSE_MIN_ROWS`` rows per device
  (``moe_relayfree.experts.dense_dot``) against unpadded (``DENSE_MIN_ROWS = 1``): at one token
  per device XLA:CPU runs a bf16 one-row dot as a matrix-vector product that widens the whole
  matrix to f32 on every call. Each variant runs ``generate`` in a fresh process, as
  ``scripts/infer.py`` does (median decode step of ``--new-tokens``), see ``child_step``.

Variants alternate, order swapped every round; the ratio is the median over rounds of
variant / baseline in the same round. ``same_tokens`` says whether both generated the same
greedy tokens; it is reported, not required: a dot over more rows may add in another order, and
with random prompts (near ties) one ulp can change a token. Writes ``generation.json`` and
``generation.md`` to ``--out`` (``moe_relayfree.tools.bench.generation``).

    python scripts/bench_generation.py --checkpoint models/default --batches 1 8 16
    python scripts/make_random_checkpoint.py --vocab 151936 --out /tmp/moe64v
    python scripts/bench_generation.py --checkpoint /tmp/moe64v --prompt-lengths 256 1024
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
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=32, help="decode steps per run (step A/B)")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--out", default=os.path.join(ROOT, "results", "generation"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    env.emulate_cpu_devices(a.devices)
    from moe_relayfree.tools.bench import generation

    generation.run(a, env.command("bench_generation.py", argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
