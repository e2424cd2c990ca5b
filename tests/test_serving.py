"""The serving engine (models/serving): the scheduler and page pool on their own, and the engine's
greedy tokens for concurrent requests of different lengths against generate() of each prompt
alone, for relay-free and the baseline dispatch paths, in float32 and bf16."""

import numpy as np
import pytest

import moe_relayfree as mr
from helpers import computed_once
from moe_relayfree_models.serving.pages import PagePool
from moe_relayfree_models.serving.scheduler import (QueueFull, Request, SamplingParams,
                                                    Scheduler)


def scheduler(pages=9, page=4, **kw):
    opts = dict(max_seqs=2, max_step_tokens=8, chunk=4, max_positions=64)
    opts.update(kw)
    return Scheduler(PagePool(pages, page), **opts)


def test_pages_are_promised_at_admission_and_held_as_the_request_grows():
    """Without preemption: a request is admitted when its whole length can be promised."""
    s = scheduler(preemption=False)
    a = s.add(Request([1] * 6, max_tokens=2))  # 8 positions: 2 pages promised
    b = s.add(Request([2] * 9, max_tokens=22))  # 25 positions: 7 pages; 8 free in all
    work = s.schedule()
    assert s.running == [a] and list(s.waiting) == [b]  # b waits: 2 + 7 > 8 pages
    assert [(w.request, w.start, w.count) for w in work] == [(a, 0, 4)]  # one chunk of 4
    assert len(a.pages) == 1 and s.pool.total_promised == 1  # pages follow the tokens fed
    s.advance(work, [0])
    work = s.schedule()
    assert [(w.start, w.count, w.samples) for w in work] == [(4, 2, True)]
    s.advance(work, [7])
    assert a.output == [7] and len(a.pages) == 2
    work = s.schedule()  # decode: the last token fed, one new one
    assert [(w.start, w.count) for w in work] == [(6, 1)]
    s.advance(work, [9])
    assert a.finish_reason == "length" and a.output == [7, 9]
    assert s.pool.in_use == 0 and s.pool.total_promised == 0  # every page back at once
    s.schedule()
    assert s.running == [b]


def _run(s, *requests, flight=(), token=lambda w: 1):
    """Steps ``s`` (one step ahead, as the engine; ``flight``: the work of a step planned and
    not yet read back) until every request has finished, each sampled token ``token(work)``;
    the work of every step."""
    flight, steps = list(flight), []
    for r in requests:
        s.add(r)
    while s.has_work() or flight:
        work = s.schedule()
        s.advance(flight, [token(w) for w in flight])
        steps.append(flight := work)
    return steps


def _position_tokens(s, *requests):
    """:func:`_run` with a model whose token at position ``p`` is ``1000 + p``."""
    return _run(s, *requests, token=lambda w: 1000 + w.start + w.count)


