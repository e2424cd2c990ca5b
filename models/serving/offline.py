"""Offline generation on the serving engine: a list of prompts in, their completions out (what
``scripts/infer.py`` runs; vLLM's ``LLM.generate`` is the same idea). Every prompt is
submitted at once and the engine steps until each has ended, so offline and served requests
take one path: the scheduler, the paged cache, the same step programs.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

from moe_relayfree_models.serving.engine import Engine
from moe_relayfree_models.serving.scheduler import SamplingParams


def complete(engine: Engine, prompts: Sequence[Sequence[int]], max_tokens: int,
             sampling: SamplingParams = SamplingParams(), stop_ids=(),
             progress: Callable[[int, int], None] | None = None) -> dict:
    """Runs ``prompts`` (token ids) to completion on ``engine`` (process 0 of a job: the
    others :meth:`Engine.follow`). Request ``i`` draws with seed ``sampling.seed + i`` (its own
    stream: the same prompt twice samples two texts). Returns ``tokens`` (per request, the
    stop id not included), ``finish_reasons``, ``ttft_s`` (per request: from submission to its
    first token), ``decode_step_s`` (each step that fed only decode tokens), ``steps`` (the
    engine's steps per MoE schedule, this run's) and the rows of the first step with prefill
    chunks and of the first decode-only step (``prefill_rows``, ``decode_rows``: what their MoE
    layers chose a schedule from)."""
    base = sampling.seed or 0
    first: dict[int, float] = {}
    before = dict(engine.metrics.steps)
    start = time.perf_counter()

    def listener(request, tokens, reason):
        if tokens and request.id not in first:
            first[request.id] = time.perf_counter() - start

    requests = [engine.submit(list(p), max_tokens,
                              SamplingParams(sampling.temperature, sampling.top_k, sampling.top_p,
                                             (base + i) % 2**32),
                              stop_ids=stop_ids, listener=listener)
                for i, p in enumerate(prompts)]
    decode_step_s = []
    rows = {}
    while engine.has_work():
        t = time.perf_counter()
        if not engine.step():
            continue
        decode_only = engine.last_shape[1] == 0  # no chunk slots
        if decode_only:
            decode_step_s.append(time.perf_counter() - t)
        rows.setdefault("decode_rows" if decode_only else "prefill_rows",
                        engine.step_rows(engine.last_shape))
        if progress is not None:
            progress(max(len(r.output) for r in requests), max_tokens)
    return dict(tokens=[r.output for r in requests],
                finish_reasons=[r.finish_reason for r in requests],
                ttft_s=[first.get(r.id, float("nan")) for r in requests],
                decode_step_s=decode_step_s, prefill_rows=rows.get("prefill_rows", 0),
                decode_rows=rows.get("decode_rows", 0),
                steps={k: v - before.get(k, 0) for k, v in engine.metrics.steps.items()})


__all__ = ["complete"]
