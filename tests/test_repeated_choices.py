"""Repeated expert ids within a token's k choices, NaN containment and the input checks at the
API boundary: every schedule, transport, baseline, the verbs and the layer against the dense
reference (which sums each choice, repeats included)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import moe_relayfree as mr
from helpers import make_mesh, moe_inputs, skewed_ids
from moe_relayfree.routing import merge_repeated_choices
from test_decode import decode_layer

D, F, E, K = 16, 24, 16, 4
TOK, EXP = P("ep"), P("ep", None, None)


def repeated_ids(kind: str, n: int, num_ranks: int) -> np.ndarray:
    """``one_expert``: every choice of every token is expert 0; ``pairs``: ``[a, a, b, b]``,
    a and b on different ranks; ``padding``: the second half of the rows are ``ids=0`` (with
    zero weights, see :func:`inputs`), the first half distinct; ``mixed``: the self-check's
    ``repeated`` pattern (odd rows pairs, even rows one expert)."""
    rng = np.random.default_rng(n)
    if kind == "one_expert":
        return np.zeros((n, K), np.int32)
    if kind == "pairs":
        local = E // num_ranks
        a = rng.integers(0, E, n)
        b = (a + max(local, 1)) % E
        return np.stack([a, a, b, b], axis=1).astype(np.int32)
    if kind == "padding":
        real = np.argsort(rng.random((n, E)), axis=1)[:, :K]
        return np.where(np.arange(n)[:, None] < n // 2, real, 0).astype(np.int32)
    return skewed_ids("repeated", n, K, E, num_ranks)


def inputs(kind, n, num_ranks, seed=0):
    x, ids, w, wg, wu, wd = moe_inputs(n, D, F, E, K, seed=seed, ids=repeated_ids(kind, n, num_ranks))
    if kind == "padding":
        w = jnp.where(jnp.arange(n)[:, None] < n // 2, w, 0.0)
    return x, ids, w, wg, wu, wd


def assert_matches_reference(got, args, atol=2e-5):
    want = mr.dense_moe_reference(*args)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=atol, rtol=atol)


def test_merge_repeated_choices_matches_numpy():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 5, (64, 6)).astype(np.int32)  # many repeats
    w = rng.uniform(0.1, 1, (64, 6)).astype(np.float32)
    got_ids, got_w = map(np.asarray, merge_repeated_choices(jnp.asarray(ids), jnp.asarray(w), 5))
    for t in range(64):
        seen = {}
        for j in range(6):
            if ids[t, j] in seen:
                assert got_ids[t, j] == 5 and got_w[t, j] == 0
            else:
                seen[ids[t, j]] = j
                assert got_ids[t, j] == ids[t, j]
                np.testing.assert_allclose(got_w[t, j], w[t][ids[t] == ids[t, j]].sum(), rtol=1e-6)
    distinct = np.argsort(rng.random((8, 16)), axis=1)[:, :4].astype(np.int32)
    same_ids, same_w = merge_repeated_choices(jnp.asarray(distinct), jnp.asarray(w[:8, :4]), 16)
    np.testing.assert_array_equal(same_ids, distinct)  # rows without repeats: unchanged, bit-exact
    np.testing.assert_array_equal(same_w, w[:8, :4])


@pytest.mark.parametrize("kind", ["one_expert", "pairs", "padding", "mixed"])
@pytest.mark.parametrize("num_ranks,transport", [
    (1, "gather"), (2, "windows"), (4, "gather"), (8, "gather"), (8, "windows"), (8, "replicated"),
])
def test_decode_transports(kind, num_ranks, transport):
    """The decode windows are sized for distinct experts per token (``P*T*min(k, El)`` rows);
    without folding repeats, half the tokens of an all-on-expert-0 batch came back as zeros."""
    n = 7 if transport == "replicated" else 4 * num_ranks
    args = inputs(kind, n, num_ranks, seed=num_ranks)
    assert_matches_reference(decode_layer(num_ranks, E, transport)(*args), args)


@functools.lru_cache(maxsize=None)
def verbs_program(num_ranks: int, schedule: str, transport: str = "auto"):
    mesh = mr.make_ep_mesh(num_ranks)

    def body(x, ids, w, wg, wu, wd):
        recv, handle = mr.dispatch(x, ids, w, num_experts=E, axis_name="ep", schedule=schedule,
                                   transport=transport)
        return mr.combine(mr.windows_swiglu(recv, wg, wu, wd), handle)

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(TOK,) * 3 + (EXP,) * 3,
                                 out_specs=TOK))


@pytest.mark.parametrize("schedule,transport", [("decode", "gather"), ("decode", "windows"),
                                                ("prefill", "auto")])
def test_verbs(schedule, transport):
    args = inputs("mixed", 32, 8, seed=1)
    assert_matches_reference(verbs_program(8, schedule, transport)(*args), args)


@pytest.mark.parametrize("kind", ["one_expert", "padding"])
@pytest.mark.parametrize("implementation,schedule", [
    ("relayfree", "prefill"), ("relayfree", "decode"), ("relayfree", "auto"),
    ("ragged_baseline", "auto"), ("capacity_baseline", "auto"),
])
def test_expert_parallel_moe(kind, implementation, schedule):
    """Every implementation through the public API; the capacity baseline with ``C = T`` used to
    drop the repeats past its per-expert capacity."""
    args = inputs(kind, 32, 8, seed=2)
    got = mr.expert_parallel_moe(*args, mesh=make_mesh(8), schedule=schedule,
                                 implementation=implementation)
    assert_matches_reference(got, args)


def test_gradients_with_repeats():
    """Folding is linear in the weights: gradients of x, the weights and the experts match the
    reference's, which differentiates each repeated choice on its own."""
    args = inputs("mixed", 16, 8, seed=3)
    ct = jax.random.normal(jax.random.PRNGKey(1), (16, D))
    fn = decode_layer(8, E, "gather")

    def loss(f):
        return lambda x, w, wg: jnp.sum(f(x, args[1], w, wg, *args[4:]) * ct)

    got = jax.grad(loss(fn), argnums=(0, 1, 2))(args[0], args[2], args[3])
    want = jax.grad(loss(mr.dense_moe_reference), argnums=(0, 1, 2))(args[0], args[2], args[3])
    for g, w_ in zip(got, want):
        np.testing.assert_allclose(g, w_, atol=3e-5, rtol=3e-5)


