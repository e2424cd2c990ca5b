"""Serving-level sweep: TTFT and TPOT over batch sizes and prompt lengths, per dispatch path,
and the largest batch that meets a TPOT target (the "feasible scheduling space"); how it is
measured: ``moe_relayfree_models.tools.bench.serving``.

    python scripts/sweep.py [--quick] [--checkpoint DIR] [--tpot-target-ms X] [--out results/sweep]
    python scripts/sweep.py --mesh data=2,ep=4 [--tensor-axis NAME] [--expert-axis NAME]
    python scripts/sweep.py --dispatch relayfree allgather-baseline   (default: every dropless path)

Writes ``sweep.json``, ``sweep.md`` and ``sweep.png``.
"""

from __future__ import annotations

import argparse
import os
import sys

from moe_relayfree.tools.bench import env, report
from moe_relayfree_models.cli import DEFAULT_CHECKPOINT, DROPLESS, add_mesh_args, mesh_from_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    p.add_argument("--devices", type=int, default=8)
    add_mesh_args(p)
    p.add_argument("--dispatch", nargs="+", choices=sorted(DROPLESS), default=sorted(DROPLESS),
                   help="dispatch paths to compare (relay-free is always run: the ratios are to it)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batches", type=int, nargs="+", default=None)
    p.add_argument("--prompt-lengths", type=int, nargs="+", default=None)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds per point")
    p.add_argument("--tpot-target-ms", type=float, default=None)
    p.add_argument("--out", default=os.path.join(ROOT, "results", "sweep"))
    args = p.parse_args(argv)
    if not set(args.dispatch) - {"relayfree"}:
        p.error("--dispatch: name at least one baseline to compare relay-free with")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    env.emulate_cpu_devices(args.devices)
    import jax
    import numpy as np

    from moe_relayfree_models.tools.bench import serving
    from moe_relayfree_models import checkpoint, tokenizer

    batches = args.batches or ([1, 4, 16] if args.quick else [1, 4, 16, 64, 96, 128, 192, 256, 512])
    lengths = args.prompt_lengths or ([16, 64] if args.quick else [16, 64, 256, 1024])
    base_len, base_batch = lengths[0], 8 if not args.quick else 4
    try:
        mesh, lay = mesh_from_args(args, len(jax.devices()))
    except ValueError as e:
        print(f"--mesh: {e}", file=sys.stderr)
        return 2
    names = ["relayfree"] + [n for n in DROPLESS if n in args.dispatch and n != "relayfree"]
    models = {name: checkpoint.load_model(args.checkpoint, mesh=mesh, axis=args.expert_axis,
                                          tensor_axis=args.tensor_axis, implementation=DROPLESS[name])
              for name in names}
    # Timing does not depend on the text; the byte-level default model gets its BOS.
    bos = [tokenizer.BOS] if next(iter(models.values())).cfg.vocab_size == tokenizer.VOCAB_SIZE else []
    rng = np.random.default_rng(0)
    rows = []
    for batch, length in [(b, base_len) for b in batches] + [(base_batch, n) for n in lengths[1:]]:
        prompts = [bos + rng.integers(32, 127, size=length - len(bos)).tolist() for _ in range(batch)]
        rows += serving.measure_point(models, prompts, args.new_tokens, args.repeats,
                                      lay.num_token_shards)
    out = dict(checkpoint=os.path.relpath(args.checkpoint, ROOT), devices=len(jax.devices()),
               platform=jax.devices()[0].platform, new_tokens=args.new_tokens,
               repeats=args.repeats, **serving.summarize(rows, base_len, batches[0], args.tpot_target_ms),
               mesh=dict(mesh.shape), expert_axis=lay.axis, tensor_axis=lay.tensor_axis,
               rows=rows, command=env.command("sweep.py", argv))
    paths = report.write(args.out, "sweep", out, serving.markdown(out))
    if serving.plot(out, os.path.join(args.out, "sweep.png"), base_len, base_batch):
        paths.append(os.path.join(args.out, "sweep.png"))
    print(f"feasible batch at TPOT <= {out['tpot_target_ms']:.1f} ms: {out['feasible_batch']}; "
          "wrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