def test_preemption_recomputes_the_newest_request_when_pages_run_out():
    """8 pages of 4 rows, two requests of 4 and 8 pages at full length: with preemption both
    are admitted on their prompts' pages; when the older one needs a page and none is left,
    the newer is preempted (its pages back, to the front of the queue), admitted again once
    the older is done, prefilled with its prompt and the tokens it had, and finishes with the
    tokens a run without preemption gives (the oldest request is never preempted). Without
    preemption the newer waits for the older's pages. A preempted request cancelled before
    its pending token is read gets no token after its abort. (Admission keeps back no share
    of the running requests' growth here: the next test.)"""
    def run(preemption):
        s = scheduler(preemption=preemption, reserve=(0, 0, 0))
        a, b = Request([1] * 6, max_tokens=10), Request([2] * 9, max_tokens=22)
        steps = _position_tokens(s, a, b)
        assert s.pool.in_use == 0 and s.pool.total_promised == 0 and len(s.pool.free[0]) == 8
        return s, a, b, steps

    s, a, b, steps = run(True)
    assert a.output == [1000 + p for p in range(6, 16)]
    assert b.output == [1000 + p for p in range(9, 31)]
    assert (a.preemptions, b.preemptions, s.preemptions) == (0, 1, 1)
    assert {w.request for w in steps[0]} == {a, b}  # both prefilled in the first step
    # after its preemption b is prefilled again, in chunks from 0 over its prompt and the
    # tokens it had; only the last chunk samples
    again = next(i for i, st in enumerate(steps) if i and any(
        w.request is b and w.start == 0 for w in st))
    chunks = [w for st in steps[again:] for w in st if w.request is b and w.chunk]
    assert 0 < b.recomputed < 22 and [(w.start, w.count) for w in chunks] == [
        (i, min(4, 9 + b.recomputed - i)) for i in range(0, 9 + b.recomputed, 4)]
    assert [w.samples for w in chunks] == [False] * (len(chunks) - 1) + [True]
    s0, a0, b0, steps0 = run(False)
    assert (a0.output, b0.output, s0.preemptions) == (a.output, b.output, 0)
    assert {w.request for w in steps0[0]} == {a0}  # b0 waited for a0's pages
    assert len(steps) < len(steps0)

    s = scheduler(reserve=(0, 0, 0))
    a, b = s.add(Request([1] * 6, max_tokens=10)), s.add(Request([2] * 9, max_tokens=22))
    flight = []
    while not (work := s.schedule()) or not b.preemptions:
        s.advance(flight, [1000 + w.start + w.count for w in flight])
        flight = work
    assert b in s.waiting and b.pending == 1  # the step in flight samples its next token
    b.cancelled = True
    s.schedule()
    s.advance(flight, [7] * len(flight))
    assert b.finish_reason == "abort" and 7 not in b.output and b not in s.waiting


def test_admission_keeps_back_a_share_of_the_running_requests_growth():
    """sglang's new-token ratio: with the default reserve (0.7 of a running request's growth
    kept back) the request of the test above waits instead of being admitted and preempted,
    and gets the same tokens; the share falls each step to its floor and goes back up at a
    preemption."""
    s = scheduler()
    a, b = Request([1] * 6, max_tokens=10), Request([2] * 9, max_tokens=22)
    steps = _position_tokens(s, a, b)
    assert {w.request for w in steps[0]} == {a} and s.preemptions == 0
    assert b.output == [1000 + p for p in range(9, 31)]
    s = scheduler(reserve=(0.5, 0.0, 0.5))  # 0 from the first step: both admitted at once
    a, b = s.add(Request([1] * 6, max_tokens=10)), s.add(Request([2] * 9, max_tokens=22))
    flight, shares, first = [], [], None
    while s.has_work() or flight:
        work = s.schedule()
        first = first or work
        shares.append((s.reserve_share, s.preemptions))
        s.advance(flight, [1000 + w.start + w.count for w in flight])
        flight = work
    assert {w.request for w in first} == {a, b} and s.preemptions == 1
    at = next(i for i, (_, n) in enumerate(shares) if n)
    assert shares[at][0] == 0.5 and shares[at + 1][0] == 0.0 and shares[0] == (0.0, 0)


