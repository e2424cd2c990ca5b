"""Decode schedule (every transport) against the dense reference, and its lowered program."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import moe_relayfree as mr
from helpers import moe_inputs, skewed_ids
from moe_relayfree import decode, transports
from moe_relayfree.tools import analysis
from moe_relayfree.experts import grouped_swiglu, windows_swiglu

D, F = 16, 24
TOK, EXP = P("ep"), P("ep", None, None)


@functools.lru_cache(maxsize=None)
def decode_layer(num_ranks: int, num_experts: int, transport: str, overflow: str = "branch"):
    """jit(shard_map(decode_moe)) on the first ``num_ranks`` devices (``"replicated"``: the
    tokens and the output are the same on every device)."""
    mesh = mr.make_ep_mesh(num_ranks)
    tok = P() if transport == "replicated" else TOK

    def body(x, ids, w, wg, wu, wd):
        def experts(win):
            return windows_swiglu(win, wg, wu, wd)

        return decode.decode_moe(x, ids, w, experts, num_experts=num_experts, axis_name="ep",
                                 transport=transport, overflow=overflow)

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(tok,) * 3 + (EXP,) * 3,
                                 out_specs=tok))


def check(num_ranks, num_experts, transport, inputs, atol=2e-5, overflow="branch"):
    want = mr.dense_moe_reference(*inputs)
    got = decode_layer(num_ranks, num_experts, transport, overflow)(*inputs)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=atol, rtol=atol)


@pytest.mark.parametrize(
    "num_ranks,num_experts,k,transport",
    [
        (1, 4, 2, "auto"),  # gather
        (2, 2, 1, "windows"),  # one local expert
        (2, 8, 2, "auto"),  # gather, P == k
        (4, 16, 8, "auto"),  # gather, El < k
        (8, 8, 1, "windows"),  # El = 1
        (8, 32, 5, "windows"),  # odd k
        (8, 32, 3, "auto"),  # P > k: blocks natively, gather on CPU
        (8, 64, 8, "auto"),  # gather
        (8, 256, 8, "windows"),  # blocks at P == k, El = 32
        (4, 256, 3, "gather"),  # gather at P > k
    ],
)
def test_matches_dense_reference(num_ranks, num_experts, k, transport):
    assert decode.choose_transport(num_ranks, k) == ("gather" if num_ranks <= k else "windows")
    inputs = moe_inputs(5 * num_ranks, D, F, num_experts, k, seed=num_ranks + k)
    check(num_ranks, num_experts, transport, inputs)


@pytest.mark.parametrize("transport", ["gather", "windows", "layer", "prefill_layer"])
def test_cpu_tiles_follow_the_copies_a_rank_receives(transport):
    """The windows are sized for a skewed batch (2*T*k rows, then up to P*T*min(k, El)); the
    CPU kernel's tiles follow the T*k copies a rank receives on average, not the buffer, whose
    tiles would be mostly masked rows that the CPU computes in full (P=8, E=8, k=2, T=8: tiles
    of 16 rows, not 32). "layer": expert_parallel_moe's own expert compute passes it on;
    "prefill_layer": the prefill schedule's round buffer (2*T*k rows here) gets it too."""
    tokens, k = 8, 2
    inputs = moe_inputs(tokens * 8, D, F, 8, k)
    if transport in ("layer", "prefill_layer"):
        mesh = mr.make_ep_mesh(8)
        schedule = "decode" if transport == "layer" else "prefill"
        fn = jax.jit(lambda *a: mr.expert_parallel_moe(*a, mesh=mesh, schedule=schedule))
    else:
        fn = decode_layer(8, 8, transport)
    text = fn.trace(*inputs).lower().as_text()
    lhs_rows = {int(r) for r in re.findall(r"stablehlo.dot_general.*?: \(tensor<(\d+)x", text)}
    assert lhs_rows == {tokens * k}, lhs_rows


