"""The serving engine against static-batch ``generate``, in one process, as ratios:

* ``step``: a decode-only engine step (``B`` requests decoding, each ~``context`` tokens into
  its sequence) against ``generate``'s decode step at the same batch and a cache of
  ``context + new`` rows (what it preallocates), timed in interleaved rounds (medians);
* ``throughput``: output tokens per second with ``2B`` requests of ``new`` tokens through
  ``B`` slots (saturated; a step budget of 1024 tokens, every step shape compiled by
  :meth:`Engine.warm_up` first, compiles counted while timed), against two ``generate``
  calls of ``B`` prompts each, in interleaved rounds (the median ratio);
* ``ttft``: time to first token of a short request arriving while ``B - 1`` others decode,
  when those others asked for few or for many tokens (the engine's step does not grow with
  them; a static batch's cache and every step of it did);
* ``preemption`` (:func:`preemption_ab`): a KV pool that holds one sequence at full length per
  device, ``4B`` requests through ``B`` slots, with preemption (admitted on their prompts'
  pages) against without (admitted on their whole length), in interleaved rounds: requests
  that stop early at sampled stop ids (what preemption is for), and requests that run to
  ``max_tokens`` (where it recomputes).

Every program is compiled before anything is timed; the command: ``scripts/bench_engine.py``.
"""

from __future__ import annotations

import time

import numpy as np

from moe_relayfree.tools.bench.report import table, write
from moe_relayfree.tools.bench.timing import interleaved, interleaved_calls, ratio_summary