def test_prefix_cache_shares_full_prompt_pages_and_evicts_the_least_recent():
    """Pages of 4 rows. A prompt that starts with another's first two pages (8 tokens) takes
    them, read-only, and prefills from its 9th token; only pages wholly before the last prompt
    token are shared; two identical prompts admitted in one step share nothing (the pages are
    registered after the step's admissions); finished requests leave their registered pages
    idle, taken back least recently used first (deepest first) when free pages run out; a
    failed step empties the cache; a hash collision hands over nothing."""
    from moe_relayfree_models.serving import pages

    def sched(n=17, shards=1, **kw):
        return Scheduler(PagePool(n, 4, shards, prefix_caching=True), max_seqs=2,
                         max_step_tokens=32, chunk=16, max_positions=64, **kw)

    s = sched()
    head = list(range(10, 18))
    a = Request(head + [1, 2, 3], max_tokens=2)
    _run(s, a)
    assert a.finish_reason == "length" and s.pool.in_use == 0
    idle = sorted(s.pool.idle[0])
    assert len(idle) == 2  # its two full prompt pages, idle, rows intact
    b = Request(head + [4, 5], max_tokens=3)
    s.add(b)
    work = s.schedule()
    assert b.computed == 10 and [(w.start, w.count) for w in work] == [(8, 2)]  # 8 cached
    assert sorted(b.pages[:2]) == idle and not s.pool.idle[0] and s.pool.hit_tokens == 8
    _run(s, flight=work)
    # a prompt of exactly two pages: its second page holds its last token, not shared
    c = Request(head, max_tokens=1)
    s.add(c)
    work = s.schedule()
    assert c.computed == 8 and [(w.start, w.count) for w in work] == [(4, 4)]
    assert s.pool.hit_tokens == 12
    _run(s, flight=work)

    s = sched()
    twins = [Request(head + [1], max_tokens=2) for _ in range(2)]
    s.add(twins[0]), s.add(twins[1])
    work = s.schedule()
    assert [t.computed for t in twins] == [9, 9] and set(twins[0].pages).isdisjoint(twins[1].pages)
    _run(s, flight=work)
    assert s.pool.hit_tokens == 0 and s.pool.in_use == 0

    s = sched(n=7)  # 6 pages: a long request must take an idle one, the deepest first
    _run(s, Request(head + [1], max_tokens=1))
    assert len(s.pool.idle[0]) == 2 and len(s.pool.free[0]) == 4 and s.pool.can_promise(6)
    _run(s, Request([99] * 19, max_tokens=1))  # 5 pages: the 4 free ones and 1 idle one
    assert s.pool.hit_tokens == 0
    again = Request(head + [2], max_tokens=1)
    _run(s, again)
    assert s.pool.hit_tokens == 4  # head's first page is still cached, its second is not

    s = sched()
    _run(s, Request(head + [1], max_tokens=1))
    s.fail_all()
    assert not s.pool.cached[0] and not s.pool.idle[0] and len(s.pool.free[0]) == 16

    s = sched(shards=2)  # 8 pages per shard: the request goes where its prefix is cached
    first = Request(head + [1], max_tokens=1)
    _run(s, first, Request([5] * 9, max_tokens=1))
    again = Request(head + [7], max_tokens=1)
    s.add(again)
    work = s.schedule()
    assert again.shard == first.shard and again.computed == 9  # 8 from the cache, 1 fed
    _run(s, flight=work)

    import pytest as _pytest
    with _pytest.MonkeyPatch.context() as m:  # every key collides: the tokens decide
        m.setattr(pages, "hash", lambda _: 0, raising=False)
        s = sched()
        _run(s, Request(head + [1], max_tokens=1))
        other = Request(list(range(40, 48)) + [1], max_tokens=1)
        s.add(other)
        work = s.schedule()
        assert [(w.start, w.count) for w in work] == [(0, 9)] and s.pool.hit_tokens == 0


def test_decode_first_then_prefill_chunks_under_the_budget_and_stops():
    s = scheduler(pages=40, max_seqs=3, max_step_tokens=6, chunk=4)
    done = []
    a = s.add(Request([1, 2], max_tokens=5, stop_ids=frozenset({99}),
                      listener=lambda r, t, why: done.append(why) if why else None))
    s.advance(s.schedule(), [5])  # a prefilled: decoding from now on
    b = s.add(Request([3] * 9, max_tokens=1))
    c = s.add(Request([4] * 2, max_tokens=1))
    work = s.schedule()
    assert [(w.request, w.count) for w in work] == [(a, 1), (b, 4), (c, 1)]  # budget 6
    s.advance(work, [99, 0, 0])  # a stops: the stop id is not kept
    assert a.finish_reason == "stop" and a.output == [5] and done == ["stop"]


def test_cancel_frees_pages_and_the_queue_is_bounded():
    s = scheduler(max_waiting=1, max_seqs=1)
    a = s.add(Request([1] * 5, max_tokens=3))
    s.schedule()
    s.add(Request([1], max_tokens=1))
    with pytest.raises(QueueFull):
        s.add(Request([1], max_tokens=1))
    a.cancelled = True
    s.schedule()
    assert a.finish_reason == "abort" and a not in s.running and len(s.running) == 1
    with pytest.raises(ValueError, match="more KV pages than the pool has"):
        s.add(Request([1] * 40, max_tokens=20))
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0)


