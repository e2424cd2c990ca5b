"""Ragged all-to-all: CPU emulation vs a numpy model of the documented semantics."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from helpers import make_mesh
from moe_relayfree import collectives


def numpy_ragged_all_to_all(operands, outputs, in_off, send, out_off, recv):
    """The pseudo-code of ``jax.lax.ragged_all_to_all``'s docstring, for all ranks at once."""
    num = len(operands)
    m = in_off.shape[1] // num
    results = [o.copy() for o in outputs]
    for src in range(num):
        for i in range(num * m):
            dst = i // m
            rows = operands[src][in_off[src, i] : in_off[src, i] + send[src, i]]
            # receiver-side: slot (src*m + i%m) with recv size from the receiver's array
            j = src * m + i % m
            assert recv[dst, j] == send[src, i]
            results[dst][out_off[src, i] : out_off[src, i] + recv[dst, j]] = rows
    return results


def random_case(rng, num, m, n_rows, out_rows, d=3):
    """Random non-overlapping segments with gaps, empty segments, and disjoint output slots."""
    send = np.zeros((num, num * m), np.int32)
    in_off = np.zeros_like(send)
    out_off = np.zeros_like(send)
    for src in range(num):
        sizes = rng.integers(1, 4, size=num * m)
        if num * m > 1:  # some empty segments, never all
            empty = rng.permutation(num * m)[: rng.integers(1, num * m)]
            sizes[empty] = 0
        cursor = 0
        for i in rng.permutation(num * m):  # segments in any order inside the operand
            cursor += rng.integers(0, 3)  # gaps
            in_off[src, i] = cursor
            send[src, i] = sizes[i]
            cursor += sizes[i]
        assert cursor <= n_rows
    recv = np.zeros_like(send)
    for dst in range(num):
        cursor = 0
        for j in rng.permutation(num * m):
            src, l = divmod(j, m)
            i = dst * m + l
            cursor += rng.integers(0, 2)
            out_off[src, i] = cursor
            recv[dst, j] = send[src, i]
            cursor += send[src, i]
        assert cursor <= out_rows
    operands = [rng.standard_normal((n_rows, d)).astype(np.float32) for _ in range(num)]
    outputs = [np.full((out_rows, d), -7.0, np.float32) for _ in range(num)]
    return operands, outputs, in_off, send, out_off, recv


def run_sharded(num, fn, *arrays):
    mesh = make_mesh(num)
    spec = P("ep")
    placed = [jax.device_put(np.concatenate(a), NamedSharding(mesh, spec)) for a in arrays]
    f = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * len(arrays), out_specs=spec))
    return f, placed


@pytest.mark.parametrize("num,m", [(1, 1), (2, 1), (2, 3), (4, 2), (8, 4)])
@pytest.mark.parametrize("seed", [0, 1])
def test_emulation_matches_documented_semantics(num, m, seed):
    rng = np.random.default_rng(seed + 10 * num + m)
    n_rows = num * m * 6
    out_rows = num * m * 5
    operands, outputs, in_off, send, out_off, recv = random_case(rng, num, m, n_rows, out_rows)
    expected = numpy_ragged_all_to_all(operands, outputs, in_off, send, out_off, recv)

    def body(op, out, io, ss, oo, rs):
        return collectives.ragged_all_to_all(op, out, io, ss, oo, rs, axis_name="ep")

    f, args = run_sharded(
        num, body, operands, outputs, list(in_off), list(send), list(out_off), list(recv)
    )
    got = np.asarray(f(*args)).reshape(num, out_rows, -1)
    np.testing.assert_array_equal(got, np.stack(expected))
    assert send.sum() > 0 and (num * m == 1 or (send == 0).any())


def test_a_too_small_rows_per_peer_costs_time_not_rows():
    """The public op takes rows_per_peer as a hint: exact at the true maximum and below it (it
    used to return wrong rows below it, where the native op is right). The schedules' bounded
    form, which trusts a proven bound, is exact at the bound and visibly wrong below it."""
    rng = np.random.default_rng(3)
    num, m = 4, 2
    operands, outputs, in_off, send, out_off, recv = random_case(rng, num, m, 48, 40)
    expected = np.stack(numpy_ragged_all_to_all(operands, outputs, in_off, send, out_off, recv))
    per_peer = send.reshape(num, num, m).sum(-1).max()

    def body(fn, bound, op, out, io, ss, oo, rs):
        return fn(op, out, io, ss, oo, rs, axis_name="ep", rows_per_peer=bound)

    for fn, bound, exact in [
            (collectives.ragged_all_to_all, per_peer, True),
            (collectives.ragged_all_to_all, 1, True),
            (collectives.ragged_all_to_all_bounded, per_peer, True),
            (collectives.ragged_all_to_all_bounded, per_peer - 1, False)]:
        f, args = run_sharded(
            num, functools.partial(body, fn, int(bound)), operands, outputs,
            list(in_off), list(send), list(out_off), list(recv),
        )
        got = np.asarray(f(*args)).reshape(expected.shape)
        assert np.array_equal(got, expected) == exact, (fn.__name__, bound)


