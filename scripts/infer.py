"""End-to-end MoE inference with relay-free expert parallelism: batched prefill, then decode.

    python scripts/infer.py                                  # built-in default model, 8 CPU devices
    python scripts/infer.py --checkpoint DIR --prompt "def " --max-new-tokens 64
    python scripts/infer.py --dispatch ragged-baseline --json
    python scripts/infer.py --mesh data=2,ep=4                # tokens over both axes, experts over ep
    python scripts/infer.py --mesh data=2,ep=2,tp=2 --tensor-axis tp
    python scripts/infer.py --devices 4 --coordinator HOST:PORT --num-processes 2 --process-id I

Reports time to first token (prefill + first sampled token), time per output token (decode
steps), tokens/s and the schedule each phase used. Compilation is done (and timed) before.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CHECKPOINT = os.path.join(ROOT, "models", "default")
DISPATCH = {"relayfree": "relayfree", "ragged-baseline": "ragged_baseline",
            "capacity-baseline": "capacity_baseline"}
DEFAULT_PROMPTS = ["Return the number of ", "This function ", "Raise ValueError if "]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="Hugging Face folder")
    p.add_argument("--devices", type=int, default=8, help="emulated CPU devices (CPU only)")
    add_mesh_args(p)
    p.add_argument("--prompt", action="append", help="repeatable; default: three short prompts")
    p.add_argument("--batch", type=int, default=None, help="repeat prompts up to this batch size")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--dispatch", choices=sorted(DISPATCH), default="relayfree")
    p.add_argument("--schedule", choices=["auto", "prefill", "decode"], default="auto")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="parameter dtype, which the activations and KV cache follow "
                   "(default: the checkpoint's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--coordinator", help="HOST:PORT of process 0, to run over several processes")
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    return p.parse_args(argv)


def add_mesh_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mesh", default=None,
                   help="mesh axes as NAME=SIZE,... in order (default: ep=<all devices>)")
    p.add_argument("--expert-axis", default="ep", help="the mesh axis experts are split over")
    p.add_argument("--tensor-axis", default=None,
                   help="optional mesh axis splitting each expert's hidden width")


def mesh_from_args(args, num_devices: int):
    """(mesh, layout) from ``--mesh/--expert-axis/--tensor-axis``; ValueError names the problem."""
    import moe_relayfree as mr

    mesh = mr.make_mesh(mr.parse_mesh(args.mesh) if args.mesh else {args.expert_axis: num_devices})
    return mesh, mr.make_layout(mesh, args.expert_axis, tensor_axis=args.tensor_axis)


def setup_devices(count: int) -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}"
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)


_PROGRAMS = {}


def _programs():
    """The jitted prefill and decode step over ``(graphdef, state)``, made once so repeated
    generate calls reuse their compiled programs (jit caches per model structure and shapes).

    Plain ``jax.jit`` on the split model, not ``nnx.jit`` on the module: nnx.jit walks and
    re-flattens the module graph in Python on every call, which made the default model's decode
    step 1.45-1.7x as long (6-7 ms of Python per step; docs/benchmarks.md). The KV cache is
    donated: each call writes the updated cache into the buffers it was given (3-6% of a step).
    """
    if not _PROGRAMS:
        import functools

        import jax
        import jax.numpy as jnp
        from flax import nnx

        @functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
        def prefill(graphdef, state, tokens, pad, cache):
            logits, cache = nnx.merge(graphdef, state)(tokens, pad, cache, 0)
            return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

        @functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
        def step(graphdef, state, token, pad, cache, position):
            logits, cache = nnx.merge(graphdef, state)(token[:, None], pad, cache, position)
            return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

        _PROGRAMS.update(prefill=prefill, step=step)
    return _PROGRAMS["prefill"], _PROGRAMS["step"]


def generate(model, prompts: list[list[int]], max_new_tokens: int, *, progress=None) -> dict:
    """Greedy batched generation. Returns tokens per row and timings (seconds)."""
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from models.transformer import init_cache

    batch = len(prompts)
    width = max(len(p) for p in prompts)
    pad = jnp.asarray([width - len(p) for p in prompts], jnp.int32)
    tokens = jnp.asarray([[0] * (width - len(p)) + p for p in prompts], jnp.int32)
    length = width + max_new_tokens
    prefill_fn, step_fn = _programs()
    graphdef, state = nnx.split(model)
    prefill = functools.partial(prefill_fn, graphdef, state)
    step = functools.partial(step_fn, graphdef, state)

    def fresh_cache():
        return init_cache(model.cfg, batch, length, model.compute_dtype)

    start = time.perf_counter()  # compile both programs (and warm up) before timing
    warm, cache = prefill(tokens, pad, fresh_cache())
    jax.block_until_ready(step(warm, pad, cache, jnp.int32(width)))
    compile_s = time.perf_counter() - start

    start = time.perf_counter()
    token, cache = prefill(tokens, pad, fresh_cache())
    token.block_until_ready()
    ttft = time.perf_counter() - start
    out = [token]
    step_times = []
    for i in range(max_new_tokens - 1):
        t0 = time.perf_counter()
        token, cache = step(token, pad, cache, jnp.int32(width + i))
        token.block_until_ready()
        step_times.append(time.perf_counter() - t0)
        out.append(token)
        if progress:
            progress(i + 2, max_new_tokens)
    generated = jax.device_get(jnp.stack(out, axis=1))
    return {"tokens": generated.tolist(), "ttft_s": ttft, "step_s": step_times,
            "compile_s": compile_s, "prompt_width": width}


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_devices(args.devices)
    import jax
    import numpy as np

    import moe_relayfree as mr
    from models import checkpoint, tokenizer

    if args.coordinator:
        mr.distributed.initialize(args.coordinator, args.num_processes, args.process_id)

    if not os.path.exists(os.path.join(args.checkpoint, "config.json")):
        print(f"no checkpoint at {args.checkpoint}; train the default one with "
              "`python scripts/train_default.py` or pass --checkpoint DIR", file=sys.stderr)
        return 2
    devices = jax.devices()
    try:
        mesh, lay = mesh_from_args(args, len(devices))
    except ValueError as e:
        print(f"--mesh: {e}", file=sys.stderr)
        return 2
    model = checkpoint.load_model(args.checkpoint, mesh=mesh, axis=args.expert_axis,
                                  tensor_axis=args.tensor_axis, schedule=args.schedule,
                                  implementation=DISPATCH[args.dispatch], dtype=args.dtype)
    # Prompts are encoded as the checkpoint's tokenizer says (config.json's bos_token_id
    # is not a promise that the tokenizer adds it; Qwen's and OLMoE's do not).
    tok = tokenizer.load_tokenizer(args.checkpoint, model.cfg.vocab_size)
    texts = args.prompt or DEFAULT_PROMPTS
    if args.batch:
        texts = [texts[i % len(texts)] for i in range(args.batch)]
    prompts = [tok.encode(t) for t in texts]

    def progress(done, total):
        if not args.quiet and jax.process_index() == 0:
            print(f"\rdecode {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    result = generate(model, prompts, args.max_new_tokens, progress=progress)
    tpot = float(np.median(result["step_s"])) if result["step_s"] else float("nan")
    batch = len(prompts)
    shards = lay.num_token_shards  # tokens per device = tokens / shards (MoELayer pads up)
    report = {
        "checkpoint": os.path.relpath(args.checkpoint, ROOT) if args.checkpoint.startswith(ROOT) else args.checkpoint,
        "platform": devices[0].platform, "devices": len(devices), "dispatch": args.dispatch,
        "mesh": dict(mesh.shape), "expert_axis": lay.axis, "batch_axes": list(lay.batch_axes),
        "tensor_axis": lay.tensor_axis, "dtype": np.dtype(model.compute_dtype).name,
        "batch": batch, "prompt_tokens": result["prompt_width"], "new_tokens": args.max_new_tokens,
        "prefill_schedule": mr.select_schedule(-(-batch * result["prompt_width"] // shards), args.schedule),
        "decode_schedule": mr.select_schedule(-(-batch // shards), args.schedule),
        "ttft_ms": 1e3 * result["ttft_s"], "tpot_ms": 1e3 * tpot,
        "decode_tokens_per_s": batch / tpot if tpot == tpot else None,
        "compile_s": result["compile_s"],
        "outputs": [{"prompt": t, "completion": tok.decode(g)} for t, g in zip(texts, result["tokens"])],
    }
    report["processes"] = jax.process_count()
    if jax.process_index() != 0:  # every process computes the same tokens; one reports
        return 0
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for o in report["outputs"]:
        print(f"--- {o['prompt']!r}\n{o['prompt']}{o['completion']}")
    mesh_text = ",".join(f"{a}={n}" for a, n in report["mesh"].items())
    print(f"\n{report['devices']} {report['platform']} devices (mesh {mesh_text}), dispatch={args.dispatch}, "
          f"{report['dtype']}, batch={batch}, "
          f"prompt={report['prompt_tokens']} tokens, new={args.max_new_tokens}")
    print(f"prefill: schedule={report['prefill_schedule']}, time to first token {report['ttft_ms']:.1f} ms")
    print(f"decode:  schedule={report['decode_schedule']}, time per output token {report['tpot_ms']:.1f} ms "
          f"(median), {report['decode_tokens_per_s']:.1f} tokens/s; compile {report['compile_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