def test_steps_are_planned_ahead_of_their_tokens():
    """The scheduler plans step k + 1 before step k's tokens are read (the engine overlaps its
    host work with the device): a token pending from step k is fed in step k + 1; a request
    whose pending token is its last (max_tokens) gets no further step; one that reads a stop
    id had a step planned past it, whose token is dropped."""
    s = scheduler(pages=40, max_seqs=2, max_step_tokens=8, chunk=4)
    a = s.add(Request([1, 2], max_tokens=2))
    b = s.add(Request([3], max_tokens=5, stop_ids=frozenset({99})))
    first = s.schedule()  # both prompts whole: each samples its first token (pending)
    assert [(w.start, w.count, w.samples) for w in first] == [(0, 2, True), (0, 1, True)]
    second = s.schedule()  # before first's tokens are read: each feeds its pending token
    assert [(w.request, w.start, w.count, w.chunk) for w in second] == [(a, 2, 1, False),
                                                                         (b, 1, 1, False)]
    assert (a.pending, b.pending, a.length) == (2, 2, 4)
    third = s.schedule()  # a's 2 pending tokens are all it asked for: only b goes on
    assert [(w.request, w.start) for w in third] == [(b, 2)]
    s.advance(first, [7, 99])  # b's first token is a stop id
    assert b.finish_reason == "stop" and b not in s.running and a.output == [7]
    s.advance(second, [8, 5])  # b's later tokens are dropped
    s.advance(third, [6])
    assert (a.output, a.finish_reason, b.output) == ([7, 8], "length", [])
    assert s.pool.in_use == 0 and not s.has_work()


def test_requests_spread_over_pool_shards_with_local_pages():
    """A pool split over 2 shards (devices): each request lives on one, chosen at admission
    (fewest running, then most free pages), holds local page ids of that shard only, and
    gives them back there; a shard takes at most ceil(max_seqs / shards) requests."""
    s = Scheduler(PagePool(10, 4, shards=2), max_seqs=3, max_step_tokens=16, chunk=4,
                  max_positions=64)
    assert (s.pool.per_shard, s.pool.capacity, s.slots_per_shard) == (5, 8, 2)
    a, b, c = (s.add(Request([1] * 4, max_tokens=4)) for _ in range(3))  # 2 pages each
    s.schedule()
    assert [r.shard for r in (a, b, c)] == [0, 1, 0]
    assert all(1 <= p < 5 for r in (a, b, c) for p in r.pages)  # local ids, page 0 is scratch
    assert s.pool.free == [[4, 3], [4, 3, 2]] and s.pool.promised == [2, 1]
    d = s.add(Request([1] * 4, max_tokens=4))
    s.schedule()
    assert d in s.waiting  # shard 1 has the pages but shard 0 and the step are full (3 seqs)
    a.cancelled = True
    s.schedule()
    # a's pages went back to shard 0 and d took one there; b and c hold 2 each (planned ahead:
    # their first decode tokens reach position 5)
    assert d.shard == 0 and s.pool.in_use == 5
    with pytest.raises(ValueError, match=r"\(4 of 4 per shard\)"):
        s.add(Request([1] * 17, max_tokens=4))  # 21 positions: 6 pages, more than a shard has


def test_max_model_len_caps_requests_and_the_pool():
    """--max-model-len: the pool is sized for it and longer requests are refused with the
    numbers (a long-context model's default pool would hold every slot at full length)."""
    from moe_relayfree_models.serving.engine import Engine, EngineConfig

    model = _model("float32")
    engine = Engine(model, EngineConfig(max_seqs=2, max_step_tokens=16, chunk=8, page_size=16,
                                        max_model_len=64))
    assert engine.pool.num_pages == 8 * (1 * 4 + 1) and engine.max_positions == 64
    with pytest.raises(ValueError, match="exceed the model's 64 positions"):
        engine.submit([5] * 40, 30)
    with pytest.raises(ValueError, match="max_model_len must be in"):
        Engine(model, EngineConfig(max_model_len=10**6))


