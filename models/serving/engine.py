"""The serving engine: continuous batching over a paged KV cache.

Each :meth:`Engine.step` asks the :class:`~.scheduler.Scheduler` for this step's work, lays the
tokens out (:class:`~moe_relayfree_models.paged.StepBatch`), runs ONE jitted forward over the
flat batch (decode tokens of running requests and prefill chunks of new ones together), picks
each request's next token with its own sampling settings, and hands the tokens back. Shapes
come from buckets (tokens ``T`` and pages per sequence ``P`` rounded up to powers of two; ``S``
sequence slots fixed; ``Q`` query rows 1 for a decode-only step, ``chunk`` otherwise), all
compiled by :meth:`Engine.warm_up`, so serving compiles nothing.

Each step's MoE layers choose their schedule from that step's tokens per rank
(:func:`moe_relayfree.resolve`); :attr:`Engine.metrics` counts the steps of each.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import moe_relayfree as mr
from moe_relayfree_models.generation import check_context, choose_tokens_per_row
from moe_relayfree_models.paged import StepBatch, init_pages, paged_forward
from moe_relayfree_models.serving.scheduler import (PagePool, QueueFull, Request, SamplingParams,
                                                    Scheduler, Work)


def _pow2(n: int, floor: int = 1) -> int:
    return max(floor, 1 << max(0, (n - 1).bit_length()))


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """max_seqs: sequence slots per step; max_step_tokens: the step's token budget; chunk:
    the largest prefill chunk of one request in a step; page_size: KV rows per page;
    num_pages: the pool (default: every slot at full length, plus the scratch page);
    max_waiting: the waiting queue's bound; max_model_len: the longest request served, prompt
    and completion (default: the model's ``max_position_embeddings``; a long-context model's
    163,840 positions would size the default pool for every slot at that length)."""

    max_seqs: int = 16
    max_step_tokens: int = 256
    chunk: int = 64
    page_size: int = 16
    num_pages: int | None = None
    max_waiting: int = 256
    max_model_len: int | None = None


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(3,))
def _step_program(graphdef, state, batch: StepBatch, pages, temperature, top_k, top_p, seed,
                  position):
    logits, pages = paged_forward(nnx.merge(graphdef, state), batch, pages)
    return choose_tokens_per_row(logits, temperature, top_k, top_p, seed, position), pages


class Metrics:
    """Counters for ``/metrics``: steps per MoE schedule, tokens, step time."""

    def __init__(self):
        self.steps = {"prefill": 0, "decode": 0, "none": 0}
        self.step_seconds = 0.0
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.started = time.monotonic()


class Engine:
    """Continuous batching for ``model`` (a loaded :class:`MoETransformer`)."""

    def __init__(self, model, config: EngineConfig = EngineConfig()):
        self.model, self.config = model, config
        cfg = model.cfg
        limit = config.max_model_len or cfg.max_position
        if not 1 <= limit <= cfg.max_position:
            raise ValueError(f"max_model_len must be in [1, {cfg.max_position}] (the model's "
                             f"positions), got {limit}")
        self.max_positions = limit
        self.max_pages = -(-limit // config.page_size)
        num_pages = config.num_pages or config.max_seqs * self.max_pages + 1
        self.pool = PagePool(num_pages, config.page_size)
        self.scheduler = Scheduler(self.pool, max_seqs=config.max_seqs,
                                   max_step_tokens=config.max_step_tokens, chunk=config.chunk,
                                   max_positions=limit, max_waiting=config.max_waiting)
        self.pages = jax.device_put(init_pages(cfg, num_pages, config.page_size, model.compute_dtype),
                                    NamedSharding(model.dispatch.mesh, PartitionSpec()))
        self.graphdef, self.state = nnx.split(model)
        self._replicated = NamedSharding(model.dispatch.mesh, PartitionSpec())
        # decode-only steps: T == S slots, a power of two covering max_seqs
        self._decode_slots = _pow2(config.max_seqs, 8)
        self.metrics = Metrics()
        self._seeds = itertools.count(1)
        self._wake = threading.Condition()
        self._stop = False
        self.last_error: str | None = None  # the last step that failed, for /health

    # --- requests -------------------------------------------------------------------------

    def submit(self, prompt: list[int], max_tokens: int, sampling: SamplingParams = SamplingParams(),
               stop_ids=(), listener=None) -> Request:
        """Queues a request; ValueError for one the model cannot take (empty, past its
        positions), :class:`~.scheduler.QueueFull` past the waiting queue's bound."""
        if not prompt:
            raise ValueError("the prompt needs at least one token")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if any(not 0 <= t < self.model.cfg.vocab_size for t in prompt):
            raise ValueError(f"prompt token ids must be in [0, {self.model.cfg.vocab_size})")
        check_context(dataclasses.replace(self.model.cfg, max_position=self.max_positions),
                      len(prompt), max_tokens)
        if sampling.seed is None:
            sampling = dataclasses.replace(sampling, seed=next(self._seeds) % 2**32)
        request = Request(list(prompt), max_tokens, sampling, frozenset(stop_ids), listener,
                          arrival=time.monotonic())
        self.scheduler.add(request)
        with self._wake:
            self._wake.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Ends ``request`` at the next step (its pages freed then): a client went away."""
        request.cancelled = True
        with self._wake:
            self._wake.notify()

    # --- steps ----------------------------------------------------------------------------

    def _shape(self, work: list[Work]) -> tuple[int, int, int, int]:
        """(tokens T, slots S, query rows Q, pages P) of the step's program. A decode-only
        step takes one token per slot (``T == S``, a power of two: the grid is the flat
        tokens, see :mod:`moe_relayfree_models.paged`); a step with prefill chunks takes
        ``max_seqs`` slots of ``chunk`` rows."""
        tokens = sum(w.count for w in work)
        pages = min(_pow2(max(len(w.request.pages) for w in work)), self.max_pages)
        if all(w.count == 1 for w in work):
            t = min(_pow2(tokens, 8), self._decode_slots)
            return t, t, 1, pages
        return _pow2(tokens, 8), self.config.max_seqs, self.config.chunk, pages

    def _layout(self, work: list[Work], t: int, s: int, q: int, p: int):
        tokens = np.zeros(t, np.int32)
        positions = np.zeros(t, np.int32)
        grid = np.full((s, q), t, np.int32)
        cell = np.zeros(t, np.int32)
        table = np.zeros((s, p), np.int32)
        last = np.zeros(s, np.int32)
        temperature = np.zeros(s, np.float32)
        top_k = np.zeros(s, np.int32)
        top_p = np.ones(s, np.float32)
        seed = np.zeros(s, np.uint32)
        position = np.zeros(s, np.int32)
        i = 0
        for slot, w in enumerate(work):
            r = w.request
            ids = r.tokens[w.start:w.start + w.count]
            tokens[i:i + w.count] = ids
            positions[i:i + w.count] = np.arange(w.start, w.start + w.count)
            grid[slot, :w.count] = np.arange(i, i + w.count)
            cell[i:i + w.count] = slot * q + np.arange(w.count)
            table[slot, :len(r.pages)] = r.pages[:p]
            last[slot] = i + w.count - 1
            sp = r.sampling
            temperature[slot], top_k[slot], top_p[slot] = sp.temperature, sp.top_k, sp.top_p
            seed[slot] = sp.seed
            position[slot] = w.start + w.count  # the position of the token being chosen
            i += w.count
        # placed on the whole mesh, as the parameters and pages are: host arrays committed to
        # one device made every step move them first (a decode step took 2.5x as long)
        batch = StepBatch(tokens, positions, grid, cell, table, last)
        sampling = (temperature, top_k, top_p, seed, position)
        return jax.device_put((batch, sampling), self._replicated)

    def _run(self, work: list[Work], shape) -> np.ndarray:
        batch, sampling = self._layout(work, *shape)
        out, self.pages = _step_program(self.graphdef, self.state, batch, self.pages, *sampling)
        return np.asarray(out)

    def step(self) -> int:
        """One step; returns the number of tokens it fed (0: nothing to do)."""
        work = self.scheduler.schedule()
        if not work:
            return 0
        shape = self._shape(work)
        start = time.perf_counter()
        sampled = self._run(work, shape)
        m = self.metrics
        m.step_seconds += time.perf_counter() - start
        fed = sum(w.count for w in work)
        schedule = self.moe_schedule(shape[0])
        m.steps[schedule or "none"] += 1
        m.prompt_tokens += sum(w.count for w in work if w.request.prefilling)
        m.generated_tokens += sum(1 for w in work if w.samples)
        self.scheduler.advance(work, [int(t) for t in sampled[:len(work)]])
        return fed

    def moe_schedule(self, tokens: int) -> str | None:
        """The schedule this step's MoE layers run for ``tokens`` flat tokens (None: a baseline
        dispatch, which has none)."""
        return mr.resolve(self.model.dispatch, tokens, self.model.cfg.k).schedule

    def warm_up(self) -> int:
        """Compiles every step shape (tokens, query rows, pages buckets) before serving;
        returns how many. Runs them on scratch pages only (page 0)."""
        pages = {self.max_pages} | {1 << i for i in range(self.max_pages.bit_length())
                                    if 1 << i <= self.max_pages}
        decode = {(t, t, 1) for t in (8 << i for i in range(8)) if t <= self._decode_slots}
        mixed = {(t, self.config.max_seqs, self.config.chunk) for t in (8 << i for i in range(16))
                 if t <= _pow2(self.config.max_step_tokens, 8)}
        shapes = {(t, s, q, p) for t, s, q in decode | mixed for p in pages}
        for shape in sorted(shapes):
            batch, sampling = self._layout([], *shape)
            out, self.pages = _step_program(self.graphdef, self.state, batch, self.pages, *sampling)
            jax.block_until_ready(out)
        return len(shapes)

    # --- the loop a server runs -----------------------------------------------------------

    def run_forever(self) -> None:
        """Steps while there is work, waits otherwise, until :meth:`stop`."""
        while True:
            with self._wake:
                while not self._stop and not self.scheduler.has_work():
                    self._wake.wait()
                if self._stop and not self.scheduler.has_work():
                    return
            try:
                self.step()
            except Exception as e:  # every request gets an answer, and the loop goes on
                self.scheduler.fail_all()
                self.last_error = f"{type(e).__name__}: {e}"

    def stop(self, drain: bool = True) -> None:
        """Ends :meth:`run_forever`: after the requests in flight finish (``drain``), or at
        once, cancelling them."""
        if not drain:
            for r in list(self.scheduler.running) + list(self.scheduler.waiting):
                r.cancelled = True
        with self._wake:
            self._stop = True
            self._wake.notify()


__all__ = ["Engine", "EngineConfig", "QueueFull"]
