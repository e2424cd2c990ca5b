"""Checkpoint loading at size: peak host memory and time, against a plain safetensors read.

A synthetic Qwen3-MoE checkpoint (:func:`shapes`, :func:`write_checkpoint`) is read in fresh
processes (:func:`child`, alternating): ``load`` is ``moe_relayfree_models.checkpoint.load_model``
on emulated CPU devices, ``plain`` the safetensors package reading every tensor into numpy
(``safe_open(...).get_tensor``; raw FP8 bytes through the index), the floor for reading these
bytes. Peak RSS is Linux's ``VmHWM`` above each child's baseline. The command:
``scripts/bench_load.py``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from moe_relayfree.tools.bench.report import write


def shapes(gb: float) -> dict:
    """A Qwen3-MoE config whose bf16 weights total about ``gb`` GB, experts dominating as in the
    real models (d=1024, 64 experts of f=512, top-8; layers set the size)."""
    d, e, f, vocab, heads, kv, hd = 1024, 64, 512, 32000, 16, 4, 64
    per_layer = 2 * (3 * e * d * f + d * (heads + 2 * kv) * hd + heads * hd * d + e * d + 2 * d + 2 * hd)
    fixed = 2 * (2 * vocab * d + d)
    layers = max(1, round((gb * 1e9 - fixed) / per_layer))
    return dict(model_type="qwen3_moe", vocab_size=vocab, hidden_size=d, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
                intermediate_size=2048, moe_intermediate_size=f, num_experts=e,
                num_experts_per_tok=8, norm_topk_prob=True, rms_norm_eps=1e-6,
                max_position_embeddings=4096, tie_word_embeddings=False, hidden_act="silu")


def write_checkpoint(folder: str, cfg: dict, layers_per_file: int = 2, fp8: bool = False) -> tuple[int, int]:
    """Random bf16 tensors under Hugging Face Qwen3-MoE names (``fp8``: the ``*_proj`` ones
    block-quantized); returns (tensor bytes written, bytes of the model as bf16)."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    d, e, f, hd = cfg["hidden_size"], cfg["num_experts"], cfg["moe_intermediate_size"], cfg["head_dim"]
    heads, kv, vocab = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]

    def t(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)

    groups = [{"model.embed_tokens.weight": t(vocab, d), "model.norm.weight": t(d), "lm_head.weight": t(vocab, d)}]
    for i in range(cfg["num_hidden_layers"]):
        if i % layers_per_file == 0:
            groups.append({})
        p = f"model.layers.{i}"
        g = groups[-1]
        g.update({f"{p}.input_layernorm.weight": t(d), f"{p}.post_attention_layernorm.weight": t(d),
                  f"{p}.self_attn.q_proj.weight": t(heads * hd, d), f"{p}.self_attn.k_proj.weight": t(kv * hd, d),
                  f"{p}.self_attn.v_proj.weight": t(kv * hd, d), f"{p}.self_attn.o_proj.weight": t(d, heads * hd),
                  f"{p}.self_attn.q_norm.weight": t(hd), f"{p}.self_attn.k_norm.weight": t(hd),
                  f"{p}.mlp.gate.weight": t(e, d)})
        for x in range(e):
            for n, shape in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))):
                g[f"{p}.mlp.experts.{x}.{n}.weight"] = t(*shape)
    weight_map, total, model_bytes = {}, 0, 0
    if fp8:
        from moe_relayfree_models import quant

        block = quant.BlockFp8((128, 128))
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                      "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    for j, g in enumerate(groups):
        model_bytes += sum(v.nbytes for v in g.values())
        if fp8:
            for k in [k for k in g if quant.quantizable(k)]:
                g[k], g[k + "_scale_inv"] = quant.quantize(g[k], block)
        name = f"model-{j + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(g, os.path.join(folder, name), metadata={"format": "pt"})
        for k, v in g.items():
            weight_map[k] = name
            total += v.nbytes
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh)
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    return total, model_bytes


