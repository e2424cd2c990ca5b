"""The table of dispatch paths (moe_relayfree.paths): every reader of it knows every path, each
path does what its entry says it supports (exact forward on a mesh with data and tensor axes,
gradients, FP8 experts) against the dense reference, the schedule is resolved once per layer
trace, and the lowering policy is part of the compiled program's cache key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moe_relayfree as mr
from helpers import make_mesh, moe_inputs
from moe_relayfree import paths
from moe_relayfree.paths import PATHS, path_settings
from moe_relayfree.quant import quantize

N, D, F, E, K = 64, 16, 32, 16, 4


def settings(name: str) -> dict:
    # a path that may drop copies is checked for exactness with a buffer for every copy
    return dict(path_settings(name), **({"capacity_factor": None} if PATHS[name].drops else {}))


def test_every_reader_knows_every_path():
    from moe_relayfree.config import DispatchConfig
    from moe_relayfree.tools import selfcheck
    from moe_relayfree.tools.bench import variants
    from moe_relayfree_models.cli import DISPATCH

    mesh = make_mesh(2)
    for name, path in PATHS.items():
        config = DispatchConfig(mesh, **path_settings(name))  # the config accepts it
        assert mr.resolve(config, 2 * 4, K).path == name  # and resolves to it (T=4)
        assert name in selfcheck.API_VARIANTS and name in variants.LAYERS
        assert name in variants.PHASED
        assert (name in selfcheck.GRAD_VARIANTS) == path.gradients
        assert path.implementation in DISPATCH.values()  # infer.py's --dispatch
        assert path.layer and path.dispatch and path.experts and path.combine
        assert path.settings <= {f for f in DispatchConfig.__dataclass_fields__}
    phased, _ = variants.phases(E, 8, K, 2)
    assert set(phased) == set(PATHS)
    assert set(paths.IMPLEMENTATIONS) == {p.implementation for p in PATHS.values()}
    with pytest.raises(ValueError, match="implementation must be one of"):
        DispatchConfig(mesh, implementation="nope")


def test_auto_picks_a_decode_form_only_where_its_entry_allows():
    """"auto" takes the XLA decode schedule at the platform's threshold, but the Pallas path's
    decode form (fixed per-source regions: more memory than its prefill form at every size
    measured) only under an explicit threshold; either form still runs by name."""
    from moe_relayfree.config import DispatchConfig

    mesh = make_mesh(2)

    def resolved(impl, **kw):
        return mr.resolve(DispatchConfig(mesh, implementation=impl, **kw), 2 * 4, K).path

    assert resolved("relayfree") == "decode"  # T=4 under CPU's default threshold
    assert resolved("relayfree_pallas") == "relayfree_pallas"
    assert resolved("relayfree_pallas", decode_threshold=4) == "relayfree_pallas_decode"
    assert resolved("relayfree_pallas", decode_threshold=3) == "relayfree_pallas"
    assert resolved("relayfree_pallas", schedule="decode") == "relayfree_pallas_decode"


@pytest.mark.parametrize("name", list(PATHS))
def test_path_on_a_data_expert_tensor_mesh_with_gradients(name):
    """Each path on (data=2, ep=2, tp=2): output and, where the entry says so, the gradients of
    x, the routing weights and the three expert stacks equal the dense reference's."""
    path = PATHS[name]
    mesh = mr.make_mesh({"data": 2, "ep": 2, "tp": 2})
    if not path.multi_axis:
        pytest.skip(f"{name} runs on a 1-D expert mesh only")
    x, ids, w, wg, wu, wd = moe_inputs(N, D, F, E, K, seed=7)
    ct = jax.random.normal(jax.random.PRNGKey(0), x.shape)

    def loss(moe):
        def f(x, w, wg, wu, wd):
            y = moe(x, ids, w, wg, wu, wd)
            return jnp.sum(ct * y), y
        return jax.value_and_grad(f, argnums=range(5), has_aux=True)

    ep = lambda *a: mr.expert_parallel_moe(*a, mesh=mesh, tensor_axis="tp", **settings(name))  # noqa: E731
    (_, want), want_grads = loss(mr.dense_moe_reference)(x, w, wg, wu, wd)
    if path.gradients:
        (_, y), grads = jax.jit(loss(ep))(x, w, wg, wu, wd)
        for g, gw, what in zip(grads, want_grads, ("x", "w", "w_gate", "w_up", "w_down")):
            np.testing.assert_allclose(g, gw, atol=5e-5, rtol=5e-5, err_msg=what)
    else:
        y = jax.jit(ep)(x, ids, w, wg, wu, wd)
    np.testing.assert_allclose(y, want, atol=2e-5, rtol=2e-5)


