"""Model-level costs outside the MoE layer, as A/Bs on emulated CPU devices.

* ``prefill``: the prefill program computing logits for the last position only (what
  ``models.generation`` runs) against every position (the model's default,
  ``logits_to_keep=0``): time to first token and XLA's temporary buffer bytes per device.
* ``sampling`` (``--sampling-batch N``): the decode step of ``generate`` with temperature,
  top-k and top-p settings against greedy, in one process (median step of ``--new-tokens``).
* ``mla`` (``--mla-contexts L ...``, MLA checkpoints only): the decode step with attention in
  the absorbed form (over the latent cache) against the expanded one (keys and values expanded
  from the cache every step), at caches of ``L`` rows, in one process.
* ``fp8`` (``--fp8-batches B ...``): the checkpoint block-quantized to FP8 (128 x 128, as the
  official FP8 releases), loaded twice: routed experts kept FP8 on the devices (dequantized
  inside the expert kernel) against dequantized to the checkpoint's dtype at load; the decode
  step at each batch ``B`` and a prefill of ``--fp8-prompt`` tokens (batch 8), in one process,
  and the expert bytes per device. Same numbers both ways, so ``same_tokens`` should hold.
* ``step``: the decode step with dense projections padded to ``Lowering.dense_min_rows`` rows per device
  (``moe_relayfree.ffn.dense_dot``) against unpadded (``dense_min_rows=1``): at one token
  per device XLA:CPU runs a bf16 one-row dot as a matrix-vector product that widens the whole
  matrix to f32 on every call. Each variant runs ``generate`` in a fresh process, as
  ``scripts/infer.py`` does (median decode step of ``--new-tokens``), see ``child_step``.

Variants alternate, order rotating every round; the ratio is the median over rounds of
variant / baseline in the same round. ``same_tokens`` says whether both generated the same
greedy tokens; it is reported, not required: a dot over more rows may add in another order, and
with random prompts (near ties) one ulp can change a token. The command: ``scripts/bench_generation.py``.
"""

from __future__ import annotations

import json
import os
import sys
import time

from moe_relayfree.tools.bench.report import write
from moe_relayfree.tools.bench.timing import interleaved_calls
from moe_relayfree_models.cli import DEFAULT_CHECKPOINT

ROOT = os.path.dirname(os.path.dirname(DEFAULT_CHECKPOINT))


def child_step(folder: str, batch: int, min_rows: int, new_tokens: int, devices: int) -> dict:
    """One decode run in a fresh process, as ``scripts/infer.py`` runs it (one program called
    step after step): in a process that alternates two step programs, XLA:CPU ran the unpadded
    one as fast as the padded one, alone it took 1.8x as long (default model, batch 8)."""
    import subprocess

    out = subprocess.run([sys.executable, "-m", __name__, folder, str(batch), str(min_rows),
                          str(new_tokens), str(devices)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_child(folder: str, batch: int, min_rows: int, new_tokens: int) -> None:
    import numpy as np

    import jax

    import moe_relayfree as mr
    from moe_relayfree_models import checkpoint
    from moe_relayfree_models.generation import generate

    model = checkpoint.load_model(folder, mesh=mr.make_ep_mesh(len(jax.devices())),
                                  lowering=mr.Lowering(dense_min_rows=min_rows))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, model.cfg.vocab_size, 16).tolist() for _ in range(batch)]
    result = generate(model, prompts, new_tokens)
    print(json.dumps(dict(tpot_s=float(np.median(result["step_s"])), tokens=result["tokens"])))


def compare(name: str, times: dict, outs: dict, variant: str, baseline: str, **extra) -> dict:
    import numpy as np

    return dict(case=name, **extra, variant_ms=1e3 * float(np.median(times[variant])),
                baseline_ms=1e3 * float(np.median(times[baseline])),
                paired_ratio=float(np.median(times[variant] / times[baseline])),
                same_tokens=bool((np.asarray(outs[variant]) == np.asarray(outs[baseline])).all()))


