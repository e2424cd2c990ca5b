"""Trains the small built-in default model on Python's own docstrings and saves it.

The corpus is the docstrings of a fixed list of standard-library modules (every machine with
Python has them). The model is a Qwen3-MoE-style byte-level decoder (one dense layer, then MoE
layers with 8 experts, top-2), trained with optax AdamW through the relay-free MoE layer, and
saved as a Hugging Face folder (``config.json`` + ``model.safetensors``, bf16).

    python scripts/train_default.py [--steps 1500] [--out models/default]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODULES = ["abc", "argparse", "base64", "bisect", "calendar", "collections", "contextlib", "copy",
           "csv", "dataclasses", "datetime", "decimal", "difflib", "enum", "fractions", "functools",
           "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http.client", "inspect", "io",
           "ipaddress", "itertools", "json", "logging", "math", "mimetypes", "operator", "os",
           "os.path", "pathlib", "pickle", "pprint", "queue", "random", "re", "sched", "secrets",
           "shlex", "shutil", "socket", "statistics", "string", "struct", "subprocess", "tarfile",
           "tempfile", "textwrap", "threading", "time", "timeit", "traceback", "types", "typing",
           "unittest", "urllib.parse", "uuid", "warnings", "weakref", "zipfile", "zlib"]


def docstring_corpus() -> str:
    """Docstrings of the modules above and their public members, deduplicated, in fixed order."""
    seen, parts = set(), []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        objs = [module] + [getattr(module, a) for a in sorted(dir(module)) if not a.startswith("_")]
        for obj in objs:
            doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or callable(obj)) else None
            if doc and len(doc) > 40 and doc not in seen and doc.isascii():
                seen.add(doc)
                parts.append(doc)
    return "\n\n".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(ROOT, "models", "default"))
    args = p.parse_args(argv)

    import jax.numpy as jnp
    import ml_dtypes
    import numpy as np
    import optax
    from flax import nnx

    from safetensors.numpy import save_file

    from moe_relayfree_models import checkpoint, tokenizer
    from moe_relayfree_models.config import ModelConfig
    from moe_relayfree_models.hf_config import to_hf_config
    from moe_relayfree_models.transformer import MoETransformer, init_cache
    from moe_relayfree import make_ep_mesh

    cfg = ModelConfig(
        arch="qwen3_moe", vocab_size=tokenizer.VOCAB_SIZE, d_model=128, n_layers=4, n_heads=4,
        n_kv_heads=2, head_dim=32, d_ff=256, num_experts=8, k=2, d_ff_expert=128,
        moe_layers=(False, True, True, True), qk_norm="head", max_position=1024,
    )
    corpus = np.frombuffer(docstring_corpus().encode(), dtype=np.uint8).astype(np.int32)
    print(f"corpus: {corpus.size} bytes from {len(MODULES)} modules", flush=True)
    mesh = make_ep_mesh(1)
    model = MoETransformer(cfg, mesh=mesh, rngs=nnx.Rngs(args.seed))
    warmup = min(100, args.steps // 10)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, args.steps, args.lr * 0.05)
    opt = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0),
                                           optax.adamw(schedule, weight_decay=0.01)), wrt=nnx.Param)
    pad = jnp.zeros((args.batch,), jnp.int32)

    @nnx.jit
    def train_step(model, opt, batch):
        def loss_fn(m):
            cache = init_cache(cfg, batch.shape[0], batch.shape[1] - 1, jnp.float32)
            logits, _ = m(batch[:, :-1], pad, cache, 0)
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    rng = np.random.default_rng(args.seed)
    start, losses = time.time(), []
    for step in range(args.steps):
        offs = rng.integers(0, corpus.size - args.seq - 1, size=args.batch)
        batch = np.stack([corpus[o : o + args.seq + 1] for o in offs])
        losses.append(float(train_step(model, opt, jnp.asarray(batch))))
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}/{args.steps} loss {np.mean(losses[-100:]):.3f} "
                  f"({time.time() - start:.0f} s)", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w") as fh:
        json.dump(to_hf_config(cfg), fh, indent=1)
    tensors = checkpoint.export_tensors(model, dtype=ml_dtypes.bfloat16)
    save_file(tensors, os.path.join(args.out, "model.safetensors"),
              metadata={"trained_by": "scripts/train_default.py", "steps": str(args.steps),
                        "final_loss": f"{np.mean(losses[-100:]):.4f}"})
    print(f"saved {args.out} (final loss {np.mean(losses[-100:]):.3f} nats/byte)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
