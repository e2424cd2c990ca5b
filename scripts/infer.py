"""End-to-end MoE inference with relay-free expert parallelism: batched prefill, then decode.

    python scripts/infer.py                                  # built-in default model, 8 CPU devices
    python scripts/infer.py --checkpoint DIR --prompt "def " --max-new-tokens 64
    python scripts/infer.py --dispatch ragged-baseline --json
    python scripts/infer.py --mesh data=2,ep=4                # tokens over both axes, experts over ep
    python scripts/infer.py --mesh data=2,ep=2,tp=2 --tensor-axis tp
    python scripts/infer.py --devices 4 --coordinator HOST:PORT --num-processes 2 --process-id I

Greedy by default (``--temperature``, ``--top-k``, ``--top-p``, ``--seed`` sample); a row stops
at the checkpoint's EOS ids (``--ignore-eos``: always ``--max-new-tokens``). Reports time to
first token (prefill + first token), time per output token (median decode step), tokens/s and
the schedule each phase used. Compilation is done (and timed) before.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from moe_relayfree_models.cli import (SetupError, add_model_args, load, positive_int, prepare,
                                      start_process)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PROMPTS = ["Return the number of ", "This function ", "Raise ValueError if "]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--prompt", action="append", help="repeatable; default: three short prompts")
    p.add_argument("--batch", type=positive_int, default=None,
                   help="sequences: the prompts repeated (or cut) to this many (default: one per prompt)")
    p.add_argument("--max-new-tokens", type=positive_int, default=48,
                   help="tokens to generate per sequence, the first one included (default 48)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--ignore-eos", action="store_true",
                   help="always generate --max-new-tokens (no stop at the checkpoint's EOS ids)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cache_dir = start_process(args)
    import jax
    import numpy as np

    import moe_relayfree as mr
    from moe_relayfree_models import generation

    try:
        sampling = generation.Sampling(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        print(f"sampling: {e}", file=sys.stderr)
        return 2
    devices = jax.devices()
    try:
        cfg, tok, dispatch = prepare(args)
    except SetupError as e:
        print(e, file=sys.stderr)
        return 2
    mesh, lay = dispatch.mesh, dispatch.layout
    texts = args.prompt or DEFAULT_PROMPTS
    if args.batch is not None:
        texts = [texts[i % len(texts)] for i in range(args.batch)]
    prompts = [tok.encode(t) for t in texts]
    try:
        generation.check_context(cfg, max(len(p) for p in prompts), args.max_new_tokens)
    except ValueError as e:
        print(f"--prompt/--max-new-tokens: {e}", file=sys.stderr)
        return 2
    try:
        model = load(args, dispatch)
    except SetupError as e:
        print(e, file=sys.stderr)
        return 2

    # progress only where a person watches: a redirected log gets no carriage returns
    show = not args.quiet and jax.process_index() == 0 and sys.stderr.isatty()

    def progress(done, total):
        if show:
            print(f"\rdecode {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    stop_ids = () if args.ignore_eos else generation.stop_token_ids(args.checkpoint, tok)
    result = generation.generate(model, prompts, args.max_new_tokens, sampling=sampling,
                                 seed=args.seed, stop_ids=stop_ids, progress=progress)
    if len(result["step_s"]) < args.max_new_tokens - 1:  # every row stopped early
        progress(args.max_new_tokens, args.max_new_tokens)
    tpot = float(np.median(result["step_s"])) if result["step_s"] else float("nan")
    batch = len(prompts)
    # what the MoE layers ran, as they decided it (mr.resolve: the one place the choice is made)
    prefill_run = mr.resolve(model.dispatch, batch * result["prompt_width"], model.cfg.k)
    decode_run = mr.resolve(model.dispatch, batch, model.cfg.k)
    report = {
        "checkpoint": os.path.relpath(args.checkpoint, ROOT) if args.checkpoint.startswith(ROOT) else args.checkpoint,
        "platform": devices[0].platform, "devices": len(devices), "dispatch": args.dispatch,
        "mesh": dict(mesh.shape), "expert_axis": lay.axis, "batch_axes": list(lay.batch_axes),
        "tensor_axis": lay.tensor_axis, "dtype": np.dtype(model.compute_dtype).name,
        "experts": "fp8" if model.cfg.expert_fp8_block else np.dtype(model.compute_dtype).name,
        "batch": batch, "prompt_tokens": result["prompt_width"], "new_tokens": args.max_new_tokens,
        # a baseline has no schedule: it ignores --schedule
        "prefill_schedule": prefill_run.schedule, "decode_schedule": decode_run.schedule,
        "prefill_path": prefill_run.path, "decode_path": decode_run.path,
        "decode_transport": decode_run.transport,
        "ttft_ms": 1e3 * result["ttft_s"], "tpot_ms": 1e3 * tpot,
        "decode_tokens_per_s": batch / tpot if tpot == tpot else None,
        "compile_s": result["compile_s"], "compile_cache": cache_dir,
        "sampling": dataclasses.asdict(sampling), "seed": args.seed, "stop_ids": list(stop_ids),
        "decode_steps": len(result["step_s"]),
        "outputs": [{"prompt": t, "completion": tok.decode(g), "new_tokens": len(g), "finish_reason": why}
                    for t, g, why in zip(texts, result["tokens"], result["finish_reasons"])],
    }
    report["processes"] = jax.process_count()
    if jax.process_index() != 0:  # every process computes the same tokens; one reports
        return 0
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for o in report["outputs"]:
        print(f"--- {o['prompt']!r} ({o['new_tokens']} tokens, {o['finish_reason']})\n"
              f"{o['prompt']}{o['completion']}")
    mesh_text = ",".join(f"{a}={n}" for a, n in report["mesh"].items())
    print(f"\n{report['devices']} {report['platform']} devices (mesh {mesh_text}), dispatch={args.dispatch}, "
          f"{report['dtype']}, batch={batch}, "
          f"prompt={report['prompt_tokens']} tokens, new={args.max_new_tokens}")
    sched = {p: report[f"{p}_schedule"] or f"n/a ({args.dispatch})" for p in ("prefill", "decode")}
    print(f"prefill: schedule={sched['prefill']}, time to first token {report['ttft_ms']:.1f} ms")
    print(f"decode:  schedule={sched['decode']}, time per output token {report['tpot_ms']:.1f} ms "
          f"(median), {report['decode_tokens_per_s']:.1f} tokens/s; compile {report['compile_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
