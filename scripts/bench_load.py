"""Checkpoint loading at size: peak host memory and time, against a plain safetensors read.

Writes a synthetic Qwen3-MoE checkpoint of ``--gb`` GB (bf16, several ``*.safetensors`` files
and ``model.safetensors.index.json``, written with the safetensors package into a temporary
folder), then in fresh subprocesses, alternating, ``--repeats`` times each:

* ``load``: ``moe_relayfree_models.checkpoint.load_model`` on 8 emulated CPU devices, the model kept in bf16;
* ``plain``: the safetensors package reading every tensor of the same files into numpy
  (``safe_open(...).get_tensor``), the floor for reading these bytes.

Each child reports its peak RSS above its own baseline (measured after imports and mesh set-up,
just before reading) and its wall time. Writes ``load.json`` and ``load.md`` to ``--out`` (``moe_relayfree_models.tools.bench.loading``).

    python scripts/bench_load.py                 # 2 GB, about 3 minutes on 2 cores
    python scripts/bench_load.py --gb 0.05 --repeats 1 --out /tmp/l    # seconds
    python scripts/bench_load.py --fp8 --out results/load/fp8   # a block-quantized FP8 twin

``--fp8``: every ``*_proj`` weight stored as ``float8_e4m3fn`` with 128x128 block scales (as
DeepSeek-V3's and Qwen3's FP8 checkpoints), loaded dequantized to bf16; the ratio that matters
is then peak RSS over the *loaded* (bf16) model's bytes.
"""

from __future__ import annotations

import argparse
import os
import sys

from moe_relayfree.tools.bench import env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=2.0, help="checkpoint size to write")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--fp8", action="store_true", help="write the checkpoint block-quantized FP8")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "load"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    from moe_relayfree_models.tools.bench import loading

    loading.run(a, env.command("bench_load.py", argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