class CompileCounter:
    """Counts XLA backend compiles while active (JAX's monitoring events)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __enter__(self):
        import jax

        self.count = 0
        self._listener = lambda name, *_, **__: setattr(self, "count", self.count + (name == self.EVENT))
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc):
        import jax

        jax.monitoring.unregister_event_duration_listener(self._listener)


def _engine(model, batch: int):
    from moe_relayfree_models.serving.engine import Engine, EngineConfig

    return Engine(model, EngineConfig(max_seqs=batch, max_step_tokens=max(1024, batch),
                                      chunk=64, page_size=16))


def _prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, min(vocab, 250), length).tolist() for _ in range(batch)]


def step_ab(model, batch: int, context: int, new: int, rounds: int) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from moe_relayfree_models.generation import GREEDY, step_program
    from moe_relayfree_models.transformer import init_cache

    engine = _engine(model, batch)
    steps = 4 * rounds + 16  # every step the timing takes (a warm call before each timed one)
    if context + steps > model.cfg.max_position:
        raise ValueError(f"context {context} + {steps} steps exceed the model's positions")
    for p in _prompts(batch, context, model.cfg.vocab_size):
        engine.submit(p, steps)
    while any(r.prefilling for r in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    graphdef, state = nnx.split(model)
    cache = [init_cache(model.cfg, batch, context + new, model.compute_dtype)]
    token = jnp.zeros((batch,), jnp.int32)
    pad = jnp.zeros((batch,), jnp.int32)
    key = jax.random.key(0)

    def static():
        out, cache[0] = step_program(graphdef, GREEDY, state, token, pad, cache[0],
                                     jnp.int32(context), key)
        return np.asarray(out)  # generate copies each step's tokens to the host

    times = interleaved({"engine": engine.step, "static": static}, min_rounds=rounds)
    ratio = times["engine"] / times["static"]
    return dict(batch=batch, context=context, new=new, rounds=len(ratio),
                engine_ms=1e3 * float(np.median(times["engine"])),
                static_ms=1e3 * float(np.median(times["static"])),
                engine_vs_static=ratio_summary(ratio))


def throughput_ab(model, batch: int, prompt: int, new: int, rounds: int = 3) -> dict:
    """Output tokens per second of ``2 batch`` requests through ``batch`` slots (the engine,
    after :meth:`Engine.warm_up`) against two ``generate`` calls of ``batch`` each, in
    ``rounds`` interleaved rounds after an untimed one; the median of the per-round ratios.
    ``generate`` is timed by its own clocks (first token and steps, not its set-up), the
    engine by the wall clock from the first submit to the last token."""
    from moe_relayfree_models.generation import generate

    prompts = _prompts(2 * batch, prompt, model.cfg.vocab_size, seed=1)
    engine = _engine(model, batch)
    start = time.perf_counter()
    shapes = engine.warm_up()  # every step shape, as a server does before it listens
    warm_s = time.perf_counter() - start
    generate(model, prompts[:batch], new)  # compiled
    compiles = []

    def engine_run():
        with CompileCounter() as counter:  # none expected: every shape compiled above
            start = time.perf_counter()
            for p in prompts:
                engine.submit(p, new)
            while engine.has_work():
                engine.step()
            seconds = time.perf_counter() - start
        compiles.append(counter.count)
        return None, seconds

    def static_run():
        seconds = 0.0
        for half in (prompts[:batch], prompts[batch:]):
            result = generate(model, half, new)
            seconds += result["ttft_s"] + sum(result["step_s"])
        return None, seconds

    engine_run(), static_run()  # one untimed pass of each (the first ran slower for both)
    times, _ = interleaved_calls({"engine": engine_run, "static": static_run}, rounds)
    tokens = 2 * batch * new
    return dict(batch=batch, prompt=prompt, new=new, requests=2 * batch, rounds=rounds,
                max_step_tokens=engine.config.max_step_tokens,
                engine_steps=engine.metrics.steps, compiles_in_timed_runs=sum(compiles),
                warm_up_shapes=shapes, warm_up_s=warm_s,
                engine_tokens_per_s=tokens / float(np.median(times["engine"])),
                static_tokens_per_s=tokens / float(np.median(times["static"])),
                engine_vs_static=ratio_summary(times["static"] / times["engine"]))


def ttft_ab(model, batch: int, prompt: int, others_new: tuple[int, ...], repeats: int) -> dict:
    """TTFT of a short request with ``batch - 1`` others decoding that asked for each of
    ``others_new`` tokens (medians over ``repeats``)."""
    row = dict(batch=batch, prompt=prompt)
    for n in others_new:
        engine = _engine(model, batch)
        waits = []
        for rep in range(repeats + 1):
            for p in _prompts(batch - 1, prompt, model.cfg.vocab_size, seed=10 + rep):
                engine.submit(p, n)
            while any(r.prefilling for r in engine.scheduler.running) or engine.scheduler.waiting:
                engine.step()
            first = []
            start = time.perf_counter()
            engine.submit(_prompts(1, prompt, model.cfg.vocab_size, seed=99)[0], 1,
                          listener=lambda r, t, why: first.append(time.perf_counter()) if t else None)
            while not first:
                engine.step()
            if rep:  # the first round compiles
                waits.append(first[0] - start)
            for r in list(engine.scheduler.running):
                engine.cancel(r)
            while engine.has_work():
                engine.step()
        row[f"ttft_ms_others_{n}"] = 1e3 * float(np.median(waits))
    row["ttft_ratio_many_vs_few"] = (row[f"ttft_ms_others_{others_new[-1]}"]
                                     / row[f"ttft_ms_others_{others_new[0]}"])
    return row


def load_run(model, batch: int, minutes: float, rate: float, seed: int = 0) -> dict:
    """A load of ``minutes``: requests arrive as a Poisson process of ``rate`` per second
    (prompts of 4-200 tokens, 1-128 new tokens, a third of them sampled with temperature,
    top-k and top-p), through ``batch`` slots, after :meth:`Engine.warm_up`; counts the backend
    compiles while it runs (the goal: none) and every request's end."""
    import threading

    from moe_relayfree_models.serving.engine import SamplingParams

    rng = np.random.default_rng(seed)
    engine = _engine(model, batch)
    start = time.perf_counter()
    shapes = engine.warm_up()
    warm_s = time.perf_counter() - start
    ends = []
    lock = threading.Lock()

    def listener(request, tokens, reason):
        if reason is not None:
            with lock:
                ends.append(reason)

    submitted = refused = 0
    with CompileCounter() as compiles:
        start = time.perf_counter()
        next_at = start
        while time.perf_counter() - start < 60 * minutes:
            while time.perf_counter() >= next_at:
                next_at += rng.exponential(1 / rate)
                sampling = (SamplingParams(temperature=0.8, top_k=40, top_p=0.9)
                            if rng.random() < 1 / 3 else SamplingParams())
                prompt = rng.integers(3, min(model.cfg.vocab_size, 250),
                                      int(rng.integers(4, 201))).tolist()
                try:
                    engine.submit(prompt, int(rng.integers(1, 129)), sampling, listener=listener)
                    submitted += 1
                except Exception:  # QueueFull: the server would answer 429
                    refused += 1
            if not engine.step():
                time.sleep(0.001)
        while engine.has_work():  # the requests in flight end too
            engine.step()
        seconds = time.perf_counter() - start
    return dict(batch=batch, minutes=minutes, rate=rate, warm_up_shapes=shapes,
                warm_up_s=warm_s, seconds=seconds, submitted=submitted, refused=refused,
                ended={r: ends.count(r) for r in sorted(set(ends))},
                steps=dict(engine.metrics.steps), compiles_after_warm_up=compiles.count)


def _stop_ids(counts: dict, mean_tokens: int) -> list[int]:
    """Token ids that together make up at most ``1 / mean_tokens`` of ``counts`` (sampled
    tokens), the most frequent first: as stop ids, requests end after about ``mean_tokens``."""
    total, share, out = sum(counts.values()), 0.0, []
    for token, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        if share + n / total <= 1 / mean_tokens:
            out.append(token)
            share += n / total
    return out