# one case per implementation and expert function: an implementation's two schedules hand
# the same expert function the same kind of windows
FP8_CASES = list({(p.implementation, p.experts): n for n, p in reversed(PATHS.items())
                  if p.fp8}.values())[::-1]


@pytest.mark.parametrize("name", FP8_CASES)
def test_path_with_fp8_experts(name):
    """FP8 expert stacks (values + block scales) equal the reference over the same weights
    dequantized (every expert function each implementation hands its windows)."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((N, D)), jnp.bfloat16)
    ids = jnp.asarray(np.stack([rng.choice(E, K, replace=False) for _ in range(N)]), jnp.int32)
    w = jnp.asarray(rng.uniform(0.1, 1, (N, K)), jnp.float32)
    qs = [quantize(jnp.asarray(rng.standard_normal(s) / 6, jnp.float32), (8, 16))
          for s in ((E, D, F), (E, D, F), (E, F, D))]
    want = mr.dense_moe_reference(x, ids, w, *(q.dequantize(jnp.bfloat16) for q in qs))
    got = mr.expert_parallel_moe(x, ids, w, *qs, mesh=make_mesh(8), **settings(name))
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=3e-2, rtol=3e-2)


def test_a_layer_trace_resolves_its_schedule_once(monkeypatch):
    """MoELayer decides its path once per call (padding, rows per device and the dispatch all
    read that one answer); before, the schedule was chosen 3-4 times per layer trace."""
    calls = []
    real = paths.select_schedule
    monkeypatch.setattr(paths, "select_schedule", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    layer = mr.MoELayer(D, F, E, K, mesh=make_mesh(8), shared_d_ff=8, rngs=nnx.Rngs(0))
    x = jnp.ones((3, 5, D), jnp.float32)  # 15 tokens: padded to 16 over 8 devices
    jax.jit(lambda s, x: nnx.merge(nnx.graphdef(layer), s)(x))(nnx.state(layer), x)
    assert len(calls) == 1, calls
    assert layer.resolve(15) == mr.resolve(layer.dispatch, 15, K)
    assert layer.resolve(15).schedule == "decode" and layer.resolve(15).tokens_per_rank == 2


def test_changing_the_lowering_policy_makes_a_new_program():
    """``Lowering`` is part of the config, so of the compiled program's cache key: a change
    after a first call takes effect (a module global read at trace time did not)."""
    mesh = make_mesh(8)
    x, ids, w, wg, wu, wd = moe_inputs(N, D, F, E, K, seed=1)
    config = mr.DispatchConfig(mesh, schedule="prefill", capacity_factor=0.5)

    def text(cfg):
        return jax.jit(lambda *a: mr.expert_parallel_moe(*a, cfg)).lower(
            x, ids, w, wg, wu, wd).as_text()

    inline = text(config)
    one_body = text(config.replace(lowering=mr.Lowering(first_round_inline=())))
    assert inline != one_body
    # round 0 outside the rounds' loop: its exchanges appear twice in the program (the CPU
    # emulation's ragged all-to-alls are all_to_alls); one loop body: once
    assert inline.count("all_to_all") > one_body.count("all_to_all") > 0
    assert text(config) == inline  # the first policy's program again

    layer = mr.MoELayer(D, F, E, K, mesh=mesh, shared_d_ff=8, param_dtype=jnp.bfloat16,
                        rngs=nnx.Rngs(0))
    one = jnp.ones((8, D), jnp.bfloat16)  # one token per device: padded to 2 rows by default

    def layer_text(lowering):
        layer.dispatch = layer.dispatch.replace(lowering=lowering)
        layer.shared.min_rows = lowering.dense_min_rows
        graphdef, state = nnx.split(layer)
        return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, one).as_text()

    padded, plain = layer_text(mr.Lowering()), layer_text(mr.Lowering(dense_min_rows=1))
    assert padded.count("stablehlo.pad") > plain.count("stablehlo.pad")
    with pytest.raises(ValueError, match="dense_min_rows"):
        mr.Lowering(dense_min_rows=0)
    with pytest.raises(ValueError, match="lowering must be a Lowering"):
        mr.DispatchConfig(mesh, lowering={"dense_min_rows": 1})
