"""Prefill plan and dispatch: rows land in expert-major windows, round by round, none lost."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from helpers import make_mesh
from moe_relayfree import prefill
from moe_relayfree.plan import rows_per_round


def expected_windows(x, ids, num_ranks, num_experts):
    """Numpy model: per receiver, windows by local expert, sources in rank order, copies in
    (token, choice) order. Returns per-rank lists of (rows, window_sizes)."""
    local = num_experts // num_ranks
    t = x.shape[0] // num_ranks
    out = []
    for r in range(num_ranks):
        rows, sizes = [], []
        for l in range(local):
            e = r * local + l
            n = 0
            for s in range(num_ranks):
                for tok in range(s * t, (s + 1) * t):
                    for j in range(ids.shape[1]):
                        if ids[tok, j] == e:
                            rows.append(x[tok])
                            n += 1
            sizes.append(n)
        out.append((np.array(rows).reshape(-1, x.shape[1]), np.array(sizes)))
    return out


def dispatch_rounds(x, ids, num_ranks, num_experts, rows):
    mesh = make_mesh(num_ranks)

    def body(x, ids):
        h = prefill.plan_and_pack(
            x, ids, jnp.ones(ids.shape), num_experts=num_experts, axis_name="ep",
            rows_per_round=rows,
        )
        wins = [prefill.dispatch_round(h, j) for j in range(h.plan.max_rounds)]
        stack = jnp.stack([w.rows for w in wins])[None]
        sizes = jnp.stack([w.group_sizes for w in wins])[None]
        return stack, sizes, h.plan.num_rounds[None]

    spec = NamedSharding(mesh, P("ep"))
    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
    return f(jax.device_put(x, spec), jax.device_put(ids, spec))


@pytest.mark.parametrize(
    "num_ranks,num_experts,k,skew,factor",
    [(4, 8, 2, False, None), (4, 8, 2, False, 1.0), (4, 8, 2, True, 1.0), (2, 6, 3, True, 0.5),
     (8, 16, 1, True, 2.0)],
)
def test_rows_land_in_expert_windows_round_by_round(num_ranks, num_experts, k, skew, factor):
    rng = np.random.default_rng(num_ranks * 7 + k)
    t, d = 6, 3
    n = t * num_ranks
    x = rng.standard_normal((n, d)).astype(np.float32)
    if skew:  # every token's choices on the first k experts: rank 0 gets everything
        ids = np.tile(np.arange(k, dtype=np.int32), (n, 1))
    else:
        ids = np.stack([rng.choice(num_experts, k, replace=False) for _ in range(n)]).astype(np.int32)
    rows = rows_per_round(t, k, num_ranks, factor)
    bufs, sizes, num_rounds = (np.asarray(a) for a in dispatch_rounds(x, ids, num_ranks, num_experts, rows))
    expect = expected_windows(x, ids, num_ranks, num_experts)
    totals = [len(e[0]) for e in expect]
    assert num_rounds[0] == max(1, -(-max(totals) // rows))
    if skew and factor is not None:
        assert num_rounds[0] > 1, "the skewed case must need several rounds"
    for r, (want_rows, want_sizes) in enumerate(expect):
        got = np.concatenate(list(bufs[r]))[: len(want_rows)]
        np.testing.assert_array_equal(got, want_rows)
        np.testing.assert_array_equal(sizes[r].sum(0), want_sizes)
        # Each round's group sizes describe exactly the rows it holds.
        for j in range(sizes.shape[1]):
            held = min(rows, max(0, totals[r] - j * rows))
            assert sizes[r, j].sum() == held


def test_rows_per_round_bounds():
    assert rows_per_round(16, 8, 8, None) == 16 * 8 * 8
    assert rows_per_round(16, 8, 8, 2.0) == 256
    assert rows_per_round(16, 8, 1, 2.0) == 128  # never above the worst case
    with pytest.raises(ValueError):
        rows_per_round(16, 8, 8, 0.0)


def test_weighted_row_sum_matches_numpy_with_mask_and_accumulator():
    """The combine's weighted sum (prefill, decode transports): repeated rows, masked
    choices, an accumulator, and the same bits on every call."""
    from moe_relayfree.windows import weighted_row_sum

    rng = np.random.default_rng(3)
    rows = rng.standard_normal((10, 6)).astype(np.float32)
    index = rng.integers(0, 10, (7, 3)).astype(np.int32)
    index[0] = 4  # one token reads the same row three times
    weights = rng.uniform(0.1, 1, (7, 3)).astype(np.float32)
    valid = rng.random((7, 3)) > 0.3
    into = rng.standard_normal((7, 6)).astype(np.float32)
    want = into + np.einsum("tk,tkd->td", weights * valid, rows[index])
    fn = jax.jit(weighted_row_sum)
    got = fn(rows, index, weights, valid, into)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got, fn(rows, index, weights, valid, into))
    np.testing.assert_allclose(jax.jit(weighted_row_sum)(rows, index, weights),
                               np.einsum("tk,tkd->td", weights, rows[index]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("num_experts,num_ranks,k,tokens,rows", [
    (16, 8, 4, 6, 6),    # El = 2: up to two copies of a token on one rank
    (16, 16, 4, 16, 8),  # El = 1, as Qwen3-235B on 128 ranks
])
def test_overflow_probability_matches_simulated_routing(num_experts, num_ranks, k, tokens, rows):
    """The receive-buffer overflow chance (MIN_ROWS' and the AOT tables' figures) against
    uniform top-k routing drawn at random: per rank within 5 standard errors, and the
    simulated chance that some rank overflows between the two bounds."""
    from moe_relayfree.plan import overflow_probability

    per_rank, low, high = overflow_probability(tokens, num_experts, num_ranks, k, rows)
    trials = 40_000
    rng = np.random.default_rng(5)
    ids = np.argsort(rng.random((trials, tokens, num_experts)), axis=-1)[..., :k]
    ranks = ids // (num_experts // num_ranks)
    received = (ranks.reshape(trials, -1)[..., None] == np.arange(num_ranks)).sum(axis=1)
    over = received > rows  # [trials, P]
    err = np.sqrt(per_rank * (1 - per_rank) / over.size) * 5 * np.sqrt(num_ranks)
    assert 0.005 < per_rank and high < 0.2  # where a simulation sees all three
    assert abs(over.mean() - per_rank) < err
    some = over.any(axis=1).mean()
    assert low - 0.01 < some < high + 0.01, (low, some, high)
    most = tokens * min(k, num_experts // num_ranks)  # every copy a rank can receive
    assert overflow_probability(tokens, num_experts, num_ranks, k, most) == (0, 0, 0)
    with pytest.raises(ValueError):
        overflow_probability(tokens, num_experts, num_ranks, 0, rows)