def _collectives(hlo: str) -> dict:
    import collections
    import re

    return dict(collections.Counter(re.findall(
        r"= \S+ (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter|"
        r"ragged-all-to-all)(?:-start)?\(", hlo)))


def test_decode_step_moves_nothing_but_the_moe_layers_tokens():
    """Pools and slots split alike over the devices: a decode step's compiled program has the
    collectives of generate()'s decode step (the MoE layers') and no more: no page row, step
    input or logit row crosses devices (a replicated pool gathered every layer's new rows to
    every device: 19 all-gathers against 3)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from moe_relayfree_models import generation
    from moe_relayfree_models.serving import engine as serving
    from moe_relayfree_models.serving.step import step_program
    from moe_relayfree_models.transformer import init_cache

    model = _model("float32")
    engine = serving.Engine(model, serving.EngineConfig(max_seqs=16, page_size=16,
                                                        max_model_len=128))
    requests = [engine.submit([5, 6, 7], 8) for _ in range(16)]
    while any(r.prefilling for r in requests):
        engine.step()
    work = engine.scheduler.schedule()
    shape = engine._shape(work)
    assert shape[1] == 0 and {r.shard for r in requests} == set(range(8))  # 2 per device
    packed, _ = engine._layout(work, *shape, flight=engine._in_flight)
    got = _collectives(step_program.lower(engine.graphdef, shape, engine.state, packed,
                                         engine._previous, engine.pages).compile().as_text())
    graphdef, state = nnx.split(model)
    b = 2 * 8
    want = _collectives(generation.step_program.lower(
        graphdef, generation.GREEDY, state, jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.int32),
        init_cache(model.cfg, b, 128, model.compute_dtype), jnp.int32(3),
        jax.random.key(0)).compile().as_text())
    assert got == want and sum(want.values()) > 0


DEFAULT = __import__("os").path.join(__import__("os").path.dirname(__import__("os").path.dirname(
    __file__)), "models", "default")
PROMPT_LENGTHS = [3, 17, 40, 5, 70, 9]
MAX_TOKENS = [5, 9, 3, 12, 6, 20]
# 16 concurrent requests: (prompt, max_tokens), 3-20 new tokens each
CASES = [(i % len(PROMPT_LENGTHS), 3 + (7 * i) % 18) for i in range(16)]


def _prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(3, 250, n).tolist() for n in PROMPT_LENGTHS]


def _model(dtype, dispatch="relayfree", **settings):
    from moe_relayfree_models import checkpoint

    return checkpoint.load_model(DEFAULT, mesh=mr.make_ep_mesh(8), dtype=dtype,
                                 implementation=dispatch, **settings)


def _config(chunk_buckets: int = 1):
    """The engine of the token tests: one chunk-row size (a third of the shapes to compile)
    but where a test is about the buckets."""
    from moe_relayfree_models.serving.engine import EngineConfig

    return EngineConfig(max_seqs=4, max_step_tokens=32, chunk=16, page_size=32, max_model_len=128,
                        chunk_buckets=chunk_buckets)


def _through_the_client(server, calls):
    """``await calls(client)`` with the official ``openai`` client against the server's app in
    this process (over httpx's ASGI transport, the app's own lifespan running the engine)."""
    import asyncio

    import httpx
    import openai

    async def run():
        async with server.app.router.lifespan_context(server.app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=server.app),
                                         base_url="http://served", timeout=120) as http:
                return await calls(openai.AsyncOpenAI(base_url="http://served/v1",
                                                      api_key="none", http_client=http,
                                                      max_retries=0))

    return asyncio.run(run())


def _served_tokens(model, stop_ids: dict, chunk_buckets: int = 1, cases=CASES):
    """The tokens of ``cases`` (prompt index, max tokens), sent at once through the official
    ``openai`` client to the server's app in this process, greedy, with vLLM's
    ``return_token_ids``; ``stop_ids[i]``: request ``i``'s."""
    import asyncio

    from moe_relayfree_models import tokenizer
    from moe_relayfree_models.serving.engine import Engine
    from moe_relayfree_models.serving.server import Server

    engine = Engine(model, _config(chunk_buckets))
    server = Server(engine, tokenizer.load_tokenizer(DEFAULT, model.cfg.vocab_size),
                    model_name="default")
    prompts = _prompts()

    async def calls(client):
        answers = await asyncio.gather(*[
            client.completions.create(model="default", prompt=prompts[p], max_tokens=n,
                                      temperature=0,
                                      extra_body={"return_token_ids": True,
                                                  "stop_token_ids": list(stop_ids.get(i, []))})
            for i, (p, n) in enumerate(cases)])
        return [a.choices[0].model_extra["token_ids"] for a in answers]

    tokens = _through_the_client(server, calls)
    assert engine.pool.in_use == 0 and not engine.has_work()
    return tokens, engine


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    """generate()'s greedy tokens for each prompt, as many as any case asks (float32), made
    once per run: the six prompts as one static batch, left-padded to the longest. A row's
    tokens are its prompt's alone (left padding changes no row:
    test_models.py::test_left_padding_does_not_change_a_row; the same tokens as six calls of
    one prompt each, which compiled twelve programs instead of two)."""
    def compute():
        from moe_relayfree_models import generation

        model = _model("float32")
        longest = max(n for _, n in CASES)
        return [[int(t) for t in row]
                for row in generation.generate(model, _prompts(), longest)["tokens"]]

    return computed_once(tmp_path_factory, "serving_alone", compute)