def mla_step_ab(model, batch: int, length: int, rounds: int, shape: dict) -> dict:
    """The decode step at a cache of ``length`` rows with MLA attention forced absorbed, then
    expanded (each its own program, traced with the choice in place), alternating; the
    cache's contents do not change the work."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from moe_relayfree_models.generation import choose_tokens, GREEDY
    from moe_relayfree_models.transformer import init_cache

    cache = init_cache(model.cfg, batch, length, model.compute_dtype)
    token, pad, key = jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), jnp.int32), jax.random.key(0)

    def program(form):
        copy = nnx.merge(*nnx.split(model))
        copy.set_mla_form(form)
        graphdef, state = nnx.split(copy)

        @jax.jit
        def step(state, token, cache):
            logits, cache = nnx.merge(graphdef, state)(token[:, None], pad, cache, length - 1)
            return choose_tokens(logits[:, -1], key, length, GREEDY), cache

        jax.block_until_ready(step(state, token, cache))

        def call():
            start = time.perf_counter()
            out, _ = step(state, token, cache)
            return jax.block_until_ready(out), time.perf_counter() - start
        return call

    calls = {form: program(form) for form in ("absorbed", "expanded")}
    times, outs = interleaved_calls(calls, max(rounds, 5))
    row = compare(f"mla decode step: absorbed / expanded, cache {length}", times, outs,
                  "absorbed", "expanded", **shape, batch=batch)
    del row["same_tokens"]  # one step from an empty cache: not a generation
    return dict(row, prompt=length)


def fp8_experts_ab(folder: str, batches: list[int], prompt: int, rounds: int, shape: dict) -> list[dict]:
    """Rows of the ``fp8`` A/B (module docstring) for the checkpoint ``folder``."""
    import tempfile

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import moe_relayfree as mr
    from moe_relayfree_models import checkpoint, quant
    from moe_relayfree_models.generation import GREEDY, choose_tokens
    from moe_relayfree_models.transformer import init_cache

    mesh = mr.make_ep_mesh(len(jax.devices()))
    with tempfile.TemporaryDirectory() as twin:
        quant.quantize_checkpoint(folder, twin)
        base = checkpoint.load_model(folder, mesh=mesh)
        models = {"fp8": checkpoint.load_model(twin, mesh=mesh, fp8_experts=True, dtype=base.compute_dtype),
                  "dequantized": checkpoint.load_model(twin, mesh=mesh, dtype=base.compute_dtype)}

    def expert_bytes(model):  # per device: the first device's shards of every routed stack
        state = nnx.state(model)
        total = 0
        for path, leaf in nnx.to_flat_state(state):
            if str(path[-1]).startswith(("w_gate", "w_up", "w_down")) and leaf[...].ndim == 3:
                total += leaf[...].addressable_shards[0].data.nbytes
        return total

    cfg, dtype = base.cfg, base.compute_dtype
    rows = []
    rng = np.random.default_rng(0)
    for batch, width in [(b, 1) for b in batches] + [(8, prompt)]:
        length = max(width, 64)
        tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (batch, width)), jnp.int32)
        pad = jnp.zeros((batch,), jnp.int32)
        start_row = length - width

        def program(model, tokens=tokens, pad=pad, length=length, start_row=start_row):
            graphdef, state = nnx.split(model)

            @jax.jit
            def step(state, cache):
                logits, cache = nnx.merge(graphdef, state)(tokens, pad, cache, start_row,
                                                           logits_to_keep=1)
                return choose_tokens(logits[:, -1], jax.random.key(0), length, GREEDY), cache

            cache = init_cache(cfg, tokens.shape[0], length, dtype)
            compiled = step.lower(state, cache).compile()

            def call():
                begin = time.perf_counter()
                out, _ = compiled(state, cache)
                return jax.block_until_ready(out), time.perf_counter() - begin
            call()
            return call, compiled.memory_analysis().temp_size_in_bytes

        made = {name: program(m) for name, m in models.items()}
        times, outs = interleaved_calls({n: c for n, (c, _) in made.items()}, rounds)
        kind = "decode step" if width == 1 else "prefill"
        row = compare(f"fp8 experts: {kind}, FP8 kept / dequantized at load", times, outs,
                      "fp8", "dequantized", **shape, batch=batch,
                      variant_temp_mib=made["fp8"][1] / 2**20,
                      baseline_temp_mib=made["dequantized"][1] / 2**20,
                      variant_expert_mib=expert_bytes(models["fp8"]) / 2**20,
                      baseline_expert_mib=expert_bytes(models["dequantized"]) / 2**20)
        if width > 1:
            row["prompt"] = width
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def run(a, command: str) -> dict:
    """Every A/B that ``a`` (``scripts/bench_generation.py``'s parsed arguments) asks for,
    written to ``a.out`` (``generation.json``, ``generation.md``)."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import moe_relayfree as mr
    from moe_relayfree_models import checkpoint
    from moe_relayfree_models.generation import GREEDY, Sampling, generate
    from moe_relayfree_models.transformer import init_cache

    SAMPLINGS = (GREEDY, Sampling(0.7), Sampling(0.7, top_k=50), Sampling(0.7, top_k=50, top_p=0.9),
                 Sampling(0.7, top_p=0.9))

    @functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=5)
    def prefill(graphdef, keep, state, tokens, pad, cache):
        logits, cache = nnx.merge(graphdef, state)(tokens, pad, cache, 0, logits_to_keep=keep)
        return jnp.argmax(logits[:, -1], axis=-1), cache

    mesh = mr.make_ep_mesh(len(jax.devices()))
    padded = mr.Lowering().dense_min_rows
    rows = []
    for folder in a.checkpoint or [DEFAULT_CHECKPOINT]:
        model = checkpoint.load_model(folder, mesh=mesh)
        cfg, dtype = model.cfg, model.compute_dtype
        graphdef, state = nnx.split(model)
        rng = np.random.default_rng(0)
        label = os.path.relpath(folder, ROOT) if folder.startswith(ROOT) else folder
        shape = dict(checkpoint=label, vocab=cfg.vocab_size, d_model=cfg.d_model,
                     dtype=np.dtype(dtype).name)

        for length in a.prompt_lengths:
            tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (8, length)), jnp.int32)
            pad = jnp.zeros((8,), jnp.int32)
            programs = {keep: prefill.lower(graphdef, keep, state, tokens, pad,
                                            init_cache(cfg, 8, length, dtype)).compile()
                        for keep in (1, 0)}

            def call(keep, tokens=tokens, pad=pad, length=length):
                cache = jax.block_until_ready(init_cache(cfg, 8, length, dtype))
                start = time.perf_counter()
                out, _ = programs[keep](state, tokens, pad, cache)
                return jax.block_until_ready(out), time.perf_counter() - start

            for keep in programs:  # warm
                call(keep)
            times, outs = interleaved_calls({k: functools.partial(call, k) for k in programs}, a.rounds)
            temp = {k: c.memory_analysis().temp_size_in_bytes / 2**20 for k, c in programs.items()}
            rows.append(compare("prefill: last-position logits / all", times, outs, 1, 0, **shape,
                                batch=8, prompt=length, variant_temp_mib=temp[1],
                                baseline_temp_mib=temp[0]))
            print(json.dumps(rows[-1]), flush=True)

        if a.sampling_batch:
            batch = a.sampling_batch
            prompts = [rng.integers(3, cfg.vocab_size, 16).tolist() for _ in range(batch)]

            def sample(setting):
                result = generate(model, prompts, a.new_tokens, sampling=setting)
                return result["tokens"], float(np.median(result["step_s"]))

            times, outs = interleaved_calls({s: functools.partial(sample, s) for s in SAMPLINGS},
                                    a.rounds)
            for setting in SAMPLINGS[1:]:
                row = compare(f"sampling: {setting} / greedy", times, outs, setting, GREEDY,
                              **shape, batch=batch)
                del row["same_tokens"]  # sampled tokens are not greedy ones
                rows.append(row)
                print(json.dumps(rows[-1]), flush=True)

        if a.fp8_batches:
            rows += fp8_experts_ab(folder, a.fp8_batches, a.fp8_prompt, a.rounds, shape)

        if model.cfg.is_mla and a.mla_contexts:
            for length in a.mla_contexts:
                rows.append(mla_step_ab(model, a.batches[-1], length, a.rounds, shape))
                print(json.dumps(rows[-1]), flush=True)

        for batch in a.batches:
            def run(min_rows, batch=batch):
                got = child_step(folder, batch, min_rows, a.new_tokens, a.devices)
                return got["tokens"], got["tpot_s"]

            times, outs = interleaved_calls({m: functools.partial(run, m) for m in (padded, 1)},
                                    a.rounds)
            rows.append(compare("decode step: padded dense rows / unpadded", times, outs, padded,
                                1, **shape, batch=batch,
                                tokens_per_device=model.rows_per_device(batch, 1)))
            print(json.dumps(rows[-1]), flush=True)

    report = dict(command=command,
                  devices=len(jax.devices()), platform=jax.devices()[0].platform,
                  rounds=a.rounds, rows=rows)
    lines = [f"# Generation A/Bs ({report['command']})", "",
             f"{report['devices']} {report['platform']} devices, medians of {a.rounds} "
             "alternating rounds; ratio: median over rounds of variant / baseline.", "",
             "| case | checkpoint | vocab | batch | prompt | variant ms | baseline ms | ratio "
             "| temp MiB (variant / baseline) | same tokens |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        temp = (f"{r['variant_temp_mib']:.0f} / {r['baseline_temp_mib']:.0f}"
                if "variant_temp_mib" in r else "")
        lines.append(f"| {r['case']} | {r['checkpoint']} | {r['vocab']} | {r['batch']} | "
                     f"{r.get('prompt', '')} | {r['variant_ms']:.1f} | {r['baseline_ms']:.1f} | "
                     f"{r['paired_ratio']:.2f} | {temp} | {r.get('same_tokens', '')} |")
    paths = write(a.out, "generation", report, "\n".join(lines) + "\n")
    print("wrote " + ", ".join(paths))
    return report


if __name__ == "__main__":  # child_step's process: CHECKPOINT BATCH MIN_ROWS NEW_TOKENS DEVICES
    from moe_relayfree.tools.bench import env as _env

    _folder, _batch, _min_rows, _new, _devices = sys.argv[1:6]
    _env.emulate_cpu_devices(int(_devices))
    run_child(_folder, int(_batch), int(_min_rows), int(_new))
