"""The KV page pool, split over the token shards, with a prefix cache (host logic, no JAX).

``shards`` equal ranges of ``num_pages // shards`` pages (shard ``j``'s local page ``i`` is pool
page ``j * per_shard + i``); in each, pages ``1 .. per_shard - 1`` are handed out one at a time
against promises made at admission, and past them while some page is not promised (local
page 0 is that shard's scratch page).

Prefix cache (vLLM's automatic prefix caching, per shard: a request reads only its own
shard's pages). A page full of prompt tokens is registered under a key that chains the keys
of the pages before it, so a key names the whole prefix up to the page's end. A new request
on that shard whose prompt starts with registered pages takes them as they are (shared,
read-only: counted per holder) and starts its prefill after them. A registered page that no
request holds stays *idle*, its rows intact, until its slot is needed: growth takes free
pages first, then idle ones, least recently used first (the deepest page of a prefix first,
so a prefix is evicted from its end). Shared pages are never written: a request shares only
pages that lie wholly before its last prompt token, whose row it computes itself (it gives
the first token's logits). A page is registered in the step that writes it, after that step's
admissions, so the earliest a request can read it is a later step, which the devices run after
(steps run in order). Keys are checked against the stored tokens on a hit: a hash collision
cannot hand over another prefix's rows.
"""

from __future__ import annotations

import collections