# Relay-free, and one baseline: the engine sees a dispatch path only through the schedule its
# MoE layers report (a baseline has none); every path's layer is checked against the dense
# reference on a data x ep x tp mesh (tests/test_paths.py) and whole-model logits across paths
# in test_models.py. The all-gather baseline's are the smallest programs (each further path
# here cost 16-24 s of the suite).
@pytest.mark.parametrize("dispatch", ["relayfree", "allgather_baseline"])
def test_served_tokens_equal_generate_of_each_prompt_alone(dispatch, alone):
    """16 concurrent requests of 3-70 prompt tokens and 3-20 new tokens, through the official
    ``openai`` client, 4 sequence slots: admitted as slots free, prompts in chunks of 16 beside
    other requests' decode tokens; each request's greedy tokens are generate()'s for its prompt
    alone (the default model, float32, 8 devices), for relay-free and the all-gather baseline.
    The last request stops at a stop id its 5th
    token is (the engine, a step ahead, had already planned a step past it: that token is
    dropped). Relay-free runs with a decode threshold of 8 tokens per device: each step's MoE
    layers choose their schedule from that step's rows, so the steps carrying prefill chunks
    (17 rows per device) take the prefill schedule and the decode-only ones (1 per device)
    the decode schedule, and with the three chunk-row sizes (a step's chunk slots have 4, 8 or
    16 rows, as its longest chunk needs). The baseline, whose only difference is inside the
    MoE layer, runs the first 8 requests with one chunk-row size: fewer programs to compile.
    Prompts repeat (16 requests of 6 prompts): the later ones of the longer prompts start from
    the pages the earlier ones filled (the prefix cache)."""
    relayfree = dispatch == "relayfree"
    cases = CASES if relayfree else CASES[:8]
    want = [alone[p][:n] for p, n in cases]
    stop = want[-1][4]
    want[-1] = want[-1][:want[-1].index(stop)]
    stop_ids = {len(cases) - 1: [stop]}
    got, engine = _served_tokens(_model("float32", dispatch, decode_threshold=8) if relayfree
                                 else _model("float32", dispatch), stop_ids, 3 if relayfree else 1,
                                 cases)
    assert got == want
    steps = engine.metrics.steps
    if dispatch == "relayfree":
        assert steps["prefill"] > 0 and steps["decode"] > 0 and steps["none"] == 0
        # the repeated 40- and 70-token prompts took their first pages from the prefix cache
        assert engine.pool.hit_tokens > 0
    else:
        assert steps["none"] > 0 and steps["prefill"] == steps["decode"] == 0