def test_cuda_lowering_keeps_native_op_and_cpu_lowering_emulates():
    mesh = make_mesh(4)

    def body(x):
        n = x.shape[0]
        sizes = jnp.ones((4,), jnp.int32)
        offs = jnp.arange(4, dtype=jnp.int32)
        out = jnp.zeros_like(x)
        return collectives.ragged_all_to_all(x, out, offs, sizes, offs * 0 + n // 2, sizes,
                                             axis_name="ep")

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
    x = jax.device_put(jnp.zeros((32, 2)), NamedSharding(mesh, P("ep")))
    cuda = f.trace(x).lower(lowering_platforms=("cuda",)).as_text()
    cpu = f.trace(x).lower().as_text()
    assert "ragged_all_to_all" in cuda
    assert "ragged_all_to_all" not in cpu and "all_to_all" in cpu


def test_registered_implementation_is_used_on_cpu():
    calls = []

    def doubled(operand, output, *args, axis_name, rows_per_peer, typical_rows_per_peer):
        calls.append(rows_per_peer)
        return collectives.emulated_ragged_all_to_all(
            operand * 2, output, *args, axis_name=axis_name, rows_per_peer=rows_per_peer
        )

    rng = np.random.default_rng(5)
    operands, outputs, in_off, send, out_off, recv = random_case(rng, 2, 2, 24, 20)
    expected = np.stack(numpy_ragged_all_to_all(
        [2 * o for o in operands], outputs, in_off, send, out_off, recv))

    def body(op, out, io, ss, oo, rs):
        return collectives.ragged_all_to_all(op, out, io, ss, oo, rs, axis_name="ep")

    collectives.register_ragged_all_to_all("cpu", doubled)
    try:
        f, args = run_sharded(
            2, body, operands, outputs, list(in_off), list(send), list(out_off), list(recv)
        )
        got = np.asarray(f(*args)).reshape(expected.shape)
    finally:
        collectives.register_ragged_all_to_all("cpu", collectives.emulated_ragged_all_to_all)
    assert calls, "custom implementation was not traced"
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("mode", ["fits", "overflows"])
def test_small_exchange_and_fallback_are_both_exact(mode):
    """The emulation's small padded exchange (rounded up to 8 rows) is taken only when every
    rank's sends fit it; otherwise the bound-sized one runs. Both give the documented result:
    had the small one run while overflowing, rows would be missing."""
    rng = np.random.default_rng(0)
    num, m = 4, 6
    operands, outputs, in_off, send, out_off, recv = random_case(rng, num, m, 120, 100)
    expected = np.stack(numpy_ragged_all_to_all(operands, outputs, in_off, send, out_off, recv))
    largest = int(send.reshape(num, num, m).sum(-1).max())
    assert largest > 8
    typical = largest if mode == "fits" else 1

    def body(op, out, io, ss, oo, rs):
        return collectives.emulated_ragged_all_to_all(
            op, out, io, ss, oo, rs, axis_name="ep", rows_per_peer=120,
            typical_rows_per_peer=typical,
        )

    f, args = run_sharded(num, body, operands, outputs, list(in_off), list(send),
                          list(out_off), list(recv))
    np.testing.assert_array_equal(np.asarray(f(*args)).reshape(expected.shape), expected)


def test_registering_after_the_first_call_takes_effect():
    """expert_parallel_moe caches its compiled programs; a kernel registered after a call must
    still be used by the next call (it used to be ignored: the cached program kept the old
    one), and restoring the old kernel restores the old result."""
    from helpers import moe_inputs

    import moe_relayfree as mr
    from moe_relayfree import experts

    inputs = moe_inputs(16, 8, 12, 8, 2, seed=1)
    mesh = mr.make_ep_mesh(8)
    run = lambda: np.asarray(mr.expert_parallel_moe(*inputs, mesh=mesh, schedule="prefill"))  # noqa: E731
    before = run()
    traced = []

    def counted(*args, **kw):
        traced.append(1)
        return collectives.emulated_ragged_all_to_all(*args, **kw)

    def halved(x, group_sizes, w_gate, w_up, w_down):
        return experts.grouped_swiglu_tiled(x, group_sizes, w_gate, w_up, w_down) * 0.5

    collectives.register_ragged_all_to_all("cpu", counted)
    try:
        np.testing.assert_array_equal(run(), before)
        assert traced, "the ragged all-to-all registered after the first call was not used"
        experts.register_grouped_swiglu("cpu", halved)
        try:
            np.testing.assert_allclose(run(), 0.5 * before, rtol=1e-6, atol=1e-7)
        finally:
            experts.register_grouped_swiglu("cpu", experts.grouped_swiglu_tiled)
    finally:
        collectives.register_ragged_all_to_all("cpu", collectives.emulated_ragged_all_to_all)
    np.testing.assert_array_equal(run(), before)
