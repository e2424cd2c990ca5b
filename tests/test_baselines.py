"""Buffer-centric baselines: exact against the dense reference; capacity drops are counted."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import moe_relayfree as mr
from helpers import make_mesh, moe_inputs
from moe_relayfree.baselines import capacity
from moe_relayfree.ffn import swiglu


@pytest.mark.parametrize("implementation", ["ragged_baseline", "capacity_baseline"])
@pytest.mark.parametrize("num_ranks,num_experts,k", [(1, 4, 2), (2, 8, 1), (4, 16, 8), (8, 16, 2)])
def test_baselines_match_dense(implementation, num_ranks, num_experts, k):
    inputs = moe_inputs(6 * num_ranks, 16, 24, num_experts, k, seed=num_ranks)
    y = mr.expert_parallel_moe(*inputs, mesh=make_mesh(num_ranks), implementation=implementation)
    np.testing.assert_allclose(y, mr.dense_moe_reference(*inputs), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("implementation", ["ragged_baseline", "capacity_baseline"])
def test_baselines_exact_when_skewed(implementation):
    n, k = 32, 2
    ids = np.tile(np.array([[14, 15]], np.int32), (n, 1))  # everything on the last rank
    inputs = moe_inputs(n, 8, 12, 16, k, ids=ids)
    y = mr.expert_parallel_moe(*inputs, mesh=make_mesh(8), implementation=implementation)
    np.testing.assert_allclose(y, mr.dense_moe_reference(*inputs), atol=2e-5, rtol=2e-5)


def test_capacity_drops_are_counted_and_equal_zeroed_weights():
    """Below capacity, the result equals the reference with exactly the dropped copies removed."""
    num_ranks, n, e, k, cap = 4, 32, 8, 2, 2
    mesh = make_mesh(num_ranks)
    x, ids, w, wg, wu, wd = moe_inputs(n, 8, 12, e, k, seed=4)

    def body(x, ids, w, wg, wu, wd):
        expert_in, h = capacity.dispatch(x, ids, w, num_experts=e, axis_name="ep", capacity=cap)
        y = capacity.combine(jax.vmap(swiglu)(expert_in, wg, wu, wd), h)
        return y, h.dropped[None]

    tok, exp = P("ep"), P("ep", None, None)
    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(tok,) * 3 + (exp,) * 3,
                               out_specs=(tok, tok)))
    args = [jax.device_put(a, NamedSharding(mesh, tok)) for a in (x, ids, w)]
    args += [jax.device_put(a, NamedSharding(mesh, exp)) for a in (wg, wu, wd)]
    y, dropped = fn(*args)

    # numpy model of the choice-major priority, per source rank
    ids_np, kept = np.asarray(ids), np.ones((n, k), bool)
    t = n // num_ranks
    for r in range(num_ranks):
        fill = np.zeros(e, int)
        for j in range(k):
            for tok_i in range(r * t, (r + 1) * t):
                ex = ids_np[tok_i, j]
                kept[tok_i, j] = fill[ex] < cap
                fill[ex] += 1
    assert int(np.asarray(dropped).sum()) == int((~kept).sum()) > 0
    want = mr.dense_moe_reference(x, ids, jnp.where(kept, w, 0.0), wg, wu, wd)
    np.testing.assert_allclose(y, want, atol=2e-5, rtol=2e-5)


def test_capacity_for():
    assert capacity.capacity_for(100, 8, 64, 1.25) == 16
    assert capacity.capacity_for(100, 8, 64, None) == 100
    assert capacity.capacity_for(4, 8, 8, 10.0) == 4  # never above T
    with pytest.raises(ValueError):
        capacity.capacity_for(4, 2, 8, 0)


def test_unknown_implementation():
    with pytest.raises(ValueError, match="implementation must be one of"):
        mr.expert_parallel_moe(*moe_inputs(8, 4, 4, 8, 2), mesh=make_mesh(2), implementation="x")


def test_bounded_ragged_baseline_drops_past_its_buffer_and_counts_them():
    """MaxText's bounded receive buffer (2*T*k rows): under skew the rows past it are dropped,
    sources in rank order, each source's copies in expert order; the result equals the
    reference with exactly those copies' weights zeroed, and dropped_copies counts them."""
    from moe_relayfree.baselines import ragged

    num_ranks, n, e, k = 8, 32, 16, 2
    rng = np.random.default_rng(6)
    ids = np.where(rng.random((n, 1)) < 0.75, np.array([[14, 15]]),
                   np.stack([rng.choice(e, k, replace=False) for _ in range(n)])).astype(np.int32)
    x, ids, w, wg, wu, wd = moe_inputs(n, 8, 12, e, k, seed=6, ids=ids)
    t, rows = n // num_ranks, 2 * (n // num_ranks) * k
    mesh = make_mesh(num_ranks)
    y = mr.expert_parallel_moe(x, ids, w, wg, wu, wd, mesh=mesh,
                               implementation="ragged_baseline_bounded")
    ids_np, kept = np.asarray(ids), np.ones((n, k), bool)
    filled = np.zeros(num_ranks, int)
    local = e // num_ranks
    for s in range(num_ranks):
        flat = [(ids_np[tok, j], tok * k + j) for tok in range(s * t, (s + 1) * t) for j in range(k)]
        for expert, f in sorted(flat):
            r = expert // local
            kept[f // k, f % k] = filled[r] < rows
            filled[r] += 1
    assert (~kept).sum() > 0
    want = mr.dense_moe_reference(x, ids, jnp.where(kept, w, 0.0), wg, wu, wd)
    np.testing.assert_allclose(y, want, atol=2e-5, rtol=2e-5)
    per_source = ragged.dropped_copies(ids_np, e, num_ranks, rows)
    np.testing.assert_array_equal(per_source, (~kept).reshape(num_ranks, -1).sum(1))