@pytest.mark.parametrize("kind", ["one_expert", "one_rank", "empty_experts"])
@pytest.mark.parametrize("transport", ["gather", "windows"])
def test_skewed_routing_is_exact(kind, transport):
    """``one_rank`` sends every copy to the last rank: 8x the typical window rows, so that
    rank also runs the grouped GEMM over its overflow rows while the others do not."""
    ids = skewed_ids(kind, 64, 2, 16, 8)
    check(8, 16, transport, moe_inputs(64, D, F, 16, 2, seed=3, ids=ids))


@pytest.mark.parametrize("tokens,num_experts,k,kind", [
    (1, 16, 2, None),  # one token: seven ranks have nothing to compute
    (7, 16, 2, "one_rank"),  # 14 copies on one rank: past the 8 typical rows, the branch runs
    (5, 64, 8, "one_expert"),  # El = k
    (3, 8, 1, "empty_experts"),  # El = 1
])
def test_replicated_small_batch_is_exact(tokens, num_experts, k, kind):
    """Fewer tokens than ranks, the same on every rank: no dispatch, one psum, any skew."""
    ids = None if kind is None else skewed_ids(kind, tokens, k, num_experts, 8)
    check(8, num_experts, "replicated", moe_inputs(tokens, D, F, num_experts, k, seed=tokens, ids=ids))


def test_replicated_program_is_one_all_reduce():
    """The whole replicated decode layer moves one ``[N, d]`` f32 all-reduce (no gather, no
    reduce-scatter, no all-to-all); it sorts only the ``N*k`` copy keys."""
    tokens, k = 6, 2
    inputs = moe_inputs(tokens, D, F, 16, k)
    text = decode_layer(8, 16, "replicated").trace(*inputs).lower(
        lowering_platforms=("cuda",)).as_text()
    ops = analysis.collectives(text)
    assert [(c.op, c.moved.shape, c.moved.dtype) for c in ops] == [
        ("all_reduce", (tokens, D), "f32")], ops
    sorts = [b for b in analysis.stablehlo_buffers(text, 1) if b.op == "stablehlo.sort"]
    assert sorts and max(b.elements for b in sorts) <= tokens * k
    assert analysis.float_scatter_adds(text) == []


@pytest.mark.parametrize("transport", ["gather", "windows", "replicated"])
def test_one_pass_overflow_has_no_conditional_and_stays_exact(transport):
    """overflow="one_pass": exact with every copy on one rank, and the compiled program has
    none of the default's conditionals for further passes (XLA:GPU syncs the host on each);
    with the gather transports none is left (the windows transport's CPU emulation of the
    ragged all-to-all keeps its own)."""
    ids = skewed_ids("one_rank", 64, 2, 16, 8)
    inputs = moe_inputs(64, D, F, 16, 2, seed=3, ids=ids)
    check(8, 16, transport, inputs, overflow="one_pass")
    count = {overflow: decode_layer(8, 16, transport, overflow).lower(*inputs).compile()
             .as_text().count(" conditional(") for overflow in ("branch", "one_pass")}
    assert count["branch"] >= count["one_pass"] + 1, count
    if transport != "windows":
        assert count["one_pass"] == 0


def test_unknown_overflow_is_rejected():
    with pytest.raises(ValueError, match="overflow must be"):
        decode_layer(2, 4, "gather", "drop")(*moe_inputs(4, D, F, 4, 2))


@pytest.mark.parametrize("transport", ["gather", "windows"])
def test_every_token_on_one_expert_k1(transport):
    ids = np.full((48, 1), 5, np.int32)
    check(8, 8, transport, moe_inputs(48, D, F, 8, 1, ids=ids))