def preemption_ab(model, batch: int, prompt: int, max_model_len: int, mean_tokens: int,
                  rounds: int) -> dict:
    """Seconds for ``4 batch`` requests (arriving at once, sampled at temperature 1 with a
    seed each) through ``batch`` slots and a pool of one full-length sequence per device (plus
    scratch), :class:`EngineConfig` ``preemption`` True against False, the same tokens either
    way (a draw is keyed by seed and position; checked). Two workloads: ``early``, asking for
    ``max_model_len - prompt`` tokens and stopping at stop ids chosen from a pilot run's
    tokens to end after about ``mean_tokens``; ``full``, every request asking for half the
    positions left and running to the end. Medians of ``rounds`` interleaved rounds (after an
    untimed one), mean time to first token, and the preemptions of a run."""
    from moe_relayfree_models.serving.engine import Engine, EngineConfig
    from moe_relayfree_models.serving.scheduler import SamplingParams

    page = 16
    prompts = _prompts(4 * batch, prompt, model.cfg.vocab_size, seed=2)
    left = max_model_len - prompt

    def make(preemption: bool, pool: bool = True):
        shards = model.dispatch.layout.num_token_shards
        pages = shards * (-(-max_model_len // page) + 1) if pool else None
        return Engine(model, EngineConfig(max_seqs=batch, max_step_tokens=max(256, batch),
                                          chunk=64, page_size=page, max_model_len=max_model_len,
                                          num_pages=pages, preemption=preemption))

    def serve(engine, new: int, stop: list[int]):
        start = time.perf_counter()
        requests = [engine.submit(p, new, SamplingParams(temperature=1.0, seed=i), stop)
                    for i, p in enumerate(prompts)]
        first = {}
        before = engine.scheduler.preemptions
        while engine.has_work():
            engine.step()
            now = time.perf_counter()
            for r in requests:
                if r.output and r not in first:
                    first[r] = now - start
        seconds = time.perf_counter() - start
        return ([r.output for r in requests], seconds,
                float(np.mean(list(first.values()) or [0.0])),
                engine.scheduler.preemptions - before)

    pilot = make(True, pool=False)
    counts: dict = {}
    for out in serve(pilot, 64, [])[0]:
        for t in out:
            counts[t] = counts.get(t, 0) + 1
    stop = _stop_ids(counts, mean_tokens)
    engines = {True: make(True), False: make(False)}
    for e in engines.values():
        e.warm_up()
    report = dict(batch=batch, requests=len(prompts), prompt=prompt, max_model_len=max_model_len,
                  pool_pages_per_device=-(-max_model_len // page), rounds=rounds)
    for name, new, ids in (("early", left, stop), ("full", left // 2, [])):
        runs = {True: [], False: []}
        outputs = {}
        for i in range(rounds + 1):
            for mode in ((True, False) if i % 2 else (False, True)):
                out, seconds, ttft, preempted = serve(engines[mode], new, ids)
                outputs[mode] = out
                if i:
                    runs[mode].append((seconds, ttft, preempted))
        assert outputs[True] == outputs[False], "preemption changed a request's tokens"
        tokens = sum(len(o) for o in outputs[True])
        on, off = (np.array(runs[m]) for m in (True, False))
        report[name] = dict(
            max_tokens=new, stop_ids=len(ids), output_tokens=tokens,
            seconds=dict(preemption=float(np.median(on[:, 0])),
                         no_preemption=float(np.median(off[:, 0]))),
            ttft_mean_s=dict(preemption=float(np.median(on[:, 1])),
                             no_preemption=float(np.median(off[:, 1]))),
            preemptions_per_run=float(np.median(on[:, 2])),
            speedup=ratio_summary(off[:, 0] / on[:, 0]))
    return report


def run(a, command: str) -> dict:
    import jax

    import moe_relayfree as mr
    from moe_relayfree_models import checkpoint

    # the preemption A/B in float32: bf16 logits depend on a step's batch (the tokens of
    # requests that were never preempted differ between the two runs), float32 ones do not
    # here, so both runs do the same work and their tokens are checked equal
    dtype = {"dtype": "float32"} if a.preemption else {}
    model = checkpoint.load_model(a.checkpoint, mesh=mr.make_ep_mesh(len(jax.devices())), **dtype)
    import os

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    name = os.path.relpath(a.checkpoint, root) if os.path.abspath(a.checkpoint).startswith(root) else a.checkpoint
    report = dict(command=command, checkpoint=name, devices=len(jax.devices()),
                  dtype=str(model.compute_dtype), step=[], throughput=[], ttft=[])
    if a.preemption:
        report["preemption"] = preemption_ab(model, a.batches[0], a.prompt, a.max_model_len,
                                             a.mean_tokens, a.repeats)
        print("preemption", report["preemption"], flush=True)
        write(a.out, "engine", report, markdown(report))
        return report
    for b in a.batches:
        report["step"].append(step_ab(model, b, a.context, a.new, a.rounds))
        print("step", report["step"][-1], flush=True)
        report["throughput"].append(throughput_ab(model, b, a.prompt, a.new, a.repeats))
        print("throughput", report["throughput"][-1], flush=True)
    report["ttft"].append(ttft_ab(model, a.batches[0], a.prompt, tuple(a.others_new), a.repeats))
    print("ttft", report["ttft"][-1], flush=True)
    if a.load_minutes:
        report["load"] = load_run(model, a.batches[0], a.load_minutes, a.load_rate)
        print("load", report["load"], flush=True)
    write(a.out, "engine", report, markdown(report))
    return report


def markdown(report: dict) -> str:
    what = "preemption" if "preemption" in report else "vs static generate"
    lines = [f"# Serving engine {what} ({report['checkpoint']}, "
             f"{report['devices']} devices, {report['dtype']})", "",
             f"Command: `{report['command']}`", ""]
    if "preemption" in report:
        r = report["preemption"]
        lines += ["## Preemption against whole-length promises", "",
                  f"{r['requests']} requests of {r['prompt']} prompt tokens through "
                  f"{r['batch']} slots, a pool of {r['pool_pages_per_device']} pages of 16 per "
                  f"device, {r['rounds']} interleaved rounds (medians)", ""]
        lines += table(["workload", "max_tokens", "output tokens", "s with", "s without",
                        "speed-up [95% CI]", "mean TTFT s with / without", "preemptions"],
                       [(w, x["max_tokens"], x["output_tokens"],
                         f"{x['seconds']['preemption']:.2f}", f"{x['seconds']['no_preemption']:.2f}",
                         f"{x['speedup']['median']:.2f} [{x['speedup']['ci95'][0]:.2f}, "
                         f"{x['speedup']['ci95'][1]:.2f}]",
                         f"{x['ttft_mean_s']['preemption']:.2f} / "
                         f"{x['ttft_mean_s']['no_preemption']:.2f}", x["preemptions_per_run"])
                        for w, x in ((w, r[w]) for w in ("early", "full"))])
        return "\n".join(lines)
    lines += ["## Decode step", ""]
    lines += table(["batch", "context", "rounds", "engine ms", "static ms", "engine / static [95% CI]"],
                   [(r["batch"], r["context"], r["rounds"], f"{r['engine_ms']:.2f}",
                     f"{r['static_ms']:.2f}",
                     f"{r['engine_vs_static']['median']:.2f} [{r['engine_vs_static']['ci95'][0]:.2f}, "
                     f"{r['engine_vs_static']['ci95'][1]:.2f}]") for r in report["step"]])
    lines += ["", "## Throughput at saturation", ""]
    lines += table(["batch", "requests", "prompt", "new", "rounds", "engine tok/s", "static tok/s",
                    "engine / static [95% CI]", "compiles in the timed runs", "warm-up"],
                   [(r["batch"], r["requests"], r["prompt"], r["new"], r["rounds"],
                     f"{r['engine_tokens_per_s']:.1f}", f"{r['static_tokens_per_s']:.1f}",
                     f"{r['engine_vs_static']['median']:.2f} [{r['engine_vs_static']['ci95'][0]:.2f}, "
                     f"{r['engine_vs_static']['ci95'][1]:.2f}]", r["compiles_in_timed_runs"],
                     f"{r['warm_up_shapes']} shapes, {r['warm_up_s']:.0f} s")
                    for r in report["throughput"]])
    if "load" in report:
        r = report["load"]
        lines += ["", "## A load run", "",
                  f"- {r['minutes']} min of Poisson arrivals at {r['rate']}/s through {r['batch']} "
                  f"slots: {r['submitted']} requests ({r['refused']} refused at the queue), ended "
                  f"{r['ended']}, steps {r['steps']}; {r['compiles_after_warm_up']} compiles "
                  f"after warm-up ({r['warm_up_shapes']} shapes in {r['warm_up_s']:.0f} s)"]
    lines += ["", "## Time to first token of a short request beside decoding ones", ""]
    for r in report["ttft"]:
        lines += [f"- batch {r['batch']}, prompt {r['prompt']}: "
                  + ", ".join(f"{k.removeprefix('ttft_ms_others_')} tokens asked by the others: "
                              f"{v:.1f} ms" for k, v in r.items() if k.startswith("ttft_ms"))
                  + f"; ratio {r['ttft_ratio_many_vs_few']:.2f}"]
    return "\n".join(lines)


__all__ = ["preemption_ab", "run", "step_ab", "throughput_ab", "ttft_ab"]
