"""The serving engine: continuous batching over a paged KV cache.

Each :meth:`Engine.step` asks the :class:`~.scheduler.Scheduler` for this step's work, lays the
tokens out (:class:`~moe_relayfree_models.paged.StepBatch`), runs ONE jitted forward over the
flat batch (decode tokens of running requests and prefill chunks of new ones together), picks
each request's next token with its own sampling settings, and hands the tokens back. Shapes
come from buckets (tokens ``T`` and pages per sequence ``P`` rounded up to powers of two; ``Q``
query rows 1 for a decode-only step, ``chunk`` otherwise), all compiled by
:meth:`Engine.warm_up`, so serving compiles nothing.

Slots come in one block per token shard of the mesh (``S = D * slots per shard``): a request's
slot is in the block of the pool shard holding its pages, so each device attends for its own
requests from its own pages (:mod:`moe_relayfree_models.paged`).

Each step's MoE layers choose their schedule from that step's tokens per rank
(:func:`moe_relayfree.resolve`); :attr:`Engine.metrics` counts the steps of each.

The host works one step ahead of the device (sglang's overlap scheduler, vLLM's async
scheduling): :meth:`Engine.step` plans and launches step ``k + 1`` (its decode tokens taken on
the device from step ``k``'s sampled tokens) before it reads step ``k``'s tokens back, so the
scheduling, the layout and the hand-over of tokens to requests run while the device computes.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import moe_relayfree as mr
from moe_relayfree_models.generation import check_context
from moe_relayfree_models.paged import init_pages
from moe_relayfree_models.serving.plan import STEP, STOP, Plan, PlanChannel
from moe_relayfree_models.serving.metrics import Metrics
from moe_relayfree_models.serving.pages import PagePool
from moe_relayfree_models.serving.scheduler import (QueueFull, Request, SamplingParams, Scheduler,
                                                    Work)
from moe_relayfree_models.serving.step import pack, step_program


class Flight(NamedTuple):
    """A step launched and not yet read back: its work, each item's output slot, its tokens
    ``[max_slots]`` on the devices, and its log-probabilities where a request asked."""

    work: list
    slots: np.ndarray
    tokens: jax.Array
    logprobs: tuple | None


def _pow2(n: int, floor: int = 1) -> int:
    return max(floor, 1 << max(0, (n - 1).bit_length()))


def _powers(base: int, top: int) -> list[int]:
    """``1, base, base**2, ...`` below ``top``, then ``top``: a bucket ladder."""
    out = [1]
    while out[-1] * base < top:
        out.append(out[-1] * base)
    return sorted(set(out) | {top})


def _bucket(n: int, ladder: list[int]) -> int:
    """The smallest rung of ``ladder`` holding ``n``."""
    return next(b for b in ladder if b >= n)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """max_seqs: sequence slots per step; max_step_tokens: the step's token budget; chunk:
    the largest prefill chunk of one request in a step; page_size: KV rows per page;
    num_pages: the pool, over all devices (default: every slot at full length, plus one
    scratch page per token shard);
    max_waiting: the waiting queue's bound; max_model_len: the longest request served, prompt
    and completion (default: the model's ``max_position_embeddings``; a long-context model's
    163,840 positions would size the default pool for every slot at that length);
    chunk_buckets: the query-row sizes a step with chunks takes (``chunk``, ``chunk / 2``, ...,
    this many; fewer: fewer shapes to compile, more padding rows when prompts are short);
    prefix_caching: prompts that start with pages another request filled take them instead of
    prefilling them again (:mod:`.pages`); preemption: admit a request on its prompt's pages
    and, when a decoding request finds no page, preempt the newest on its shard to be
    recomputed later (vLLM's), or (False) admit only requests whose whole length the pool can
    promise (:mod:`.scheduler`; with the default pool, every slot at full length, no request
    is ever preempted)."""

    max_seqs: int = 16
    max_step_tokens: int = 256
    chunk: int = 64
    page_size: int = 16
    num_pages: int | None = None
    max_waiting: int = 256
    max_model_len: int | None = None
    chunk_buckets: int = 3
    prefix_caching: bool = True
    preemption: bool = True


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
        # the buckets of a step's shape (see _shape)
        self._decode_pages = _powers(2, self.max_pages)
        self._chunk_pages = _powers(4, self.max_pages)
        if config.chunk_buckets < 1:
            raise ValueError(f"chunk_buckets must be >= 1, got {config.chunk_buckets}")
        self._chunk_rows = sorted({-(-config.chunk // (1 << i))
                                   for i in range(config.chunk_buckets)})
        lay = model.dispatch.layout
        self.shards = lay.num_token_shards
        self.slots_per_shard = -(-config.max_seqs // self.shards)
        num_pages = config.num_pages or self.shards * (self.slots_per_shard * self.max_pages + 1)
        self.pool = PagePool(num_pages, config.page_size, self.shards, config.prefix_caching)
        self.scheduler = Scheduler(self.pool, max_seqs=config.max_seqs,
                                   max_step_tokens=config.max_step_tokens, chunk=config.chunk,
                                   max_positions=limit, max_waiting=config.max_waiting,
                                   preemption=config.preemption)
        # each device holds its shard's pages only (made there, not copied from one device)
        self.pages = jax.jit(lambda: init_pages(cfg, self.pool.num_pages, config.page_size,
                                                model.compute_dtype),
                             out_shardings=NamedSharding(lay.mesh, lay.tokens))()
        self.graphdef, self.state = nnx.split(model)
        self._replicated = NamedSharding(lay.mesh, PartitionSpec())
        self.processes = jax.process_count()
        # the latest step's sampled tokens, one slot each, on the devices (the next step reads
        # its pending tokens there), and the step launched but not yet read back
        self.max_slots = self.shards * 2 * _pow2(self.slots_per_shard)
        # placed as the step program leaves its output (split by shard; whole with several
        # processes), or the first step after warm-up would compile its shape again
        self._previous = jax.jit(lambda: jnp.zeros(self.max_slots, jnp.int32), out_shardings=(
            self._replicated if self.processes > 1 else NamedSharding(lay.mesh, lay.tokens)))()
        self._in_flight: Flight | None = None
        # several processes: process 0 schedules and sends each step's plan; the others follow
        self._plans, self._closed = None, False
        if self.processes > 1:
            self._plans = PlanChannel()
        self.metrics = Metrics()
        self._seeds = itertools.count(1)
        self._wake = threading.Condition()
        self._stop = False
        self.last_error: str | None = None  # the last step that failed, for /health
        self.last_shape: tuple[int, int, int, int] | None = None  # the last step's (D, C, Q, P)

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
        """(D decode slots and C chunk slots per shard, Q rows per chunk slot, P pages) of the
        step's program (:class:`~moe_relayfree_models.paged.StepBatch`). A decode-only step
        has no chunk slots and the busiest shard's decode tokens (rounded up to a power of
        two) as ``D``; a step with prefill chunks has a decode slot for every sequence slot,
        and ``C`` the busiest shard's chunks rounded up, of ``Q`` rows: the longest chunk
        rounded up to ``chunk``, ``chunk / 2`` or ``chunk / 4`` (``chunk_buckets``; a wave of
        short prompts would otherwise carry mostly padding rows through every layer). ``P``:
        the most pages a sequence holds, rounded up to a power of two (decode steps, the most
        frequent) or of four (steps with chunks: their shape has one more dimension, and
        padded pages cost them less than padded query rows)."""
        held = max(len(w.request.pages) for w in work)
        decode = np.zeros(self.shards, np.int64)
        chunks = np.zeros(self.shards, np.int64)
        for w in work:
            (chunks if w.chunk else decode)[w.request.shard] += 1
        if not chunks.any():
            return _pow2(int(decode.max())), 0, 0, _bucket(held, self._decode_pages)
        q = _bucket(max(w.count for w in work if w.chunk), self._chunk_rows)
        return (_pow2(self.slots_per_shard), _pow2(int(chunks.max())), q,
                _bucket(held, self._chunk_pages))

    def _layout(self, work: list[Work], d: int, c: int, q: int, p: int, flight=None):
        """:func:`~.step.pack` for this engine; ``flight``: the step in flight, whose sampled
        tokens feed the requests' pending ones."""
        pending = {}
        if flight is not None:
            pending = {w.request: s for w, s in zip(flight.work, flight.slots) if w.samples}
        return pack(work, (d, c, q, p), self.shards, self.max_slots, pending)

    def _execute(self, shape, packed: np.ndarray):
        """Launches the step program of ``shape`` on ``packed`` inputs (on every process
        alike) -> its tokens ``[max_slots] int32`` (a device array, also the next step's
        ``previous``) and log-probabilities (:func:`~.step.token_logprobs`)."""
        # placed on the whole mesh, as the parameters and pages are: host arrays committed to
        # one device made every step move them first (a decode step took 2.5x as long)
        if self.processes == 1:
            packed = jax.device_put(packed, self._replicated)
        else:
            packed = jax.make_array_from_callback(packed.shape, self._replicated,
                                                  lambda index: packed[index])
        out, self.pages, logprobs = step_program(self.graphdef, shape, self.state, packed,
                                                  self._previous, self.pages, self.processes > 1)
        self._previous = out
        return out, logprobs

    def _launch(self, work: list[Work], shape, flight) -> None:
        """Launches the step (sending its plan to the other processes first) and keeps it as
        the step in flight; ``flight``: the step launched before it, not yet read back."""
        packed, slots = self._layout(work, *shape, flight=flight)
        if self._plans is not None:
            self._plans.send(Plan(STEP, shape, packed))
        out, logprobs = self._execute(shape, packed)
        out.copy_to_host_async()  # on its way while the host goes on
        if not any(w.samples and w.request.sampling.logprobs is not None for w in work):
            logprobs = None  # nobody asked: the program's zeros stay on the devices
        else:
            for a in logprobs:
                a.copy_to_host_async()
        self._in_flight = Flight(work, slots, out, logprobs)

    def _read_back(self, flight: Flight) -> None:
        """Waits for a launched step's tokens and hands them to its requests."""
        sampled = np.asarray(flight.tokens)[flight.slots]
        self.metrics.generated_tokens += sum(1 for w in flight.work if w.samples)
        logprobs = None
        if flight.logprobs is not None:
            chosen, ids, top = (np.asarray(a)[flight.slots] for a in flight.logprobs)
            logprobs = [(float(chosen[i]), ids[i, :n].tolist(), top[i, :n].tolist())
                        if (n := w.request.sampling.logprobs) is not None else None
                        for i, w in enumerate(flight.work)]
        before = {w.request: len(w.request.output) for w in flight.work if w.samples}
        self.scheduler.advance(flight.work, [int(t) for t in sampled], logprobs)
        self.metrics.handed(before, time.monotonic())

    def follow(self) -> None:
        """A process other than 0: runs the steps process 0 sends, until it sends stop."""
        if self._plans is None or jax.process_index() == 0:
            raise RuntimeError("follow() is for the processes other than 0 of a multi-process job")
        while True:
            plan = self._plans.receive()
            if plan.kind == STOP:
                return
            jax.block_until_ready(self._execute(plan.shape, plan.packed))

    def step(self) -> int:
        """Plans and launches the next step, then reads back the step launched before it (its
        tokens reach their requests now); returns the tokens the new step feeds (0: none was
        launched, only the one in flight read). Process 0 only, in a multi-process job (the
        others :meth:`follow`)."""
        start = time.perf_counter()
        work = self.scheduler.schedule()
        flight = self._in_flight  # the new step's layout reads its pending tokens' slots there
        self._in_flight = None
        fed = 0
        if work:
            shape = self._shape(work)
            self._launch(work, shape, flight)
            m = self.metrics
            fed = sum(w.count for w in work)
            self.last_shape = shape
            m.steps[self.moe_schedule(self.step_rows(shape)) or "none"] += 1
            m.prompt_tokens += sum(w.count for w in work if w.chunk)
        if flight is not None:
            self._read_back(flight)
        self.metrics.step_seconds += time.perf_counter() - start
        return fed

    def has_work(self) -> bool:
        """Requests waiting or running, or a step still to read back."""
        return self.scheduler.has_work() or self._in_flight is not None

    def step_rows(self, shape: tuple[int, int, int, int]) -> int:
        """The flat rows ``T`` of a step of ``shape`` (padding included): what its MoE layers
        choose their schedule from."""
        d, c, q, _ = shape
        return self.shards * (d + c * q)

    def moe_schedule(self, tokens: int) -> str | None:
        """The schedule this step's MoE layers run for ``tokens`` flat tokens (None: a baseline
        dispatch, which has none)."""
        return mr.resolve(self.model.dispatch, tokens, self.model.cfg.k).schedule

    def warm_up(self) -> int:
        """Compiles every step shape (:meth:`step_shapes`) before serving; returns how many.
        Runs them on scratch pages only (the other processes with it)."""
        shapes = sorted(self.step_shapes())
        for shape in shapes:
            packed, _ = self._layout([], *shape)
            if self._plans is not None:
                self._plans.send(Plan(STEP, shape, packed))
            jax.block_until_ready(self._execute(shape, packed))
        return len(shapes)

    def step_shapes(self) -> set[tuple[int, int, int, int]]:
        """Every ``(D, C, Q, P)`` a step can take (:meth:`_shape`): decode slots and chunk
        slots per shard in powers of two up to the slots per shard, chunk rows ``chunk``,
        ``chunk / 2`` and ``chunk / 4`` (``chunk_buckets``), pages in powers of two (decode)
        or four (steps with chunks) up to the longest request's."""
        per_shard = _powers(2, _pow2(self.slots_per_shard))
        decode = {(d, 0, 0, p) for d in per_shard for p in self._decode_pages}
        mixed = {(_pow2(self.slots_per_shard), c, q, p) for c in per_shard
                 for q in self._chunk_rows for p in self._chunk_pages}
        return decode | mixed

    # --- the loop a server runs -----------------------------------------------------------

    def run_forever(self) -> None:
        """Steps while there is work, waits otherwise, until :meth:`stop` (then tells the other
        processes, if any, to stop following)."""
        while True:
            with self._wake:
                while not self._stop and not self.has_work():
                    self._wake.wait()
                if self._stop and not self.has_work():
                    self.close()
                    return
            try:
                self.step()
            except Exception as e:  # every request gets an answer, and the loop goes on
                self._in_flight = None
                self.scheduler.fail_all()
                self.last_error = f"{type(e).__name__}: {e}"

    def close(self) -> None:
        """Process 0 of a job: tells the other processes to stop following (once)."""
        if self._plans is not None and not self._closed:
            self._closed = True
            self._plans.send(Plan(STOP))

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
