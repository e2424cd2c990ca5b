"""Multi-axis meshes: tokens over every batch axis, experts over the expert axis, an optional
tensor axis over the expert width; verbs under check_vma; eager placement; empty batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import moe_relayfree as mr
from moe_relayfree.api import replicates_tokens
from helpers import moe_inputs
from moe_relayfree.experts import grouped_swiglu

N, D, F, E, K = 64, 16, 32, 16, 4

MESHES = {
    "data2-ep4": ({"data": 2, "ep": 4}, {}),
    "data4-ep2": ({"data": 4, "ep": 2}, {}),
    "ep4-data2": ({"ep": 4, "data": 2}, {}),
    # three axes, two of them batch axes; the third splits each expert's width
    "data2-ep2-tp2": ({"data": 2, "ep": 2, "tp": 2}, {"tensor_axis": "tp"}),
}


def _shard_map_operand_shapes(closed_jaxpr):
    """Per-device shapes of the operands of every shard_map in a jaxpr (searched recursively)."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "shard_map":
                found.append([v.aval.shape for v in eqn.params["jaxpr"].invars])
            for p in eqn.params.values():
                for sub in p if isinstance(p, (list, tuple)) else (p,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        walk(sub)

    walk(closed_jaxpr.jaxpr)
    return found


def _groups_disagree_ids(rng):
    """Routing on a (data=4, ep=2) mesh where data row 0's tokens all go to rank 1 (two prefill
    rounds at capacity 1.0) and the other rows are balanced (one round)."""
    ids = np.concatenate([np.stack([rng.choice(8, 2, replace=False),
                                    8 + rng.choice(8, 2, replace=False)], 1).reshape(-1)
                          for _ in range(N)]).reshape(N, K)
    ids[: N // 4] = [8 + rng.choice(8, K, replace=False) for _ in range(N // 4)]
    return ids.astype(np.int32)


# Each mesh once per schedule where it adds coverage: the (4, 2) prefill case has expert-parallel
# groups that need different numbers of rounds (a deadlock before the inputs were made varying
# over every axis up front: a weight-gradient sum over 'data' ran inside one group's branch).
@pytest.mark.parametrize("name,schedule", [
    ("data2-ep4", "prefill"), ("data2-ep4", "decode"), ("data4-ep2", "prefill"),
    ("ep4-data2", "decode"), ("data2-ep2-tp2", "prefill"), ("data2-ep2-tp2", "decode"),
])
def test_forward_gradients_and_per_device_tokens(name, schedule):
    shape, kw = MESHES[name]
    mesh = mr.make_mesh(shape)
    ids = None
    if name == "data4-ep2":
        ids = _groups_disagree_ids(np.random.default_rng(5))
        kw = dict(kw, capacity_factor=1.0)
    x, ids, w, wg, wu, wd = moe_inputs(N, D, F, E, K, seed=len(name), ids=ids)
    ct = jax.random.normal(jax.random.PRNGKey(0), x.shape)

    def loss(moe):
        def f(x, w, wg, wu, wd):
            y = moe(x, ids, w, wg, wu, wd)
            return jnp.sum(ct * y), y
        return jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True)

    run = loss(lambda *a: mr.expert_parallel_moe(*a, mesh=mesh, schedule=schedule, **kw))
    (_, y), grads = jax.jit(run)(x, w, wg, wu, wd)
    (_, want), want_grads = loss(mr.dense_moe_reference)(x, w, wg, wu, wd)
    np.testing.assert_allclose(y, want, atol=2e-5, rtol=2e-5)
    for g, gw, what in zip(grads, want_grads, ("x", "w", "w_gate", "w_up", "w_down")):
        np.testing.assert_allclose(g, gw, atol=5e-5, rtol=5e-5, err_msg=what)

    # No device repeats another's work: each holds N / (devices of the batch axes) tokens, and
    # each expert weight is split over the expert (and tensor) axis only.
    lay = mr.make_layout(mesh, tensor_axis=kw.get("tensor_axis"))
    shards = 8 // lay.tensor_size
    jaxpr = jax.make_jaxpr(run)(x, w, wg, wu, wd)
    shapes = _shard_map_operand_shapes(jaxpr)
    assert shapes, "no shard_map in the program"
    ep, tp = shape["ep"], lay.tensor_size
    assert shapes[0] == [(N // shards, D), (N // shards, K), (N // shards, K),
                         (E // ep, D, F // tp), (E // ep, D, F // tp), (E // ep, F // tp, D)]


@pytest.mark.parametrize("name", ["data2-ep4", "data2-ep2-tp2"])
def test_batch_smaller_than_the_shards_runs_replicated_with_gradients(name):
    """3 tokens on 8 token shards: every device takes all of them (relay-free decode), the
    tensor axis still splits f; outputs and gradients are the dense ones."""
    shape, kw = MESHES[name]
    mesh = mr.make_mesh(shape)
    x, ids, w, wg, wu, wd = moe_inputs(3, D, F, E, K, seed=9)
    assert replicates_tokens(3, mr.DispatchConfig(mesh, tensor_axis=kw.get("tensor_axis")))
    ct = jax.random.normal(jax.random.PRNGKey(3), x.shape)

    def loss(moe):
        return jax.value_and_grad(lambda *a: jnp.sum(ct * moe(a[0], ids, *a[1:])), argnums=range(5))

    got = jax.jit(loss(lambda *a: mr.expert_parallel_moe(*a, mesh=mesh, **kw)))(x, w, wg, wu, wd)
    want = loss(mr.dense_moe_reference)(x, w, wg, wu, wd)
    np.testing.assert_allclose(got[0], want[0], atol=2e-5, rtol=2e-5)
    for g, gw, what in zip(got[1], want[1], ("x", "w", "w_gate", "w_up", "w_down")):
        np.testing.assert_allclose(g, gw, atol=5e-5, rtol=5e-5, err_msg=what)


@pytest.mark.parametrize("schedule,transport", [("prefill", "auto"), ("decode", "gather"),
                                                ("decode", "windows")])
def test_verbs_inside_a_users_2d_shard_map_with_check_vma(schedule, transport):
    """A user's shard_map over (data, ep), check_vma on (the default): every buffer the verbs
    make varies over both axes, so the platform branches and loops type-check."""
    mesh = mr.make_mesh({"data": 2, "ep": 4})
    x, ids, w, wg, wu, wd = moe_inputs(N, D, F, E, K, seed=3)
    opts = {} if schedule == "prefill" else {"transport": transport}

    def body(x, ids, w, wg, wu, wd):
        win, handle = mr.dispatch(x, ids, w, num_experts=E, axis_name="ep", schedule=schedule,
                                  **opts)
        return mr.combine(grouped_swiglu(win.rows, win.group_sizes, wg, wu, wd), handle)

    tok, exp = P(("data", "ep")), P("ep", None, None)
    fn = jax.shard_map(body, mesh=mesh, in_specs=(tok,) * 3 + (exp,) * 3, out_specs=tok)
    ct = jax.random.normal(jax.random.PRNGKey(1), x.shape)
    grad = jax.jit(jax.grad(lambda x, wg: jnp.sum(ct * fn(x, ids, w, wg, wu, wd)), argnums=(0, 1)))
    want = jax.grad(lambda x, wg: jnp.sum(ct * mr.dense_moe_reference(x, ids, w, wg, wu, wd)),
                    argnums=(0, 1))(x, wg)
    np.testing.assert_allclose(jax.jit(fn)(x, ids, w, wg, wu, wd),
                               mr.dense_moe_reference(x, ids, w, wg, wu, wd), atol=2e-5)
    for g, gw in zip(grad(x, wg), want):
        np.testing.assert_allclose(g, gw, atol=5e-5, rtol=5e-5)


def test_eager_placement_and_empty_batch():
    mesh = mr.make_mesh({"data": 2, "ep": 4})
    x, ids, w, wg, wu, wd = moe_inputs(N, D, F, E, K, seed=4)
    tokens = NamedSharding(mesh, P(("data", "ep")))
    want = mr.dense_moe_reference(x, ids, w, wg, wu, wd)

    # Uncommitted x (a fresh jnp array): the output lies on the mesh like the tokens, and
    # combines with the caller's other mesh arrays.
    assert not x.committed
    y = mr.expert_parallel_moe(x, ids, w, wg, wu, wd, mesh=mesh, schedule="prefill")
    assert y.sharding == tokens
    other = jax.device_put(jnp.ones((N, D)), NamedSharding(mesh, P("data")))
    np.testing.assert_allclose(y + other, want + 1, atol=2e-5)

    # Committed x: the output keeps x's sharding, whatever it is.
    by_data = NamedSharding(mesh, P("data"))
    y = mr.expert_parallel_moe(jax.device_put(x, by_data), ids, w, wg, wu, wd, mesh=mesh)
    assert y.sharding == by_data
    np.testing.assert_allclose(y, want, atol=2e-5)

    # Empty batch: eager, under jit, and through the layer.
    empty = (x[:0], ids[:0], w[:0], wg, wu, wd)
    y = mr.expert_parallel_moe(*empty, mesh=mesh)
    assert y.shape == (0, D) and y.dtype == x.dtype
    y = jax.jit(lambda *a: mr.expert_parallel_moe(*a, mesh=mesh))(*empty)
    assert y.shape == (0, D)
    from flax import nnx

    layer = mr.MoELayer(D, F, E, K, mesh=mesh, rngs=nnx.Rngs(0))
    assert layer(jnp.zeros((2, 0, D))).shape == (2, 0, D)


def test_mesh_errors_name_the_axes():
    mesh = mr.make_mesh({"data": 2, "ep": 4})
    with pytest.raises(ValueError, match=r"one mesh axis name, got \('data', 'ep'\).*batch_axes"):
        mr.make_layout(mesh, axis=("data", "ep"))
    with pytest.raises(ValueError, match=r"no axis 'expert' .*mesh axes: 'data', 'ep'"):
        mr.make_layout(mesh, axis="expert")
    with pytest.raises(ValueError, match="must include the expert axis 'ep'"):
        mr.make_layout(mesh, batch_axes=("data",))
    with pytest.raises(ValueError, match="tensor_axis and the expert axis"):
        mr.make_layout(mesh, tensor_axis="ep")
    with pytest.raises(ValueError, match=r"no axis 'tp'"):
        mr.make_layout(mesh, tensor_axis="tp")
    with pytest.raises(ValueError, match="has 6 devices, 8 available"):
        mr.make_mesh({"data": 2, "ep": 3})
    with pytest.raises(ValueError, match="must look like"):
        mr.parse_mesh("data:2")
    assert mr.parse_mesh("data=2, ep=4") == {"data": 2, "ep": 4}
    x, ids, w, wg, wu, wd = moe_inputs(12, D, F, E, K)
    with pytest.raises(ValueError, match=r"N=12 tokens is not divisible by the 8 devices of "
                                         r"batch axes \('data', 'ep'\)"):
        mr.expert_parallel_moe(x, ids, w, wg, wu, wd, mesh=mesh)
    # 3 tokens, fewer than the 8 shards: the relay-free decode runs them on every device
    small = [a[:3] for a in (x, ids, w)] + [wg, wu, wd]
    np.testing.assert_allclose(mr.expert_parallel_moe(*small, mesh=mesh),
                               mr.dense_moe_reference(*small), atol=2e-5)
    # the same 12 tokens are fine when only 'ep' splits them (replicated over 'data')
    y = mr.expert_parallel_moe(x, ids, w, wg, wu, wd, mesh=mesh, batch_axes="ep")
    np.testing.assert_allclose(y, mr.dense_moe_reference(x, ids, w, wg, wu, wd), atol=2e-5)