@pytest.mark.parametrize("transport", ["gather", "windows", "replicated"])
def test_bfloat16(transport):
    inputs = moe_inputs(64, D, F, 16, 4, seed=5, dtype=jnp.bfloat16)
    check(8, 16, transport, inputs, atol=3e-2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_gather_tokens_packs_ids_and_weights_bit_exactly(dtype):
    """One all_gather carries x, ids and f32 weights, every bit kept (NaN payloads, inf,
    subnormals), for bf16 x too, whose rows travel as uint16."""
    mesh = mr.make_ep_mesh(4)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 6)), dtype)
    ids = jnp.asarray(rng.integers(-2**31, 2**31 - 1, (8, 3)), jnp.int32)
    w = np.array(rng.standard_normal((8, 3)), np.float32)
    w.flat[:4] = [np.nan, np.inf, -0.0, 1e-40]
    # weights whose low or high 16 bits are bf16 NaNs (signalling and quiet), and an f32
    # signalling NaN: a bf16 all-gather widened to f32 and back canonicalised such halves
    w.view(np.uint32).flat[4:8] = [0x3F007F85, 0x3F00FFC1, 0x7F810000, 0x7F800001]
    fn = jax.jit(jax.shard_map(lambda *a: transports.gather_tokens(*a, "ep"), mesh=mesh,
                               in_specs=(TOK,) * 3, out_specs=(P(),) * 3, check_vma=False))
    gx, gids, gw = fn(x, ids, jnp.asarray(w))
    np.testing.assert_array_equal(np.asarray(gx), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(gids), np.asarray(ids))
    assert np.asarray(gw).view(np.int32).tolist() == w.view(np.int32).tolist()


@pytest.mark.parametrize("transport,kind", [("gather", None), ("gather", "one_rank"),
                                            ("windows", None), ("windows", "one_rank"),
                                            ("replicated", "one_rank")])
def test_gradients_match_reference(transport, kind):
    ids = None if kind is None else skewed_ids(kind, 32, 2, 8, 4)
    x, ids, w, wg, wu, wd = moe_inputs(32, 8, 12, 8, 2, seed=7, ids=ids)
    ct = jax.random.normal(jax.random.PRNGKey(0), x.shape)
    layer = decode_layer(4, 8, transport)

    def loss(fn):
        return lambda x, w, wg, wu, wd: jnp.sum(ct * fn(x, ids, w, wg, wu, wd))

    args = (x, w, wg, wu, wd)
    want = jax.grad(loss(mr.dense_moe_reference), argnums=range(5))(*args)
    got = jax.jit(jax.grad(loss(layer), argnums=range(5)))(*args)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, atol=2e-5, rtol=2e-5)


def lowered_collectives(num_ranks, num_experts, k, tokens, transport="auto"):
    inputs = moe_inputs(tokens * num_ranks, D, F, num_experts, k)
    text = decode_layer(num_ranks, num_experts, transport).trace(*inputs).lower(
        lowering_platforms=("cuda",)).as_text()
    return text, analysis.collectives(text)