def test_nothing_compiles_after_warm_up():
    """After ``Engine.warm_up`` (every step shape), requests of every prompt length run with no
    backend compile: a step's inputs placed otherwise than warm-up's (the tokens passed from one
    step to the next started replicated) made its shape compile again. (bf16 tokens against
    generate: tests/test_server.py, through the openai client.)"""
    from moe_relayfree_models.serving.engine import Engine
    from moe_relayfree_models.tools.bench.engine import CompileCounter

    engine = Engine(_model("float32"), _config())
    assert engine.warm_up() == len(engine.step_shapes())
    prompts, requests = _prompts(), []
    with CompileCounter() as compiles:
        for wave in (prompts[:1], prompts[1:]):  # alone first: its decode steps are the
            requests += [engine.submit(p, 4) for p in wave]  # smallest shape, warmed up first
            while engine.has_work():
                engine.step()
    assert compiles.count == 0 and [r.finish_reason for r in requests] == ["length"] * 6


def test_preempted_requests_give_the_tokens_of_their_prompts_alone(alone):
    """A pool of 8 pages of 16 rows per device and two sequence slots each: a 40-token and a
    70-token prompt per device are admitted together on their prompts' pages (3 + 5), and
    their 20 new tokens need 4 + 6; the 70-token request is preempted, prefilled again with
    its prompt and the tokens it had, and every request's greedy tokens are generate()'s for
    its prompt alone (the default model, float32, 8 devices); every page comes back."""
    from moe_relayfree_models.serving.engine import Engine, EngineConfig
    from moe_relayfree_models.serving.metrics import prometheus

    engine = Engine(_model("float32"), EngineConfig(
        max_seqs=16, max_step_tokens=64, chunk=16, page_size=16, max_model_len=128,
        num_pages=8 * 9, chunk_buckets=1))
    engine.scheduler.reserve, engine.scheduler.reserve_share = (0, 0, 0), 0  # admit both
    prompts = _prompts()
    order = [2] * 8 + [4] * 8  # 40 tokens, then 70: one of each per device
    requests = [engine.submit(prompts[p], 20) for p in order]
    while engine.has_work():
        engine.step()
    assert [r.output for r in requests] == [alone[p][:20] for p in order]
    assert engine.scheduler.preemptions > 0
    assert all(r.preemptions == 0 for r in requests[:8])  # the older are never preempted
    assert any(r.recomputed > 0 for r in requests[8:])
    assert engine.pool.in_use == 0 and engine.pool.total_promised == 0
    n = engine.scheduler.preemptions
    assert f"moe_relayfree_preemptions_total {n}\n" in prometheus(engine)


@pytest.mark.parametrize("fixture", ["deepseek_v3-default", "mixtral-window"])
def test_engine_tokens_equal_generate_for_mla_and_sliding_windows(fixture):
    """DeepSeek-V3's latent MLA cache over pages (absorbed decode, chunked prefill) and a
    sliding window of 4 over pages: the engine's greedy tokens are generate()'s for the prompts
    (float32, random-init Hugging Face fixtures), also for a prompt served again from the
    prefix cache."""
    import os

    from moe_relayfree_models import checkpoint, generation
    from moe_relayfree_models.serving.engine import Engine, EngineConfig

    folder = os.path.join(os.path.dirname(__file__), "fixtures", "hf", fixture)
    model = checkpoint.load_model(folder, mesh=mr.make_ep_mesh(8), dtype="float32")
    # four requests over four slots: prompts of 17, 40, 5 and 40 tokens (chunks of 16)
    prompts = [p[:40] for p in _prompts()[1:5]]
    budget = [min(m, 128 - len(p)) for p, m in zip(prompts, MAX_TOKENS[1:5])]
    engine = Engine(model, EngineConfig(max_seqs=4, max_step_tokens=32, chunk=16, page_size=16,
                                        chunk_buckets=1))
    requests = [engine.submit(p, m) for p, m in zip(prompts, budget)]
    while engine.has_work():
        engine.step()
    # the prompts as one left-padded static batch (see ``alone``)
    want = generation.generate(model, prompts, max(budget))["tokens"]
    for w, m, r in zip(want, budget, requests):
        assert r.output == w[:m], fixture
    # the 40-token prompt again: its first two pages (32 positions) from the prefix cache
    again = engine.submit(prompts[1], budget[1])
    while engine.has_work():
        engine.step()
    assert engine.pool.hit_tokens == 32 and again.output == requests[1].output, fixture