def _rss_peak_bytes() -> int:
    """This process's peak RSS. Linux's VmHWM, not ``ru_maxrss``: that one survives exec, so a
    child started by a parent that held the checkpoint reported the parent's peak."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(mode: str, folder: str, devices: int) -> dict:
    """One reader (``mode``: ``load`` or ``plain``) in this process, which must not have
    started JAX: seconds and peak RSS above the baseline after imports and mesh set-up."""
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import glob

    import jax
    import ml_dtypes  # noqa: F401  (bf16 for numpy)
    import numpy as np
    from safetensors import safe_open

    import moe_relayfree as mr
    from moe_relayfree_models import checkpoint

    mesh = mr.make_ep_mesh(devices)
    jax.block_until_ready(jax.device_put(0.0))
    base = _rss_peak_bytes()
    start = time.perf_counter()
    stats = {}
    if mode == "load":
        model = checkpoint.load_model(folder, mesh=mesh, stats=stats)
        from flax import nnx

        jax.block_until_ready(nnx.state(model))
    elif os.path.exists(os.path.join(folder, "config.json")) and "quantization_config" in open(
            os.path.join(folder, "config.json")).read():
        # the safetensors package's numpy reader has no float8: the raw tensors via the index
        from moe_relayfree_models import quant
        from moe_relayfree_models.tensor_index import TensorIndex

        with open(os.path.join(folder, "config.json")) as fh:
            q = quant.parse_quantization(json.load(fh)["quantization_config"])
        index = TensorIndex(folder, q)
        held = {k: index._read(k, ()) for k in index.file}
        stats["bytes_read"] = sum(v.nbytes for v in held.values())
    else:
        held, touched = {}, 0
        for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
            with safe_open(path, framework="numpy") as fh:
                for k in fh.keys():
                    held[k] = fh.get_tensor(k)
                    # one byte per page, so a memory-mapped result is really read
                    touched += int(held[k].reshape(-1).view(np.uint8)[::4096].sum())
        stats["bytes_read"] = sum(v.nbytes for v in held.values())
    seconds = time.perf_counter() - start
    return dict(mode=mode, seconds=seconds, peak_above_baseline=_rss_peak_bytes() - base,
                baseline=base, **stats)


def run(a, command: str) -> dict:
    """Writes the checkpoint ``a`` asks for (``scripts/bench_load.py``'s arguments: ``gb``,
    ``fp8``), times both readers in ``a.repeats`` alternating pairs of fresh processes and
    writes ``load.json`` / ``load.md`` to ``a.out``."""
    import numpy as np

    cfg = shapes(a.gb)
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        total, model_bytes = write_checkpoint(folder, cfg, fp8=a.fp8)
        print(f"wrote {total / 1e9:.2f} GB ({cfg['num_hidden_layers']} layers) in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        for r in range(a.repeats):
            for mode in (("load", "plain") if r % 2 == 0 else ("plain", "load")):
                out = subprocess.run([sys.executable, "-m", __name__, mode, folder, str(a.devices)],
                                     capture_output=True, text=True, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                runs.append(row)
                print(f"  {mode:5s} {row['seconds']:6.2f} s  peak RSS above baseline "
                      f"{row['peak_above_baseline'] / 1e9:5.2f} GB "
                      f"({row['peak_above_baseline'] / model_bytes:.2f}x the loaded model)", flush=True)
    med = {m: {k: float(np.median([r[k] for r in runs if r["mode"] == m]))
               for k in ("seconds", "peak_above_baseline")} for m in ("load", "plain")}
    report = dict(checkpoint_bytes=total, model_bytes=model_bytes, config=cfg, devices=a.devices,
                  runs=runs, median=med, fp8=a.fp8,
                  load_vs_plain_seconds=med["load"]["seconds"] / med["plain"]["seconds"],
                  load_peak_vs_model=med["load"]["peak_above_baseline"] / model_bytes,
                  command=command)
    lines = [f"# Checkpoint loading ({report['command']})", "",
             f"Synthetic Qwen3-MoE, {total / 1e9:.2f} GB of tensors ({'FP8 *_proj weights with 128x128 block scales' if a.fp8 else 'bf16'}), "
             f"{model_bytes / 1e9:.2f} GB loaded (bf16), {cfg['num_hidden_layers']} layers, "
             f"{a.devices} emulated CPU devices; medians of {a.repeats} fresh processes each.", "",
             "| reader | seconds | peak RSS above baseline (GB) | x loaded model bytes |", "|---|---|---|---|"]
    for m in ("load", "plain"):
        lines.append(f"| {m} | {med[m]['seconds']:.2f} | {med[m]['peak_above_baseline'] / 1e9:.2f} "
                     f"| {med[m]['peak_above_baseline'] / model_bytes:.2f} |")
    lines += ["", f"load / plain time: {report['load_vs_plain_seconds']:.2f}x", ""]
    write(a.out, "load", report, "\n".join(lines))
    print("\n".join(lines))
    return report


if __name__ == "__main__":  # one child: MODE FOLDER DEVICES
    print(json.dumps(child(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
