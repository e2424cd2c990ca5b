"""What runs in each engine step: requests, the KV page pool, and the scheduler (host logic,
no JAX: testable on its own).

A request is admitted from the waiting queue when a sequence slot is free and the pool can
promise the pages of its prompt and its first sampled token; it then holds only the pages its
tokens fill, allocated as it grows, and pages past its promise come from those nobody is
promised. When a decoding request needs a page and its shard has none, the newest request on
that shard is *preempted* (vLLM's recompute preemption): its pages go back (registered prompt
pages stay cached, idle), it returns to the front of the waiting queue, and when admitted
again it prefills its prompt and the tokens it had generated, and goes on from there (the
same tokens: a request's draws are keyed by its seed and the position). The oldest request
on a shard is never preempted by a newer one, and every request fits a shard alone (checked
when it is added), so every request finishes. A step that preempted admits nobody (what it
freed goes to the requests running), and admission keeps back a share of the running
requests' growth (:data:`RESERVE`). With ``preemption=False`` a request is admitted only when
the pool can promise its whole length (prompt + ``max_tokens``, capped at the model's
positions), and growth never needs a page it was not promised. A request's pages go back
the moment it finishes or is cancelled.

The pool (:mod:`.pages`) is split into ``shards`` (one per token shard of the mesh: each device
keeps and writes only its own sequences' pages), and a request lives on one shard, chosen at
admission: the one holding the longest cached prefix of its prompt (the prefix cache), then
the one with the fewest running requests, that can promise its pages. A cached prefix is not
prefilled again.

Each step has a token budget (chunked prefill, Sarathi-Serve / vLLM v1 style): first one token
for every decoding request, then prefill chunks (at most ``chunk`` tokens each) of the
requests still in their prompt, oldest first, until the budget is spent. Decode latency stays
bounded when a long prompt arrives, and a step mixes both kinds of tokens.

Scheduling runs one step ahead of the tokens (sglang's overlap scheduler, vLLM's async
scheduling): :meth:`Scheduler.schedule` moves each request on as if the step it just planned
had run, with the token that step samples *pending* (its value still on the device), so the
next step can be planned and launched before this one's tokens are read. A pending token is
fed from the device (the engine passes it from one step's output to the next step's input);
:meth:`Scheduler.advance` later resolves it. What is known ahead (``max_tokens``, the model's
last position) stops a request from being scheduled past its end; a stop id is only known when
its token is read, so such a request may have one more step's row computed and thrown away.
A preempted request is admitted again only once its pending tokens are read (it is prefilled
from the host's tokens, on whichever shard takes it).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import threading
from typing import Callable

from moe_relayfree_models.serving.pages import PagePool

FINISHED = ("stop", "length", "abort", "error")


class QueueFull(RuntimeError):
    """The waiting queue is at its bound: the caller should retry later."""


# With preemption, admission keeps back this share of the pages the running requests may
# still grow into (sglang's "new token ratio"): it starts at RESERVE[0], falls by RESERVE[2]
# each step to RESERVE[1] while nothing is preempted (requests that stop early leave room to
# admit more), and goes back to RESERVE[0] at a preemption (requests that run long make
# admission careful again). Without it, 4 slots per device over a pool of 1.8 requests at
# full length preempted 193 times in a run and took 1.19x as long as whole-length promises
# (docs/benchmarks.md).
RESERVE = (0.7, 0.1, 0.002)

# Most top log-probabilities a request may ask for (OpenAI's chat API: 20); every step that
# computes them computes this many.
MAX_LOGPROBS = 20


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per request: temperature 0 is greedy; top_k 0 and top_p 1 turn those cuts off; seed fixes
    the draws (None: the engine picks one); logprobs: each token's log-probability and this
    many of the most likely ones (None: none)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature < float("inf")):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0, got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**32):
            raise ValueError(f"seed must be an int in [0, 2**32), got {self.seed!r}")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(
                self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an int in [0, {MAX_LOGPROBS}], got "
                             f"{self.logprobs!r}")


Listener = Callable[["Request", list, "str | None"], None]


@dataclasses.dataclass(eq=False)
class Request:
    """One completion. ``listener(request, new_token_ids, finish_reason)`` is called from the
    engine's thread after every step that gave it tokens, and once with its finish reason.
    ``logprobs``: per output token (where its sampling asked), ``(its log-probability, the top
    ids, theirs)``."""

    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop_ids: frozenset = frozenset()
    listener: Listener | None = None
    id: int = -1
    output: list[int] = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)
    computed: int = 0  # positions in the cache
    recomputed: int = 0  # its output tokens prefilled again after a preemption
    preemptions: int = 0
    pages: list[int] = dataclasses.field(default_factory=list)
    page_keys: list[int] = dataclasses.field(default_factory=list)  # its registered pages'
    prompt_keys: list | None = None  # the prefix cache's keys of its full prompt pages
    cached_tokens: int = 0  # prompt tokens it took from the prefix cache
    promised: int = 0  # pages the pool keeps for it
    shard: int = 0  # the pool shard (device) holding its pages
    finish_reason: str | None = None
    cancelled: bool = False
    arrival: float = 0.0
    last_token_at: float = 0.0  # when its latest token was handed to it (metrics)
    timed_end: bool = False  # its end-to-end latency observed (metrics)
    pending: int = 0  # tokens sampled by steps already launched, not yet read back

    @property
    def tokens(self) -> list[int]:
        """The prompt and the tokens read back so far."""
        return self.prompt + self.output

    @property
    def length(self) -> int:
        """Its positions once the steps launched so far have run (pending tokens included)."""
        return len(self.prompt) + len(self.output) + self.pending

    @property
    def prefill_end(self) -> int:
        """Positions fed as a prefill: its prompt, and after a preemption also the tokens it
        had generated (recomputed)."""
        return len(self.prompt) + self.recomputed

    @property
    def prefilling(self) -> bool:
        return self.computed < self.prefill_end


@dataclasses.dataclass(frozen=True)
class Work:
    """One request's share of a step: its tokens ``[start, start + count)`` are fed, and
    ``samples``: whether the step's last row gives the request a new token (the last prompt
    chunk, or a decode token)."""

    request: Request
    start: int
    count: int
    samples: bool

    @property
    def chunk(self) -> bool:
        """Whether it feeds prefill tokens (a chunk of the prompt, or of a preempted request's
        tokens being recomputed), not a decode token."""
        return self.start < self.request.prefill_end


class Scheduler:
    """The waiting queue (bounded: :class:`QueueFull` past ``max_waiting``) and the running
    requests (at most ``max_seqs``, and ``ceil(max_seqs / shards)`` per pool shard), and each
    step's :class:`Work` under ``max_step_tokens``; ``preemption``: admit on the prompt's
    pages and preempt when pages run out, or promise each request's whole length;
    ``reserve``: (start, floor, fall per step) of the share of the running requests' growth
    admission keeps back, with preemption (:data:`RESERVE`)."""

    def __init__(self, pool: PagePool, *, max_seqs: int, max_step_tokens: int, chunk: int,
                 max_positions: int, max_waiting: int = 256, preemption: bool = True,
                 reserve: tuple[float, float, float] = RESERVE):
        if not 1 <= chunk <= max_step_tokens or max_seqs > max_step_tokens:
            raise ValueError("need 1 <= chunk <= max_step_tokens and max_seqs <= max_step_tokens")
        self.pool = pool
        self.max_seqs, self.max_step_tokens, self.chunk = max_seqs, max_step_tokens, chunk
        self.max_positions, self.max_waiting = max_positions, max_waiting
        self.preemption, self.reserve = preemption, reserve
        self.reserve_share = reserve[0]
        self.preemptions = 0  # requests preempted so far
        self.slots_per_shard = -(-max_seqs // pool.shards)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self._ids = itertools.count()
        self.lock = threading.Lock()

    def _length(self, r: Request) -> int:
        """``r``'s positions when it has all its tokens."""
        return min(len(r.prompt) + r.max_tokens, self.max_positions)

    def _promise(self, r: Request) -> int:
        """Positions whose pages ``r`` is promised at admission: its prefill and the position
        of its first sampled token (with preemption), or its whole length."""
        return min(r.prefill_end + 1, self._length(r)) if self.preemption else self._length(r)

    def add(self, request: Request) -> Request:
        """Queues ``request`` (its length already checked against the model's positions)."""
        length = self._length(request)
        if self.pool.pages_for(length) > self.pool.per_shard - 1:
            raise ValueError(f"a request of {length} positions needs more KV pages than the "
                             f"pool has ({self.pool.per_shard - 1} of {self.pool.page_size} per "
                             f"shard)")
        with self.lock:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are waiting")
            request.id = next(self._ids)
            self.waiting.append(request)
        return request

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Work]:
        """Finishes cancelled requests, plans the decode tokens (preempting where pages run
        out), admits waiting requests, plans prefill chunks, and returns this step's work;
        each request moves on as if the step had run (its sampled token pending)."""
        with self.lock:
            for r in [r for r in self.running if r.cancelled] + [
                    r for r in self.waiting if r.cancelled]:
                self.finish(r, "abort")
            preempted = self.preemptions
            self.reserve_share = max(self.reserve[1], self.reserve_share - self.reserve[2])
            budget = self.max_step_tokens
            work = []
            for r in list(self.running):  # decode tokens first, oldest first: one each
                if r in self.running and not r.prefilling and not self._ends_ahead(r):
                    if self._room(r):
                        work.append(Work(r, r.length - 1, 1, True))
                        budget -= 1
            if self.preemptions == preempted:
                self._admit()
        for r in self.running:  # then prefill chunks, oldest first
            if r.prefilling and budget > 0:
                count = min(self.chunk, r.prefill_end - r.computed, budget)
                work.append(Work(r, r.computed, count, r.computed + count == r.prefill_end))
                budget -= count
        for w in work:
            self.pool.grow(w.request, w.start + w.count)
            w.request.computed = w.start + w.count
            w.request.pending += w.samples
            if w.chunk:  # after this step's admissions: later steps may read them
                self.pool.register(w.request, w.request.computed)
        return work

    def _growth(self, r: Request) -> int:
        """Pages ``r`` may still need past those it holds and is promised."""
        return max(0, self.pool.pages_for(self._length(r)) - len(r.pages) - r.promised)

    def _admit(self) -> None:
        """Waiting requests into free slots, first come first served, while the pool can
        promise their pages (and, with preemption, keep back the reserve's share of every
        request's growth on the shard); a preempted request waits for its pending tokens."""
        share = self.reserve_share if self.preemption else 0.0
        kept = [0.0] * self.pool.shards
        for r in self.running:
            kept[r.shard] += share * self._growth(r)
        while self.waiting and len(self.running) < self.max_seqs:
            r = self.waiting[0]
            if r.pending:
                break
            r.recomputed = len(r.output)
            pages = self.pool.pages_for(self._promise(r))
            grows = share * (self.pool.pages_for(self._length(r)) - pages)
            place = self._shard_for(r, pages, [math.ceil(k + grows) for k in kept])
            if place is None:  # first come, first served: the head waits for pages
                break
            self.waiting.popleft()
            cached = r.cached_tokens
            self.pool.admit(r, self._promise(r), *place)
            if r.preemptions:  # what its answer reports is its first admission's
                r.cached_tokens = cached
            self.running.append(r)
            kept[r.shard] += grows

    def _room(self, r: Request) -> bool:
        """Hands decoding ``r`` the page of its next position, preempting the newest requests
        on its shard while the shard has no page nobody is promised; False if ``r`` itself
        was the newest (it is preempted)."""
        while (self.pool.pages_for(r.length) > len(r.pages) + r.promised
               and self.pool.available(r.shard) < 1):
            victim = next(v for v in reversed(self.running) if v.shard == r.shard)
            self._preempt(victim)
            if victim is r:
                return False
        self.pool.grow(r, r.length)
        return True

    def _preempt(self, r: Request) -> None:
        """``r``'s pages back and ``r`` to the front of the waiting queue, to be prefilled
        again with the tokens it has (its pending ones once read)."""
        self.pool.release(r)
        r.computed = 0
        r.preemptions += 1
        self.preemptions += 1
        self.running.remove(r)
        self.waiting.appendleft(r)
        self.reserve_share = self.reserve[0]

    def _ends_ahead(self, r: Request) -> bool:
        """Whether ``r``'s pending token is its last (``max_tokens`` or the model's last
        position): no step is planned for it, and reading that token finishes it."""
        return r.pending > 0 and (len(r.output) + r.pending >= r.max_tokens
                                  or r.length >= self.max_positions)

    def _shard_for(self, request: Request, pages: int,
                   kept: list[int]) -> tuple[int, list[int]] | None:
        """Where a new request of ``pages`` pages goes (the shard, and the cached pages of its
        prompt's prefix there): a free slot and the pages with ``kept[j]`` more left over, the
        longest cached prefix first, then the fewest running requests, then the most pages
        to promise; None if none can take it."""
        running = [0] * self.pool.shards
        for r in self.running:
            running[r.shard] += 1
        fits = []
        for j in range(self.pool.shards):
            shared = self.pool.match(request, j)
            if running[j] < self.slots_per_shard and self.pool.can_promise(pages + kept[j], j,
                                                                           shared):
                fits.append((j, shared))
        return min(fits, key=lambda f: (-len(f[1]), running[f[0]], -len(self.pool.free[f[0]])),
                   default=None)

    def fail_all(self) -> None:
        """Ends every request, running and waiting, with "error" (a step failed)."""
        with self.lock:
            for r in list(self.running):
                self.finish(r, "error")
            for r in list(self.waiting):
                self.finish(r, "error")
            self.pool.forget()  # the failed step's pages hold no known rows

    def _notify(self, r: Request, tokens: list, reason: str | None) -> None:
        if r.listener is not None:
            r.listener(r, tokens, reason)

    def finish(self, r: Request, reason: str) -> None:
        r.finish_reason = reason
        self.pool.release(r)
        if r in self.running:
            self.running.remove(r)
        elif r in self.waiting:  # a cancel, or a preempted request's pending token
            self.waiting.remove(r)
        self._notify(r, [], reason)

    def advance(self, work: list[Work], sampled: list[int], logprobs: list | None = None) -> None:
        """After a step (``work`` as :meth:`schedule` returned it, ``sampled`` its tokens
        read back, ``logprobs`` theirs where asked): a request whose last token was fed gets
        its sampled token, and finishes at a stop id (not kept), ``max_tokens`` or the model's
        last position. A request that finished meanwhile (a stop id read from the step before,
        a cancel) ignores it."""
        for i, (w, token) in enumerate(zip(work, sampled)):
            r = w.request
            if not w.samples:
                continue
            r.pending -= 1
            if r.finish_reason is not None:
                continue
            if token in r.stop_ids:
                self.finish(r, "stop")
                continue
            r.output.append(int(token))
            if logprobs is not None and logprobs[i] is not None:
                r.logprobs.append(logprobs[i])
            if len(r.output) >= r.max_tokens or len(r.tokens) >= self.max_positions:
                self._notify(r, [int(token)], None)
                self.finish(r, "length")
            else:
                self._notify(r, [int(token)], None)


__all__ = ["FINISHED", "MAX_LOGPROBS", "RESERVE", "QueueFull", "Request", "SamplingParams", "Scheduler", "Work"]
