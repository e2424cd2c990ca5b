"""What runs in each engine step: requests, the KV page pool, and the scheduler (host logic,
no JAX: testable on its own).

A request is admitted from the waiting queue when a sequence slot is free and the pool can
promise the pages of its whole length (prompt + ``max_tokens``, capped at the model's
positions); it then holds only the pages its tokens fill, allocated as it grows, so a request
of 100 tokens holds ``ceil(100 / page)`` pages, and growth never fails (no preemption). Its
pages go back the moment it finishes or is cancelled.

Each step has a token budget (chunked prefill, Sarathi-Serve / vLLM v1 style): first one token
for every decoding request, then prefill chunks (at most ``chunk`` tokens each) of the
requests still in their prompt, oldest first, until the budget is spent. Decode latency stays
bounded when a long prompt arrives, and a step mixes both kinds of tokens.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
from typing import Callable

FINISHED = ("stop", "length", "abort", "error")


class QueueFull(RuntimeError):
    """The waiting queue is at its bound: the caller should retry later."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per request: temperature 0 is greedy; top_k 0 and top_p 1 turn those cuts off; seed fixes
    the draws (None: the engine picks one)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

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


Listener = Callable[["Request", list, "str | None"], None]


@dataclasses.dataclass(eq=False)
class Request:
    """One completion. ``listener(request, new_token_ids, finish_reason)`` is called from the
    engine's thread after every step that gave it tokens, and once with its finish reason."""

    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop_ids: frozenset = frozenset()
    listener: Listener | None = None
    id: int = -1
    output: list[int] = dataclasses.field(default_factory=list)
    computed: int = 0  # positions in the cache
    pages: list[int] = dataclasses.field(default_factory=list)
    promised: int = 0  # pages the pool keeps for it
    finish_reason: str | None = None
    cancelled: bool = False
    arrival: float = 0.0

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.prompt)


class PagePool:
    """Pages ``1 .. num_pages - 1`` (page 0 is the step's scratch page), handed out one at a time
    against promises made at admission."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2 or page_size < 1:
            raise ValueError("the pool needs at least 2 pages (one is scratch) of >= 1 rows")
        self.page_size = page_size
        self.num_pages = num_pages
        self.free = list(range(num_pages - 1, 0, -1))
        self.promised = 0  # pages promised and not yet handed out

    @property
    def in_use(self) -> int:
        return self.num_pages - 1 - len(self.free)

    def pages_for(self, positions: int) -> int:
        return -(-positions // self.page_size)

    def can_promise(self, pages: int) -> bool:
        return self.promised + pages <= len(self.free)

    def admit(self, request: Request, positions: int) -> None:
        request.promised = self.pages_for(positions)
        self.promised += request.promised

    def grow(self, request: Request, positions: int) -> None:
        """Hands ``request`` the pages its first ``positions`` positions need."""
        while len(request.pages) < self.pages_for(positions):
            if request.promised <= 0:
                raise RuntimeError("internal: a request grew past the pages promised to it")
            request.pages.append(self.free.pop())
            request.promised -= 1
            self.promised -= 1

    def release(self, request: Request) -> None:
        self.free.extend(reversed(request.pages))
        self.promised -= request.promised
        request.pages, request.promised = [], 0


@dataclasses.dataclass(frozen=True)
class Work:
    """One request's share of a step: its tokens ``[start, start + count)`` are fed."""

    request: Request
    start: int
    count: int

    @property
    def samples(self) -> bool:
        """Whether this step's last token gives the request a new token."""
        return self.start + self.count == len(self.request.tokens)


class Scheduler:
    """The waiting queue (bounded: :class:`QueueFull` past ``max_waiting``) and the running
    requests (at most ``max_seqs``), and each step's :class:`Work` under ``max_step_tokens``."""

    def __init__(self, pool: PagePool, *, max_seqs: int, max_step_tokens: int, chunk: int,
                 max_positions: int, max_waiting: int = 256):
        if not 1 <= chunk <= max_step_tokens or max_seqs > max_step_tokens:
            raise ValueError("need 1 <= chunk <= max_step_tokens and max_seqs <= max_step_tokens")
        self.pool = pool
        self.max_seqs, self.max_step_tokens, self.chunk = max_seqs, max_step_tokens, chunk
        self.max_positions, self.max_waiting = max_positions, max_waiting
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self._ids = itertools.count()
        self.lock = threading.Lock()

    def add(self, request: Request) -> Request:
        """Queues ``request`` (its length already checked against the model's positions)."""
        length = min(len(request.prompt) + request.max_tokens, self.max_positions)
        if self.pool.pages_for(length) > self.pool.num_pages - 1:
            raise ValueError(f"a request of {length} positions needs more KV pages than the "
                             f"pool has ({self.pool.num_pages - 1} of {self.pool.page_size})")
        with self.lock:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are waiting")
            request.id = next(self._ids)
            self.waiting.append(request)
        return request

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Work]:
        """Finishes cancelled requests, admits waiting ones, and returns this step's work."""
        with self.lock:
            for r in [r for r in self.running if r.cancelled]:
                self.finish(r, "abort")
            for r in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(r)
                self._notify(r, [], "abort")
            while self.waiting and len(self.running) < self.max_seqs:
                r = self.waiting[0]
                length = min(len(r.prompt) + r.max_tokens, self.max_positions)
                if not self.pool.can_promise(self.pool.pages_for(length)):
                    break
                self.waiting.popleft()
                self.pool.admit(r, length)
                self.running.append(r)
        budget = self.max_step_tokens
        work = []
        for r in self.running:  # decode tokens first: one each
            if not r.prefilling:
                work.append(Work(r, len(r.tokens) - 1, 1))
                budget -= 1
        for r in self.running:  # then prefill chunks, oldest first
            if r.prefilling and budget > 0:
                count = min(self.chunk, len(r.prompt) - r.computed, budget)
                work.append(Work(r, r.computed, count))
                budget -= count
        for w in work:
            self.pool.grow(w.request, w.start + w.count)
        return work

    def fail_all(self) -> None:
        """Ends every request, running and waiting, with "error" (a step failed)."""
        with self.lock:
            for r in list(self.running):
                self.finish(r, "error")
            while self.waiting:
                self._notify(self.waiting.popleft(), [], "error")

    def _notify(self, r: Request, tokens: list, reason: str | None) -> None:
        if r.listener is not None:
            r.listener(r, tokens, reason)

    def finish(self, r: Request, reason: str) -> None:
        r.finish_reason = reason
        self.pool.release(r)
        if r in self.running:
            self.running.remove(r)
        self._notify(r, [], reason)

    def advance(self, work: list[Work], sampled: list[int]) -> None:
        """After a step: the fed tokens are in the cache; a request whose last token was fed
        gets its sampled token, and finishes at a stop id (not kept), ``max_tokens`` or the
        model's last position."""
        for w, token in zip(work, sampled):
            r = w.request
            r.computed = w.start + w.count
            if not w.samples or r.finish_reason is not None:
                continue
            if token in r.stop_ids:
                self.finish(r, "stop")
                continue
            r.output.append(int(token))
            if len(r.output) >= r.max_tokens or len(r.tokens) >= self.max_positions:
                self._notify(r, [int(token)], None)
                self.finish(r, "length")
            else:
                self._notify(r, [int(token)], None)


__all__ = ["FINISHED", "PagePool", "QueueFull", "Request", "SamplingParams", "Scheduler", "Work"]
