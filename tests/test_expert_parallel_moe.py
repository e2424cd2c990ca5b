"""expert_parallel_moe against the dense single-device reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import moe_relayfree as mr
from moe_relayfree.api import replicates_tokens
from helpers import make_mesh, moe_inputs, skewed_ids

D, F = 16, 24


def check(mesh, inputs, schedule, *, atol=2e-5, **kw):
    want = mr.dense_moe_reference(*inputs)
    got = mr.expert_parallel_moe(*inputs, mesh=mesh, schedule=schedule, **kw)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=atol, rtol=atol)
    return got


@pytest.mark.parametrize(
    "num_ranks,num_experts,k",
    [(1, 4, 2), (2, 2, 1), (2, 8, 2), (4, 16, 8), (8, 8, 1), (8, 16, 2), (8, 64, 8)],
)
def test_matches_dense_reference(num_ranks, num_experts, k):
    mesh = make_mesh(num_ranks)
    inputs = moe_inputs(6 * num_ranks, D, F, num_experts, k, seed=num_ranks + k)
    check(mesh, inputs, "prefill")


@pytest.mark.parametrize("kind", ["one_expert", "one_rank", "empty_experts"])
@pytest.mark.parametrize("factor", [None, 1.0, 0.25])
def test_skewed_routing_is_exact_at_any_capacity(kind, factor):
    num_ranks, num_experts, k, n = 8, 16, 2, 64
    ids = skewed_ids(kind, n, k, num_experts, num_ranks)
    inputs = moe_inputs(n, D, F, num_experts, k, seed=3, ids=ids)
    check(make_mesh(num_ranks), inputs, "prefill", capacity_factor=factor)


def test_all_tokens_to_one_expert_k1():
    n = 48
    inputs = moe_inputs(n, D, F, 8, 1, ids=np.full((n, 1), 5, np.int32))
    for factor in (None, 1.0):
        check(make_mesh(8), inputs, "prefill", capacity_factor=factor)


def test_bfloat16():
    inputs = moe_inputs(64, D, F, 16, 4, seed=5, dtype=jnp.bfloat16)
    check(make_mesh(8), inputs, "prefill", atol=3e-2)


@pytest.mark.parametrize("factor", [2.0, 0.25])
def test_gradients_match_reference(factor):
    mesh = make_mesh(4)
    x, ids, w, wg, wu, wd = moe_inputs(32, 8, 12, 8, 2, seed=7)
    ct = jax.random.normal(jax.random.PRNGKey(0), x.shape)

    def loss(fn):
        return lambda x, w, wg, wu, wd: jnp.sum(ct * fn(x, ids, w, wg, wu, wd))

    def ep(*a):
        return mr.expert_parallel_moe(*a, mesh=mesh, schedule="prefill", capacity_factor=factor)

    args = (x, w, wg, wu, wd)
    want = jax.grad(loss(mr.dense_moe_reference), argnums=range(5))(*args)
    got = jax.jit(jax.grad(loss(ep), argnums=range(5)))(*args)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, atol=2e-5, rtol=2e-5)


def test_rounds_in_one_loop_body_are_exact():
    """The rounds' form TPU and GPU run (every round, the first included, one loop body), run
    here on the CPU: exact under skew with several rounds, gradients included, and its
    program moves no rows outside the loop (the emulated ragged all-to-alls are all_to_alls;
    the counts travel in an all_gather before it)."""
    from moe_relayfree.tools import analysis

    mesh = make_mesh(8)
    one_body = mr.Lowering(first_round_inline=())
    ids = skewed_ids("one_expert", 64, 2, 16, 8)  # several rounds
    inputs = moe_inputs(64, D, F, 16, 2, seed=3, ids=ids)
    check(mesh, inputs, "prefill", capacity_factor=0.25, lowering=one_body)
    x, ids, w, wg, wu, wd = inputs
    ct = jax.random.normal(jax.random.PRNGKey(0), x.shape)

    def loss(fn):
        return lambda x, w, wg, wu, wd: jnp.sum(ct * fn(x, ids, w, wg, wu, wd))

    def ep(*a):
        return mr.expert_parallel_moe(*a, mesh=mesh, schedule="prefill", capacity_factor=0.25,
                                      lowering=one_body)

    args = (x, w, wg, wu, wd)
    want = jax.grad(loss(mr.dense_moe_reference), argnums=range(5))(*args)
    got = jax.jit(jax.grad(loss(ep), argnums=range(5)))(*args)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, atol=2e-5, rtol=2e-5)
    ops = analysis.collectives(jax.jit(ep).lower(*inputs).as_text())
    moves = [c for c in ops if c.op == "all_to_all"]
    assert moves and all(c.in_loop for c in moves), [(c.op, c.in_loop) for c in ops]


def test_auto_selects_by_tokens_per_rank():
    mesh = make_mesh(8)
    inputs = moe_inputs(8 * 4, D, F, 16, 2)

    def lowered(threshold):
        fn = jax.jit(lambda *a: mr.expert_parallel_moe(
            *a, mesh=mesh, schedule="auto", decode_threshold=threshold))
        return fn.trace(*inputs).lower(lowering_platforms=("cuda",)).as_text()

    decode_hlo, prefill_hlo = lowered(4), lowered(3)  # 4 tokens per rank
    # prefill all-gathers its counts; decode (windows transport at P > k on a GPU) gathers nothing
    assert "all_gather" not in decode_hlo and "all_gather" in prefill_hlo
    check(mesh, inputs, "auto")


def test_presharded_inputs_and_output_sharding():
    mesh = make_mesh(8)
    x, ids, w, wg, wu, wd = moe_inputs(32, D, F, 8, 2)
    tok, exp = NamedSharding(mesh, P("ep")), NamedSharding(mesh, P("ep", None, None))
    args = [jax.device_put(a, tok) for a in (x, ids, w)] + [jax.device_put(a, exp) for a in (wg, wu, wd)]
    y = mr.expert_parallel_moe(*args, mesh=mesh)
    assert y.sharding == tok
    np.testing.assert_allclose(y, mr.dense_moe_reference(x, ids, w, wg, wu, wd), atol=2e-5)


def test_batch_smaller_than_the_devices_runs_replicated():
    """N < devices: a relay-free decode batch stays on every device (eager: replicated output;
    jit: one all-reduce, nothing gathered or scattered). The baselines and a forced prefill
    schedule still ask for a padded batch."""
    import re

    mesh = make_mesh(8)
    inputs = moe_inputs(5, D, F, 16, 2, seed=4)
    want = mr.dense_moe_reference(*inputs)
    y = check(mesh, inputs, "auto")
    assert y.sharding == NamedSharding(mesh, P())
    fn = jax.jit(lambda *a: mr.expert_parallel_moe(*a, mesh=mesh))
    np.testing.assert_allclose(fn(*inputs), want, atol=2e-5, rtol=2e-5)
    text = fn.lower(*inputs).compile().as_text()
    ops = re.findall(r" (all-gather|all-reduce|all-to-all|reduce-scatter|collective-permute)"
                     r"(?:-start)?\(", text)
    assert ops == ["all-reduce"], ops
    config = mr.DispatchConfig(mesh)
    assert replicates_tokens(5, config) and not replicates_tokens(8, config)
    assert not replicates_tokens(5, config.replace(implementation="capacity_baseline"))
    for kw in (dict(schedule="prefill"), dict(implementation="ragged_baseline")):
        with pytest.raises(ValueError, match="N=5 tokens is not divisible"):
            mr.expert_parallel_moe(*inputs, mesh=mesh, **kw)


def test_cuda_lowering_uses_native_ops():
    mesh = make_mesh(4)
    inputs = moe_inputs(4 * 32, D, F, 8, 2)
    fn = jax.jit(lambda *a: mr.expert_parallel_moe(*a, mesh=mesh, schedule="prefill"))
    text = fn.trace(*inputs).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call @ragged_all_to_all") + text.count("ragged_all_to_all") >= 2
    assert "ragged_dot" in text


def test_bad_input_gets_clear_errors():
    mesh = make_mesh(4)
    x, ids, w, wg, wu, wd = moe_inputs(16, D, F, 8, 2)
    run = lambda *a, **kw: mr.expert_parallel_moe(*a, mesh=mesh, **kw)  # noqa: E731
    with pytest.raises(ValueError, match=r"not divisible by the 4 devices of batch axes \(.ep.,\)"):
        run(x[:14], ids[:14], w[:14], wg, wu, wd)
    with pytest.raises(ValueError, match="topk_ids must be"):
        run(x, ids[:8], w, wg, wu, wd)
    with pytest.raises(ValueError, match="topk_weights must be"):
        run(x, ids, w[:, :1], wg, wu, wd)
    with pytest.raises(ValueError, match="w_down must be"):
        run(x, ids, w, wg, wu, wd[:, :, :3])
    with pytest.raises(ValueError, match="E=6 experts is not divisible"):
        run(x, ids, w, wg[:6], wu[:6], wd[:6])
    with pytest.raises(ValueError, match="integer"):
        run(x, w, w, wg, wu, wd)
    with pytest.raises(ValueError, match="at least one choice per token, got k=0"):
        run(x, ids[:, :0], w[:, :0], wg, wu, wd)
    with pytest.raises(ValueError, match="do not take jax.vmap"):
        jax.jit(jax.vmap(lambda x, i, w: run(x, i, w, wg, wu, wd)))(x[None], ids[None], w[None])
    with pytest.raises(ValueError, match=r"out of range \[0, 8\) \(or -1 for no expert\): topk_ids\[3, 1\] = 8"):
        run(x, ids.at[3, 1].set(8), w, wg, wu, wd)
    with pytest.raises(ValueError, match="out of range"):
        run(x, ids.at[0, 0].set(-2), w, wg, wu, wd)  # -1 is "no expert" (test_invalid_ids.py)
    with pytest.raises(ValueError, match="no axis 'tp'"):
        run(x, ids, w, wg, wu, wd, axis="tp")
    with pytest.raises(ValueError, match="schedule must be"):
        run(x, ids, w, wg, wu, wd, schedule="fast")


def test_dispatch_combine_verbs_with_custom_expert_compute():
    """A user's own expert compute between the verbs (here: 2x SwiGLU) gives the same math."""
    from moe_relayfree.experts import grouped_swiglu

    mesh = make_mesh(4)
    x, ids, w, wg, wu, wd = moe_inputs(32, D, F, 8, 2, seed=11)

    def body(x, ids, w, wg, wu, wd):
        recv, handle = mr.dispatch(x, ids, w, num_experts=8, axis_name="ep", schedule="prefill")
        return mr.combine(2 * grouped_swiglu(recv.rows, recv.group_sizes, wg, wu, wd), handle)

    tok, exp = P("ep"), P("ep", None, None)
    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(tok,) * 3 + (exp,) * 3, out_specs=tok))
    args = [jax.device_put(a, NamedSharding(mesh, tok)) for a in (x, ids, w)]
    args += [jax.device_put(a, NamedSharding(mesh, exp)) for a in (wg, wu, wd)]
    want = 2 * mr.dense_moe_reference(x, ids, w, wg, wu, wd)
    np.testing.assert_allclose(fn(*args), want, atol=4e-5, rtol=4e-5)


@pytest.mark.parametrize("platform", ["cpu", "cuda"])
def test_row_gathers_carry_no_out_of_bounds_fill(platform):
    """Every row gather of the schedules and the ragged baseline has in-bounds indices by
    construction; jnp.take's default NaN fill (a mask and select over the whole gathered
    result, unfused on XLA:CPU) cost the decode layer up to 1.26x there."""
    from moe_relayfree.tools import analysis

    mesh = make_mesh(8)
    inputs = moe_inputs(8 * 4, D, F, 16, 2)
    for kw in (dict(schedule="decode"), dict(schedule="prefill"),
               dict(implementation="ragged_baseline")):
        fn = jax.jit(lambda *a, kw=kw: mr.expert_parallel_moe(*a, mesh=mesh, **kw))
        text = fn.trace(*inputs).lower(lowering_platforms=(platform,)).as_text()
        assert analysis.nan_filled_selects(text) == 0, kw