@pytest.mark.parametrize("schedule", ["decode", "prefill"])
def test_layer_with_a_router_that_repeats(monkeypatch, schedule):
    """A MoELayer whose router repeats experts (a user's own routing), 12 tokens padded to 16:
    the layer's output is the reference's on the same ids."""
    import moe_relayfree.layer as layer_module

    n = 12
    ids = jnp.asarray(repeated_ids("one_expert", 16, 8))  # 64 copies on rank 0: 2x its worst case
    weights = jnp.full((16, K), 0.25)
    monkeypatch.setattr(layer_module, "route_tokens", lambda *a, **kw: (ids, weights))
    layer = mr.MoELayer(D, F, E, K, mesh=make_mesh(8), schedule=schedule, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(2), (n, D))
    got = layer(x)
    params = [jnp.asarray(np.asarray(v[...])) for v in (layer.w_gate, layer.w_up, layer.w_down)]
    assert_matches_reference(got, (x, ids[:n], weights[:n], *params))


# --- NaN stays in its row; bad input is refused -------------------------------------------


@pytest.mark.parametrize("implementation", ["relayfree", "capacity_baseline", "ragged_baseline"])
def test_a_nan_token_poisons_only_its_row(implementation):
    x, ids, w, wg, wu, wd = moe_inputs(32, D, F, E, K, seed=4)
    x = x.at[5].set(jnp.nan)
    y = np.asarray(mr.expert_parallel_moe(x, ids, w, wg, wu, wd, mesh=make_mesh(8),
                                          implementation=implementation))
    bad = ~np.isfinite(y).all(axis=1)
    assert bad.tolist() == [t == 5 for t in range(32)]


def test_reference_keeps_an_unused_experts_nan_out():
    """A NaN in the weights of an expert no token picked changes nothing (the dense combine
    matrix multiplied it by 0 and made every output NaN); the decode schedule agrees."""
    x, ids, w, wg, wu, wd = moe_inputs(16, D, F, E, K, seed=5)
    ids = jnp.asarray(np.asarray(ids) % (E - 1))  # expert E-1 unused
    wd_nan = wd.at[E - 1].set(jnp.nan)
    ref = mr.dense_moe_reference(x, ids, w, wg, wu, wd_nan)
    assert np.isfinite(np.asarray(ref)).all()
    np.testing.assert_allclose(ref, mr.dense_moe_reference(x, ids, w, wg, wu, wd), rtol=1e-6)
    y = mr.expert_parallel_moe(x, ids, w, wg, wu, wd_nan, mesh=make_mesh(8),
                               implementation="capacity_baseline")
    np.testing.assert_allclose(y, ref, atol=2e-5, rtol=2e-5)


def test_integer_tokens_are_refused():
    x, ids, w, wg, wu, wd = moe_inputs(8, D, F, E, K)
    with pytest.raises(ValueError, match="x must be a floating-point array, got int32"):
        mr.expert_parallel_moe(x.astype(jnp.int32), ids, w, wg, wu, wd, mesh=make_mesh(8))


def test_grouped_router_refuses_k_above_the_eligible_experts():
    """DeepSeek-style groups: 1 of 4 groups of 4 experts leaves 4 eligible; k=6 used to pick two
    experts of excluded groups, with weight."""
    cfg = mr.RouterConfig(method="sigmoid_grouped", n_group=4, topk_group=1)
    logits = jax.random.normal(jax.random.PRNGKey(0), (4, 16))
    with pytest.raises(ValueError, match="k=6 exceeds the 4 experts eligible"):
        mr.route(logits, 6, cfg)
    ids, _ = mr.route(logits, 4, cfg)
    assert (np.asarray(ids) // 4 == np.asarray(ids)[:, :1] // 4).all()  # one group per token


def test_router_stats_are_sown_only_when_captured():
    """The README's serving pattern (a plain jitted forward) must not grow sown leaves per call;
    under nnx.capture they are there."""
    layer = mr.MoELayer(D, F, E, K, mesh=make_mesh(8), router_stats=True, rngs=nnx.Rngs(0))
    x = jnp.ones((8, D))
    forward = nnx.jit(lambda m, x: m(x))
    for _ in range(3):
        forward(layer, x)
    assert not nnx.state(layer, nnx.Intermediate)
    _, inter = nnx.capture(layer, nnx.Intermediate)(x)
    assert {"router_load", "router_prob_mean"} <= {str(p[-1]) for p, _ in nnx.to_flat_state(inter)}
