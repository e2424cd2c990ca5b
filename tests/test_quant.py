"""FP8 expert weights kept on the devices (moe_relayfree.quant): every path equals the dense
reference over the weights dequantized here by the block rule (numpy, independent of the
library), and the stacks stay FP8 (half the bytes) where they are stored."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import moe_relayfree as mr
from helpers import dense_layer, make_mesh, skewed_ids
from moe_relayfree import experts
from moe_relayfree.quant import BlockQuantized, quantize

D, F, E, K = 40, 32, 16, 4
BLOCK = (8, 16)  # D = 40 is not a multiple of 16: partial edge blocks on w_down's columns


def dequantized(q: BlockQuantized) -> np.ndarray:
    """``values * scale`` per block, in float32 (numpy)."""
    v = np.asarray(q.values).astype(np.float32)
    s = np.asarray(q.scale, np.float32)
    br, bc = q.block
    return v * np.repeat(np.repeat(s, br, -2), bc, -1)[..., :v.shape[-2], :v.shape[-1]]


def test_quantize_is_the_block_rule():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, D, F)).astype(np.float32)
    w[1, :8, :16] = 0  # an all-zero block: scale 1, not a division by zero
    q = quantize(jnp.asarray(w), BLOCK)
    assert q.values.dtype == jnp.float8_e4m3fn and q.scale.shape == (3, 5, 2)
    blocks = np.abs(w).reshape(3, 5, 8, 2, 16).max(axis=(2, 4))
    want_scale = np.where(blocks > 0, blocks / 448.0, 1.0)
    np.testing.assert_allclose(np.asarray(q.scale), want_scale, rtol=3e-7)  # x / 448 as x * (1 / 448)
    # e4m3 keeps 3 mantissa bits: each value within 1/16 of its magnitude (plus subnormals)
    np.testing.assert_allclose(dequantized(q), w, rtol=2**-4, atol=float(want_scale.max()) * 2**-9)
    np.testing.assert_array_equal(np.asarray(q.dequantize(jnp.float32)), dequantized(q))


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(1)
    n = 64
    x = jnp.asarray(rng.standard_normal((n, D)), jnp.bfloat16)
    ids = jnp.asarray(np.stack([rng.choice(E, K, replace=False) for _ in range(n)]), jnp.int32)
    w = jnp.asarray(rng.uniform(0.1, 1, (n, K)), jnp.float32)
    shapes = ((E, D, F), (E, D, F), (E, F, D))
    qs = [quantize(jnp.asarray(rng.standard_normal(s) / 6, jnp.float32), BLOCK) for s in shapes]
    return x, ids, w, qs


def _reference(x, ids, w, qs):
    dense = [jnp.asarray(dequantized(q), x.dtype) for q in qs]
    return np.asarray(mr.dense_moe_reference(x, ids, w, *dense).astype(jnp.float32))


# the CPU kernel (per-expert dequantization) on both schedules and the capacity baseline (the
# ragged one shares grouped_swiglu); the GPU/TPU
# paths through the CPU registry: decode-sized buffers tile by tile with block-scaled dots
# ("tiles"), larger ones through ragged_dot over the dequantized stacks ("stacks"); a tensor
# axis splitting the blocks' f dim; all copies on one expert
@pytest.mark.parametrize("implementation,schedule,kernel,mesh_shape,routing", [
    ("relayfree", "prefill", "cpu", (8,), "uniform"),
    ("relayfree", "decode", "cpu", (8,), "one_expert"),
    ("relayfree", "prefill", "tiles", (8,), "uniform"),
    ("relayfree", "decode", "tiles", (8,), "one_expert"),
    ("relayfree", "prefill", "stacks", (8,), "uniform"),
    ("relayfree", "auto", "cpu", (4, 2), "uniform"),
    ("capacity_baseline", "auto", "cpu", (8,), "uniform"),
])
def test_quantized_experts_equal_the_dequantized_reference(case, implementation, schedule, kernel,
                                                           mesh_shape, routing, monkeypatch):
    x, ids, w, qs = case
    n = x.shape[0]
    if routing != "uniform":
        ids = jnp.asarray(skewed_ids(routing, n, K, E, 8))
    want = _reference(x, ids, w, qs)
    if len(mesh_shape) == 2:
        mesh = jax.make_mesh(mesh_shape, ("ep", "tp"), devices=jax.devices()[:8])
        settings = dict(tensor_axis="tp")
    else:
        mesh, settings = make_mesh(8), {}
    if kernel != "cpu":
        experts.register_grouped_swiglu("cpu", None)  # the GPU/TPU path
        monkeypatch.setattr(experts, "QUANTIZED_TILED_MAX_ROWS", 4096 if kernel == "tiles" else 0)
    try:
        got = mr.expert_parallel_moe(x, ids, w, *qs, mesh=mesh, schedule=schedule,
                                     implementation=implementation, **settings)
    finally:
        experts.register_grouped_swiglu("cpu", experts.grouped_swiglu_tiled)
    assert got.dtype == jnp.bfloat16
    got = np.asarray(got.astype(jnp.float32))
    if kernel == "tiles":
        # each 8-row block's partial sums scaled in f32: closer to the f32 math than bf16
        # weights are, so compared with that (within the bf16 output's and hidden's rounding)
        exact = _reference(x.astype(jnp.float32), ids, w, qs)
        np.testing.assert_allclose(got, exact, atol=2e-2, rtol=2e-2)
        assert np.abs(got - exact).max() <= np.abs(want - exact).max() * 1.5
        return
    # bf16 outputs; a tensor axis adds its partial sums in another order
    atol = 2e-2 if settings else 0
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)


def test_layer_keeps_fp8_experts_and_matches_dense_math():
    mesh = make_mesh(8)
    layer = mr.MoELayer(D, F, E, K, mesh=mesh, expert_block=BLOCK, rngs=nnx.Rngs(0))
    for name in ("w_gate", "w_up", "w_down"):
        values, scale = getattr(layer, name)[...], getattr(layer, name + "_scale")[...]
        assert values.dtype == jnp.float8_e4m3fn and scale.dtype == jnp.float32
        assert values.sharding.spec == scale.sharding.spec == P("ep", None, None)
        # one byte per weight on each device: half of bf16
        assert values.addressable_shards[0].data.nbytes == E // 8 * D * F
    assert layer.w_down_scale[...].shape == (E, F // 8, -(-D // 16))
    params = {"router": jnp.asarray(layer.router[...]).astype(jnp.bfloat16)}  # as the layer casts it
    for short, name in (("wg", "w_gate"), ("wu", "w_up"), ("wd", "w_down")):
        q = BlockQuantized(getattr(layer, name)[...], getattr(layer, name + "_scale")[...], BLOCK)
        params[short] = jnp.asarray(dequantized(q), jnp.bfloat16)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 7, D)).astype(jnp.bfloat16)
    for schedule in ("prefill", "decode"):
        layer.dispatch = layer.dispatch.replace(schedule=schedule)
        y = nnx.jit(lambda m, x: m(x))(layer, x)
        want = dense_layer(params, x, K, mr.RouterConfig())
        np.testing.assert_array_equal(np.asarray(y.astype(jnp.float32)),
                                      np.asarray(want.astype(jnp.float32)))


def test_gradients_through_fp8_experts_are_refused_clearly():
    """FP8 experts are inference only: a gradient says so (it failed deep in the kernels with a
    message about while loops), whatever is differentiated; the forward still runs. (Under jit:
    the refusal is raised while the backward is traced, and an eager gradient first ran the
    forward op by op for half a minute.)"""
    layer = mr.MoELayer(D, F, E, K, mesh=mr.make_ep_mesh(8), expert_block=BLOCK,
                        rngs=nnx.Rngs(0))
    x = jnp.ones((16, D), jnp.float32)
    assert bool(jnp.isfinite(layer(x)).all())
    with pytest.raises(ValueError, match="FP8 experts .* are inference only"):
        nnx.jit(nnx.grad(lambda m: m(x).sum()))(layer)
    with pytest.raises(ValueError, match="inference only"):
        jax.jit(jax.grad(lambda x: layer(x).sum()))(x)


def test_quantize_experts_in_place_and_bad_splits():
    mesh = make_mesh(8)
    layer = mr.MoELayer(D, F, E, K, mesh=mesh, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    before = np.asarray(layer.w_up[...].astype(jnp.float32))
    layer.quantize_experts(BLOCK)
    q = BlockQuantized(layer.w_up[...], layer.w_up_scale[...], BLOCK)
    np.testing.assert_allclose(dequantized(q), before, rtol=2**-4, atol=1e-3)
    with pytest.raises(ValueError, match="already quantized"):
        layer.quantize_experts(BLOCK)
    # split over a tensor axis (16 of f's 32 columns per rank), each shard quantized where it
    # lies: the same values and scales as the whole stack quantized on one device
    tmesh = jax.make_mesh((4, 2), ("ep", "tp"), devices=jax.devices()[:8])
    split = mr.MoELayer(D, F, E, K, mesh=tmesh, tensor_axis="tp", rngs=nnx.Rngs(0))
    whole = quantize(jnp.asarray(np.asarray(split.w_gate[...])), BLOCK)
    split.quantize_experts(BLOCK)
    assert split.w_gate_scale[...].sharding.spec == P("ep", None, "tp")
    np.testing.assert_array_equal(np.asarray(split.w_gate[...]).view(np.uint8),
                                  np.asarray(whole.values).view(np.uint8))
    np.testing.assert_array_equal(np.asarray(split.w_gate_scale[...]), np.asarray(whole.scale))
    # f = 32 over 4 tensor ranks is 8 columns each: half of a 16-wide block
    tmesh = jax.make_mesh((2, 4), ("ep", "tp"), devices=jax.devices()[:8])
    with pytest.raises(ValueError, match="whole number of its 16-wide blocks"):
        mr.MoELayer(D, F, E, K, mesh=tmesh, tensor_axis="tp", expert_block=BLOCK, rngs=nnx.Rngs(0))
    x = jnp.ones((8, D), jnp.bfloat16)
    ids = jnp.zeros((8, K), jnp.int32) + jnp.arange(K)
    qs = [quantize(jnp.ones(s), BLOCK) for s in ((E, D, F), (E, D, F), (E, F, D))]
    with pytest.raises(ValueError, match="whole number of its 16-wide blocks"):
        mr.expert_parallel_moe(x, ids, jnp.ones((8, K)), *qs, mesh=tmesh, tensor_axis="tp")


@pytest.mark.parametrize("schedule", ["prefill", "decode"])
def test_cpu_kernel_never_writes_the_stacks_dequantized(schedule):
    """The compiled CPU program's temporaries with FP8 experts are those of the bf16 stacks
    plus less than one expert's matrices in bf16 (the expert the kernel is visiting): a
    dequantized copy of the rank's stacks (once, a wrapper handed the kernel dense weights)
    would add them all."""
    e, d, f, n = 16, 256, 128, 64
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.bfloat16)
    ids = jnp.asarray(np.stack([rng.choice(e, K, replace=False) for _ in range(n)]), jnp.int32)
    w = jnp.ones((n, K), jnp.float32)
    qs = [quantize(jnp.asarray(rng.standard_normal(s), jnp.float32), (128, 128))
          for s in ((e, d, f), (e, d, f), (e, f, d))]
    mesh = make_mesh(8)

    def temp(ws):
        fn = jax.jit(lambda *a: mr.expert_parallel_moe(*a, mesh=mesh, schedule=schedule))
        return fn.lower(x, ids, w, *ws).compile().memory_analysis().temp_size_in_bytes

    one_expert = 3 * d * f * 2
    assert temp(qs) < temp([q.dequantize(jnp.bfloat16) for q in qs]) + one_expert
