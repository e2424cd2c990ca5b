"""Router statistics, auxiliary losses and the DeepSeek-V3 bias update, against numpy formulas,
from a MoELayer on a (data, ep) mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moe_relayfree as mr
from helpers import dense_layer, layer_params

D, F, E, K = 16, 24, 16, 4


def _numpy_terms(logits: np.ndarray, ids: np.ndarray, method: str):
    """Switch/GShard balance loss and ST-MoE z-loss written out in numpy (float64)."""
    logits = logits.astype(np.float64)
    if method == "sigmoid_grouped":
        s = 1 / (1 + np.exp(-logits))
        probs = s / s.sum(1, keepdims=True)
    else:
        e = np.exp(logits - logits.max(1, keepdims=True))
        probs = e / e.sum(1, keepdims=True)
    load = np.bincount(ids.reshape(-1), minlength=E) / ids.size
    m = logits.max(1)
    z = np.mean((m + np.log(np.exp(logits - m[:, None]).sum(1))) ** 2)
    return load, probs.mean(0), E * np.sum(load * probs.mean(0)), z


@pytest.mark.parametrize("method", ["softmax_topk", "sigmoid_grouped"])
def test_sown_router_terms_match_numpy_on_a_2d_mesh(method):
    mesh = mr.make_mesh({"data": 2, "ep": 4})
    router = (mr.RouterConfig(method=method, n_group=4, topk_group=2, score_bias=True)
              if method == "sigmoid_grouped" else mr.RouterConfig())
    layer = mr.MoELayer(D, F, E, K, mesh=mesh, router=router, router_stats=True,
                        load_balancing_weight=0.01, z_loss_weight=0.001, rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.PRNGKey(4), (3, 7, D))  # 21 tokens, padded to 24
    params = layer_params(layer)

    forward = nnx.capture(lambda m, x: m(x), nnx.Intermediate)
    y, terms = nnx.jit(forward)(layer, x)
    np.testing.assert_allclose(y, dense_layer(params, x, K, router), atol=3e-5, rtol=3e-5)

    tokens = np.asarray(x).reshape(-1, D)
    logits = tokens @ np.asarray(params["router"])
    ids, _ = mr.route(jnp.asarray(logits), K, router, params.get("bias"))
    load, prob_mean, balance, z = _numpy_terms(logits, np.asarray(ids), method)
    got = {k: np.asarray(v.get_value()[0]) for k, v in terms.items()}
    assert set(got) == set(mr.balance.STATS + mr.balance.LOSSES)
    np.testing.assert_allclose(got["router_load"], load, atol=1e-6)  # padding rows not counted
    np.testing.assert_allclose(got["router_prob_mean"], prob_mean, atol=1e-5)
    np.testing.assert_allclose(got["load_balancing_loss"], 0.01 * balance, rtol=1e-4)
    np.testing.assert_allclose(got["router_z_loss"], 0.001 * z, rtol=1e-4)
    np.testing.assert_allclose(mr.balance.total_aux_loss(terms), 0.01 * balance + 0.001 * z,
                               rtol=1e-4)

    # The loss terms train the router: gradient of the summed terms vs the formula in jnp.
    def aux(m, x):
        return mr.balance.total_aux_loss(forward(m, x)[1])

    grad = nnx.jit(nnx.grad(aux))(layer, x)

    def formula(router_w):
        lg = jnp.asarray(tokens) @ router_w
        if method == "sigmoid_grouped":
            s = jax.nn.sigmoid(lg)
            probs = s / s.sum(1, keepdims=True)
        else:
            probs = jax.nn.softmax(lg, axis=1)
        lse = jax.scipy.special.logsumexp(lg, axis=1)
        return 0.01 * E * jnp.sum(jnp.asarray(load) * probs.mean(0)) + 0.001 * jnp.mean(lse**2)

    want = jax.grad(formula)(jnp.asarray(params["router"]))
    np.testing.assert_allclose(grad.router[...], want, atol=1e-6, rtol=1e-4)


def test_off_by_default_and_bias_update():
    mesh = mr.make_ep_mesh(8)
    layer = mr.MoELayer(D, F, E, K, mesh=mesh, rngs=nnx.Rngs(0),
                        router=mr.RouterConfig(method="sigmoid_grouped", score_bias=True))
    _, terms = nnx.capture(layer, nnx.Intermediate)(jnp.ones((8, D)))
    assert not terms  # off unless asked for: inference sows nothing

    load = jnp.array([3.0, 1.0, 2.0, 2.0] * 4)  # mean 2: expert 0 over, 1 under, 2/3 even
    layer.router_bias[...] = jnp.full((E,), 0.5)
    layer.update_router_bias(load, rate=0.1)
    np.testing.assert_allclose(layer.router_bias[...], [0.4, 0.6, 0.5, 0.5] * 4, atol=1e-7)
    with pytest.raises(ValueError, match=r"load must be \[E=16\]"):
        layer.update_router_bias(load[:4])
    plain = mr.MoELayer(D, F, E, K, mesh=mesh, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no router bias"):
        plain.update_router_bias(load)
