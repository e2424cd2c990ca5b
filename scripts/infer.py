"""End-to-end MoE inference with relay-free expert parallelism, on the serving engine
(continuous batching over a paged KV cache: the path ``scripts/serve.py`` serves with).

    python scripts/infer.py                                  # built-in default model, 8 CPU devices
    python scripts/infer.py --checkpoint DIR --prompt "def " --max-new-tokens 64
    python scripts/infer.py --dispatch ragged-baseline --json
    python scripts/infer.py --mesh data=2,ep=4                # tokens over both axes, experts over ep
    python scripts/infer.py --mesh data=2,ep=2,tp=2 --tensor-axis tp
    python scripts/infer.py --devices 4 --coordinator HOST:PORT --num-processes 2 --process-id I

Greedy by default (``--temperature``, ``--top-k``, ``--top-p``, ``--seed`` sample; request
``i`` draws with seed ``--seed + i``); a request stops at the checkpoint's EOS ids
(``--ignore-eos``: always ``--max-new-tokens``). ``--chat`` sends each prompt through the
checkpoint's chat template as a user message. Every prompt is submitted at once; the engine
prefills them (whole, one chunk each) and decodes. Reports time to first token (median over
the requests), time per output token (median decode step), tokens/s, and the engine's steps
per MoE schedule. Every step shape is compiled (and timed) before.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

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
    p.add_argument("--chat", action="store_true",
                   help="each prompt as a user message through the checkpoint's chat template "
                        "(as /v1/chat/completions renders it)")
    p.add_argument("--system", default=None, help="with --chat: a system message first")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="with --chat: this Jinja template instead of the checkpoint's")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p.parse_args(argv)


def chat_prompts(args, tok, texts: list[str]) -> list[list[int]]:
    """Each text as a user message (after ``--system``, if given) through the chat template,
    encoded as the server encodes a chat: no special tokens added to the template's own."""
    from moe_relayfree_models.serving.chat import ChatTemplate

    template = ChatTemplate.from_folder(args.checkpoint, args.chat_template)
    if template is None:
        raise ValueError(f"{args.checkpoint} ships no chat template; pass --chat-template FILE")
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    return [template.prompt_ids(tok, system + [{"role": "user", "content": t}]) for t in texts]


def main(argv=None) -> int:
    args = parse_args(argv)
    cache_dir = start_process(args)
    import jax
    import numpy as np

    import moe_relayfree as mr
    from moe_relayfree_models import generation
    from moe_relayfree_models.serving.engine import Engine, EngineConfig
    from moe_relayfree_models.serving.offline import complete
    from moe_relayfree_models.serving.scheduler import SamplingParams

    try:
        sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
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
    try:
        prompts = chat_prompts(args, tok, texts) if args.chat else [tok.encode(t) for t in texts]
    except (OSError, ValueError) as e:
        print(f"--chat: {e}", file=sys.stderr)
        return 2
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
    longest = max(len(p) for p in prompts)
    # sized for this batch: a slot per prompt, each prompt prefilled whole in one step
    chunk = 1 << (longest - 1).bit_length()
    engine = Engine(model, EngineConfig(
        max_seqs=len(prompts), max_step_tokens=max(chunk, len(prompts) * longest), chunk=chunk,
        page_size=32, max_model_len=min(cfg.max_position, longest + args.max_new_tokens)))
    if jax.process_index() != 0:  # process 0 schedules every step; this one runs them
        engine.follow()
        return 0
    start = time.perf_counter()
    engine.warm_up()
    compile_s = time.perf_counter() - start

    # progress only where a person watches: a redirected log gets no carriage returns
    show = not args.quiet and jax.process_index() == 0 and sys.stderr.isatty()

    def progress(done, total):
        if show:
            print(f"\rdecode {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    stop_ids = () if args.ignore_eos else generation.stop_token_ids(args.checkpoint, tok)
    try:
        result = complete(engine, prompts, args.max_new_tokens, sampling, stop_ids, progress)
    finally:
        engine.close()
    if max(len(t) for t in result["tokens"]) < args.max_new_tokens:  # every row stopped early
        progress(args.max_new_tokens, args.max_new_tokens)
    steps = result["decode_step_s"]
    tpot = float(np.median(steps)) if steps else float("nan")
    batch = len(prompts)
    # what the MoE layers ran, as they decided it (mr.resolve: the one place the choice is made)
    prefill_run = mr.resolve(model.dispatch, result["prefill_rows"], model.cfg.k)
    decode_run = mr.resolve(model.dispatch, result["decode_rows"] or batch, model.cfg.k)
    report = {
        "checkpoint": os.path.relpath(args.checkpoint, ROOT) if args.checkpoint.startswith(ROOT) else args.checkpoint,
        "platform": devices[0].platform, "devices": len(devices), "dispatch": args.dispatch,
        "mesh": dict(mesh.shape), "expert_axis": lay.axis, "batch_axes": list(lay.batch_axes),
        "tensor_axis": lay.tensor_axis, "dtype": np.dtype(model.compute_dtype).name,
        "experts": "fp8" if model.cfg.expert_fp8_block else np.dtype(model.compute_dtype).name,
        "batch": batch, "prompt_tokens": longest, "new_tokens": args.max_new_tokens,
        "chat": args.chat,
        # a baseline has no schedule: it ignores --schedule
        "prefill_schedule": prefill_run.schedule, "decode_schedule": decode_run.schedule,
        "prefill_path": prefill_run.path, "decode_path": decode_run.path,
        "decode_transport": decode_run.transport,
        "ttft_ms": 1e3 * float(np.median(result["ttft_s"])), "tpot_ms": 1e3 * tpot,
        "decode_tokens_per_s": batch / tpot if tpot == tpot else None,
        "compile_s": compile_s, "compile_cache": cache_dir,
        "sampling": {k: getattr(sampling, k) for k in ("temperature", "top_k", "top_p")},
        "seed": args.seed, "stop_ids": list(stop_ids),
        "decode_steps": len(steps), "engine_steps": result["steps"],
        "outputs": [{"prompt": t, "completion": tok.decode(g), "new_tokens": len(g), "finish_reason": why}
                    for t, g, why in zip(texts, result["tokens"], result["finish_reasons"])],
    }
    report["processes"] = jax.process_count()
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