class PagePool:
    """Pages per shard, promises, and the prefix cache (``prefix_caching``)."""

    def __init__(self, num_pages: int, page_size: int, shards: int = 1,
                 prefix_caching: bool = False):
        per_shard = num_pages // max(shards, 1)
        if shards < 1 or per_shard < 2 or page_size < 1:
            raise ValueError(f"the pool needs at least 2 pages per shard (one is scratch) of >= 1 "
                             f"rows; got {num_pages} pages of {page_size} over {shards} shards")
        self.page_size, self.shards, self.per_shard = page_size, shards, per_shard
        self.num_pages = per_shard * shards
        self.free = [list(range(per_shard - 1, 0, -1)) for _ in range(shards)]
        self.promised = [0] * shards  # pages promised and not yet handed out, per shard
        self.prefix_caching = prefix_caching
        # per shard (page ids are the shard's own): key -> (page, the key before it, the page's
        # tokens); a registered page's key; how many requests hold it; the registered pages
        # none holds, least recently used first
        self.cached: list[dict] = [{} for _ in range(shards)]
        self.key_of: list[dict] = [{} for _ in range(shards)]
        self.holders: list[collections.Counter] = [collections.Counter() for _ in range(shards)]
        self.idle: list[collections.OrderedDict] = [collections.OrderedDict()
                                                    for _ in range(shards)]
        self.hit_tokens = 0  # prompt tokens served from the cache (not prefilled)

    @property
    def in_use(self) -> int:
        """Pages requests hold (idle cached pages are not counted: any request may take them)."""
        return sum(self.per_shard - 1 - len(f) - len(i) for f, i in zip(self.free, self.idle))

    @property
    def capacity(self) -> int:
        """Pages requests can hold, over all shards (scratch pages not counted)."""
        return self.shards * (self.per_shard - 1)

    @property
    def total_promised(self) -> int:
        return sum(self.promised)

    def pages_for(self, positions: int) -> int:
        return -(-positions // self.page_size)

    def available(self, shard: int = 0) -> int:
        """Pages ``shard`` can still promise: free ones and idle cached ones."""
        return len(self.free[shard]) + len(self.idle[shard]) - self.promised[shard]

    def can_promise(self, pages: int, shard: int = 0, shared=()) -> bool:
        """Whether ``shard`` can take a request of ``pages`` pages that starts with the cached
        pages ``shared``: those cost no new page, but idle ones leave the pages that can be
        promised (:meth:`admit` takes them out of the idle ones)."""
        idle = sum(p in self.idle[shard] for p in shared)
        return pages - len(shared) + idle <= self.available(shard)

    # --- the prefix cache ------------------------------------------------------------------

    def _keys(self, request) -> list[tuple]:
        """(key, parent key, tokens) of each full page of ``request``'s prompt, made once."""
        if request.prompt_keys is None:
            out, parent, n = [], 0, self.page_size
            for i in range(len(request.prompt) // n):
                chunk = tuple(request.prompt[i * n:(i + 1) * n])
                key = hash((parent, chunk))
                out.append((key, parent, chunk))
                parent = key
            request.prompt_keys = out
        return request.prompt_keys

    def match(self, request, shard: int) -> list[int]:
        """The registered pages of ``shard`` that ``request``'s prompt starts with, as many as
        lie wholly before the last token it prefills."""
        if not self.prefix_caching:
            return []
        pages, cache = [], self.cached[shard]
        for key, parent, chunk in self._keys(request)[:(request.prefill_end - 1) // self.page_size]:
            entry = cache.get(key)
            if entry is None or entry[1:] != (parent, chunk):
                break
            pages.append(entry[0])
        return pages

    def register(self, request, tokens: int) -> None:
        """Registers ``request``'s pages that its first ``tokens`` prompt tokens fill (the step
        being planned writes them). A page whose prefix another page already holds stays the
        request's own."""
        if not self.prefix_caching:
            return
        done = len(request.page_keys)
        full = min(tokens, len(request.prompt)) // self.page_size
        cache = self.cached[request.shard]
        for i, (key, parent, chunk) in enumerate(self._keys(request)[done:full], done):
            page = request.pages[i]
            if key not in cache:
                cache[key] = (page, parent, chunk)
                self.key_of[request.shard][page] = key
                self.holders[request.shard][page] += 1
            request.page_keys.append(key)

    def forget(self) -> None:
        """Empties the cache (a step failed: the pages it was to write hold no known rows);
        every idle page goes back to the free list."""
        for shard in range(self.shards):
            self.free[shard].extend(self.idle[shard])
            self.idle[shard].clear()
            self.cached[shard].clear()
            self.key_of[shard].clear()
            self.holders[shard].clear()

    def _evict(self, shard: int) -> int:
        """The least recently used idle page, out of the cache."""
        page, _ = self.idle[shard].popitem(last=False)
        del self.cached[shard][self.key_of[shard].pop(page)]
        return page

    # --- requests ---------------------------------------------------------------------------

    def admit(self, request, positions: int, shard: int = 0, shared: list[int] = ()) -> None:
        """``request`` on ``shard``, with the pages of its whole length promised; ``shared``:
        cached pages it starts with (:meth:`match`), its prefill starts after them."""
        request.shard = shard
        for page in shared:
            self.idle[shard].pop(page, None)
            self.holders[shard][page] += 1
        request.pages = list(shared)
        request.page_keys = [self.key_of[shard][p] for p in shared]
        request.computed = request.cached_tokens = len(shared) * self.page_size
        self.hit_tokens += request.computed
        request.promised = self.pages_for(positions) - len(shared)
        self.promised[shard] += request.promised

    def grow(self, request, positions: int) -> None:
        """Hands ``request`` the pages its first ``positions`` positions need: promised ones
        first, then ones nobody is promised (the scheduler checks there are)."""
        shard = request.shard
        while len(request.pages) < self.pages_for(positions):
            if request.promised > 0:
                request.promised -= 1
                self.promised[shard] -= 1
            elif self.available(shard) < 1:
                raise RuntimeError("internal: a request grew past its promise with no page free")
            request.pages.append(self.free[shard].pop() if self.free[shard] else self._evict(shard))

    def release(self, request) -> None:
        """``request``'s pages back: its own to the free list, registered ones (when no other
        request holds them) to the idle ones, deepest first (evicted first)."""
        shard = request.shard
        holders = self.holders[shard]
        for page in reversed(request.pages):
            if page in self.key_of[shard]:
                holders[page] -= 1
                if holders[page] == 0:
                    del holders[page]
                    self.idle[shard][page] = None
            else:
                self.free[shard].append(page)
        self.promised[shard] -= request.promised
        request.pages, request.promised, request.page_keys = [], 0, []


__all__ = ["PagePool"]