def test_logprobs_are_the_models_own():
    """logprobs through the official ``openai`` client, completions (greedy, 3 top, streamed
    too) and chat (sampled at temperature 1 with a seed, 2 top): each token's log-probability
    and the top ones are the model's own log-softmax at that position (one forward over the
    prompt and the completion, float32), before temperature; the greedy token is the top one."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from moe_relayfree_models import tokenizer
    from moe_relayfree_models.serving.chat import ChatTemplate
    from moe_relayfree_models.serving.engine import Engine
    from moe_relayfree_models.serving.server import Server
    from moe_relayfree_models.transformer import init_cache

    model = _model("float32")
    server = Server(Engine(model, _config()), tokenizer.load_tokenizer(DEFAULT, model.cfg.vocab_size),
                    model_name="default", chat_template=ChatTemplate("{{ messages[0].content }}"))
    prompt = _prompts()[1]
    ids_of = {"return_token_ids": True}

    async def calls(client):
        greedy = await client.completions.create(model="default", prompt=prompt, max_tokens=5,
                                                 temperature=0, logprobs=3, extra_body=ids_of)
        chunks = [c async for c in await client.completions.create(
            model="default", prompt=prompt, max_tokens=5, temperature=0, logprobs=3,
            stream=True)]
        chat = await client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "Return the number of "}],
            max_tokens=4, temperature=1, seed=3, logprobs=True, top_logprobs=2,
            extra_body=ids_of)
        return greedy.choices[0], chunks, chat.choices[0]

    greedy, chunks, chat = _through_the_client(server, calls)

    @nnx.jit
    def logprobs(model, tokens):
        cache = init_cache(model.cfg, 1, tokens.shape[1], jnp.float32)
        logits = model(tokens, jnp.zeros((1,), jnp.int32), cache, 0)[0]
        return jax.nn.log_softmax(logits[0], axis=-1)

    def reference(choice):
        prompt_ids, out = choice.model_extra["prompt_token_ids"], choice.model_extra["token_ids"]
        ref = np.asarray(logprobs(model, jnp.array([prompt_ids + out], jnp.int32)))
        return ref[len(prompt_ids) - 1:-1], out  # the distribution each token was drawn from

    ref, out = reference(greedy)
    lp = greedy.logprobs
    assert len(lp.tokens) == len(out) == 5
    np.testing.assert_allclose(lp.token_logprobs, ref[np.arange(5), out], atol=1e-4)
    for row, top, chosen in zip(ref, lp.top_logprobs, lp.token_logprobs):
        np.testing.assert_allclose(sorted(top.values(), reverse=True), np.sort(row)[::-1][:3],
                                   atol=1e-4)
        assert chosen == max(top.values())  # greedy: the most likely token
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for s in streamed for t in s.token_logprobs] == lp.token_logprobs

    ref, out = reference(chat)
    content = chat.logprobs.content
    assert len(content) == len(out) == 4
    np.testing.assert_allclose([c.logprob for c in content], ref[np.arange(4), out], atol=1e-4)
    for row, c in zip(ref, content):
        assert len(c.top_logprobs) == 2
        np.testing.assert_allclose([t.logprob for t in c.top_logprobs], np.sort(row)[::-1][:2],
                                   atol=1e-4)


def test_latency_histogram_buckets_are_upper_bounds():
    """Prometheus' ``le``: a value on a bound counts in that bucket; counts are cumulative;
    past the last bound only +Inf holds it."""
    from moe_relayfree_models.serving.metrics import Histogram

    h = Histogram((0.01, 0.1))
    for v in (0.01, 0.05, 0.1, 3.0):
        h.observe(v)
    assert h.samples() == [("_bucket", '{le="0.01"}', 1), ("_bucket", '{le="0.1"}', 3),
                           ("_bucket", '{le="+Inf"}', 4), ("_sum", "", pytest.approx(3.16)),
                           ("_count", "", 4)]