def test_windows_program_moves_copies_into_bounded_windows():
    """P > k: no all_gather, no reduce-scatter, no sort longer than this rank's T*k copy ids;
    two small int32 all_to_alls (counts and send starts out, window offsets back) and a
    scalar pmax, then two ragged all-to-alls of exactly the T*k copies, whose receive buffer is
    bounded by the usual 2*T*k rows (at least decode.MIN_ROWS), not the worst case."""
    tokens, k, e, p = 8, 2, 64, 8
    text, ops = lowered_collectives(p, e, k, tokens)
    assert analysis.float_scatter_adds(text) == []  # bit-reproducible on a GPU
    metadata = [c for c in ops if not c.in_loop]  # before the rounds' loop
    assert sorted(c.op for c in metadata) == ["all_reduce", "all_to_all", "all_to_all"]
    assert sorted(c.moved.elements for c in metadata if c.op == "all_to_all") == [
        p * (e // p), p * 2 * (e // p)]  # [P, El] offsets back, [P, 2*El] counts out
    assert all(c.moved.dtype == "i32" for c in metadata)
    # every round, the first included, is one body of the rounds' loop: its two ragged
    # all-to-alls appear once in the program
    ragged = [c for c in ops if c.op == "ragged_all_to_all"]
    assert [c.in_loop for c in ragged] == [True, True]
    rows = decode.typical_rows(tokens, k)
    assert rows < decode.worst_rows(p, tokens, k, e // p)
    assert {(c.operands[0].shape[0], c.operands[1].shape[0]) for c in ragged} == {
        (tokens * k, rows), (rows, tokens * k)}
    assert "all_gather" not in {c.op for c in ops}
    sorts = [b for b in analysis.stablehlo_buffers(text, 1) if b.op == "stablehlo.sort"]
    assert sorts and max(b.elements for b in sorts) <= tokens * k


def test_auto_takes_the_gather_transport_on_cpu_only():
    """P > k: the CPU program gathers (memory copies between emulated devices), the cuda
    program of the same traced function moves copies through ragged all-to-alls."""
    inputs = moe_inputs(4 * 8, D, F, 16, 2)
    traced = decode_layer(8, 16, "auto").trace(*inputs)
    cpu = analysis.collectives(traced.lower().as_text())
    cuda = analysis.collectives(traced.lower(lowering_platforms=("cuda",)).as_text())
    assert sorted(c.op for c in cpu) == ["all_gather", "reduce_scatter"]
    assert "ragged_all_to_all" in {c.op for c in cuda} and "all_gather" not in {c.op for c in cuda}


def test_gather_program_is_one_gather_and_one_reduce_scatter():
    """P <= k: x, ids and weights travel in one all_gather; results in one reduce-scatter."""
    tokens, k = 4, 8
    text, ops = lowered_collectives(8, 64, k, tokens)
    assert sorted(c.op for c in ops) == ["all_gather", "reduce_scatter"]
    # the partial sums are a gather-sum over k, not a float scatter-add (atomics on a GPU)
    assert analysis.float_scatter_adds(text) == []
    gather = next(c for c in ops if c.op == "all_gather")
    assert gather.moved.shape == (8 * tokens, D + 2 * k)  # f32 x + int32 ids + f32 weights


@pytest.mark.parametrize("transport", ["gather", "windows"])
def test_verbs_with_custom_expert_compute(transport):
    """A user's own expert compute between the verbs (here: 2x SwiGLU), worst-case windows."""
    mesh = mr.make_ep_mesh(4)
    x, ids, w, wg, wu, wd = moe_inputs(32, D, F, 8, 2, seed=11)

    def body(x, ids, w, wg, wu, wd):
        recv, handle = mr.dispatch(x, ids, w, num_experts=8, axis_name="ep", schedule="decode",
                                   transport=transport)
        assert recv.rows.shape == (4 * 8 * 2, D)  # P*T*min(k, El)
        return mr.combine(2 * grouped_swiglu(recv.rows, recv.group_sizes, wg, wu, wd), handle)

    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(TOK,) * 3 + (EXP,) * 3,
                               out_specs=TOK))
    want = 2 * mr.dense_moe_reference(x, ids, w, wg, wu, wd)
    np.testing.assert_allclose(fn(x, ids, w, wg, wu, wd), want, atol=4e-5, rtol=4e-5)


def test_verbs_on_a_replicated_batch():
    """The verbs with transport="replicated": 3 tokens held by all 4 ranks, worst-case windows
    of N*min(k, El) rows, and combine's psum leaves every token's result on every rank."""
    mesh = mr.make_ep_mesh(4)
    x, ids, w, wg, wu, wd = moe_inputs(3, D, F, 8, 2, seed=12)

    def body(x, ids, w, wg, wu, wd):
        recv, handle = mr.dispatch(x, ids, w, num_experts=8, axis_name="ep", schedule="decode",
                                   transport="replicated")
        assert recv.rows.shape == (3 * 2, D)
        return mr.combine(grouped_swiglu(recv.rows, recv.group_sizes, wg, wu, wd), handle)

    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(),) * 3 + (EXP,) * 3,
                               out_specs=P()))
    np.testing.assert_allclose(fn(x, ids, w, wg, wu, wd), mr.dense_moe_reference(x, ids, w, wg, wu, wd),
                               atol=2e-5, rtol=2e-5)


def test_unknown_transport_is_rejected():
    with pytest.raises(ValueError, match="transport must be"):
        decode.choose_transport(8, 2, "dense")
