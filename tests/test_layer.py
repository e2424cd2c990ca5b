"""MoELayer (Flax NNX): sharded params, nnx.jit forward and backward vs dense math."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import moe_relayfree as mr
from helpers import dense_layer, layer_params, make_mesh

D, F, E = 16, 24, 16


CONFIGS = {
    "qwen3": dict(router=mr.RouterConfig(), shared_d_ff=0),
    "qwen2": dict(router=mr.RouterConfig(renormalize=False), shared_d_ff=32, shared_gate=True),
    "deepseek": dict(
        router=mr.RouterConfig(method="sigmoid_grouped", n_group=4, topk_group=2,
                               routed_scaling_factor=2.5, score_bias=True),
        shared_d_ff=20,
    ),
}


# Every router and shared-expert form, both schedules, on 1, 2, 4 and 8 ranks (the router and
# the schedule are independent; on CPU the decode schedule takes its gather transport;
# tests/test_decode.py forces windows; the prefill schedule's gradients on 8 ranks:
# tests/test_meshes.py, on 2-D meshes).
@pytest.mark.parametrize(
    "num_ranks,arch,schedule",
    [(4, "deepseek", "prefill"), (8, "qwen2", "decode"), (8, "qwen3", "decode"),
     (1, "deepseek", "prefill"), (2, "qwen2", "prefill")],
)
def test_layer_forward_backward(num_ranks, arch, schedule):
    mesh = make_mesh(num_ranks)
    k = 4
    layer = mr.MoELayer(D, F, E, k, mesh=mesh, schedule=schedule, rngs=nnx.Rngs(num_ranks),
                        **CONFIGS[arch])
    assert layer.w_gate[...].sharding.spec == P("ep", None, None)
    if layer.router_bias is not None:
        layer.router_bias[...] = jnp.linspace(-0.2, 0.2, E)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 7, D))  # 21 tokens: padded to the mesh
    cfg = CONFIGS[arch]["router"]
    params = layer_params(layer)

    y = nnx.jit(lambda m, x: m(x))(layer, x)
    np.testing.assert_allclose(y, dense_layer(params, x, k, cfg), atol=3e-5, rtol=3e-5)

    ct = jax.random.normal(jax.random.PRNGKey(2), x.shape)
    grads = nnx.jit(nnx.grad(lambda m, x: jnp.sum(ct * m(x))))(layer, x)
    want = jax.jit(jax.grad(lambda p: jnp.sum(ct * dense_layer(p, x, k, cfg))))(params)
    got = layer_params(grads)
    assert "bias" not in got  # the selection bias is not a gradient parameter
    assert set(got) == set(want) - {"bias"}
    for name, g in got.items():
        np.testing.assert_allclose(g, want[name], atol=5e-5, rtol=5e-5, err_msg=name)


def test_layer_bf16_activations_and_errors():
    mesh = make_mesh(8)
    layer = mr.MoELayer(D, F, E, 2, mesh=mesh, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, D)).astype(jnp.bfloat16)
    y = layer(x)
    assert y.dtype == jnp.bfloat16 and y.shape == x.shape
    want = dense_layer(layer_params(layer), x.astype(jnp.float32), 2, mr.RouterConfig())
    np.testing.assert_allclose(y.astype(np.float32), want, atol=5e-2, rtol=5e-2)
    with pytest.raises(ValueError, match="not divisible"):
        mr.MoELayer(D, F, 12, 2, mesh=mesh, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no axis"):
        mr.MoELayer(D, F, E, 2, mesh=mesh, axis="expert", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=f"x's last axis must be d_model={D}"):
        layer(x[..., :-4])
    with pytest.raises(ValueError, match="do not take jax.vmap.*flatten the batch"):
        jax.vmap(layer)(x)


def test_a_jitted_call_compiles_once():
    """The README's ``nnx.jit(lambda m, x: m(x))(layer, x)``: the router, its bias and the
    shared expert start replicated on the mesh, so the second call reuses the first program
    (they were on one device and came back placed on the mesh: a second compile)."""
    compiles = []

    def listen(name, _, **kw):
        if name == "/jax/core/compile/backend_compile_duration":
            compiles.append(name)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        layer = mr.MoELayer(D, F, E, 2, mesh=mr.make_ep_mesh(8), shared_d_ff=F, shared_gate=True,
                            router=mr.RouterConfig(method="sigmoid_grouped", score_bias=True),
                            rngs=nnx.Rngs(0))
        forward = nnx.jit(lambda m, x: m(x))
        x = jnp.ones((16, D))
        forward(layer, x)
        first = len(compiles)
        forward(layer, x)
        forward(layer, x)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert first > 0 and len(compiles) == first


def test_decode_overflow_reaches_the_schedule():
    """MoELayer(decode_overflow="one_pass") runs the decode schedule without its overflow
    conditionals (none left, where the default has them), same results. 8 tokens per rank:
    the worst case (128 window rows) is past one pass (32)."""
    mesh = make_mesh(8)
    x = jax.random.normal(jax.random.PRNGKey(1), (64, D))
    outs, conds = {}, {}
    for overflow in ("branch", "one_pass"):
        layer = mr.MoELayer(D, F, E, 2, mesh=mesh, schedule="decode", decode_overflow=overflow,
                            rngs=nnx.Rngs(0))
        fn = nnx.jit(lambda m, x: m(x))
        outs[overflow] = np.asarray(fn(layer, x))
        conds[overflow] = fn.lower(layer, x).compile().as_text().count(" conditional(")
    want = dense_layer(layer_params(layer), x, 2, mr.RouterConfig())
    np.testing.assert_allclose(outs["one_pass"], want, atol=3e-5, rtol=3e-5)
    np.testing.assert_allclose(outs["branch"], want, atol=3e-5, rtol=3e-5)
    assert conds["branch"] > conds["one_pass"] == 0, conds
    with pytest.raises(ValueError, match="decode_overflow"):
        mr.MoELayer(D, F, E, 2, mesh=mesh, decode_overflow="drop", rngs=nnx.Rngs(0))


def test_batch_smaller_than_the_devices_stays_replicated():
    """A 3-token batch on 8 devices (a decode step at batch 3): no padding to 8 rows split over
    the devices and no gather back; each device computes its experts' copies and one
    all-reduce per layer returns every token, as the dense math says."""
    import re

    mesh = make_mesh(8)
    layer = mr.MoELayer(D, F, E, 2, mesh=mesh, rngs=nnx.Rngs(0), **CONFIGS["qwen2"])
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 1, D))
    fn = nnx.jit(lambda m, x: m(x))
    want = dense_layer(layer_params(layer), x.reshape(3, D), 2, CONFIGS["qwen2"]["router"])
    np.testing.assert_allclose(np.asarray(fn(layer, x)).reshape(3, D), want, atol=3e-5, rtol=3e-5)
    text = fn.lower(layer, x).compile().as_text()
    ops = re.findall(r" (all-gather|all-reduce|all-to-all|reduce-scatter|collective-permute)"
                     r"(?:-start)?\(", text)
    assert ops == ["all-reduce"], ops


def test_each_device_routes_its_own_tokens():
    """top_k on batch-split logits in the global view makes XLA all-gather them ([N, E] per
    device, growing with the device count) and route the whole batch everywhere; the layer
    routes under shard_map instead. With the prefill schedule the only all-gather left is
    its int32 counts, so the compiled program must hold no floating-point all-gather."""
    import re

    mesh = make_mesh(8)
    layer = mr.MoELayer(D, F, E, 4, mesh=mesh, schedule="prefill", rngs=nnx.Rngs(0),
                        **CONFIGS["deepseek"])
    x = jax.device_put(jax.random.normal(jax.random.PRNGKey(1), (32, D)),
                       jax.sharding.NamedSharding(mesh, P("ep")))  # as a model's activations
    text = nnx.jit(lambda m, x: m(x)).lower(layer, x).compile().as_text()
    gathers = re.findall(r"= (\w+)\[[\d,]*\][^ ]* all-gather\(", text)
    assert gathers and all(t.startswith(("s", "u")) for t in gathers), gathers
    # the same experts and weights as routing the whole batch at once
    ids, w = layer.route(x)
    got_ids, got_w = mr.route_tokens(layer.logits(x), 4, CONFIGS["deepseek"]["router"],
                                     layer.router_bias[...], mesh=mesh)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_allclose(got_w, w, rtol=1e-6)
