"""The relay-free path as TPU remote writes (moe_relayfree.pallas_remote), run by Pallas's TPU
interpreter over 8 emulated CPU devices: the DMAs and semaphores execute as they would on a
chip (each copy from its token row into the receiver's window, each segment back), so the
windows and the layer's output are checked bit for bit against the XLA relay-free path and
against the dense reference. Shapes stay small (the interpreter takes seconds per call and, on
2 cores, hangs once one kernel operand reaches 128 KiB); every call runs under a timeout in
its own process for the negative control."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_relayfree as mr
from helpers import moe_inputs, script_env, skewed_ids
from moe_relayfree import pallas_decode, pallas_kernels, pallas_remote, prefill
from moe_relayfree.paths import PATHS

T, D, F, E, K = 6, 128, 32, 16, 2  # per device: x is 3 KiB in f32


@pytest.fixture(scope="module")
def mesh():
    return mr.make_ep_mesh(8)


def _layer(mesh, implementation, inputs, **kw):
    return np.asarray(mr.expert_parallel_moe(*inputs, mesh=mesh, implementation=implementation,
                                             **kw)).astype(np.float32)


@pytest.mark.parametrize("routing,dtype,factor", [
    ("uniform", jnp.float32, 2.0),
    ("one_expert", jnp.bfloat16, 8.0),  # every first choice to expert 0
    ("one_rank", jnp.float32, 0.5),  # every copy to the last chip: 3 rounds of 32 rows
])
def test_remote_writes_equal_the_xla_path_bit_for_bit(mesh, routing, dtype, factor):
    """The layer through the public API: the same bits as the XLA relay-free prefill path
    (same plan, same windows, the same weighted sum order; the experts here are the Pallas
    kernel on the DMAs' row layout, whose interpreted dots on CPU round as XLA:CPU's do at
    these sizes), and the dense reference's values; under all-to-one routing with rows for a
    third of the copies, the rounds reuse the window and returned buffers in place. (In bf16
    over several rounds the two differ by rounding: the XLA path carries its running sum in
    x's dtype between rounds, this one in f32.)"""
    n = 8 * T
    ids = (None if routing == "uniform" else
           jnp.asarray(skewed_ids(routing, n, K, E, 8)))
    inputs = moe_inputs(n, D, F, E, K, seed=3, dtype=dtype, ids=ids)
    got = _layer(mesh, "relayfree_pallas", inputs, schedule="prefill", capacity_factor=factor)
    want = _layer(mesh, "relayfree", inputs, schedule="prefill", capacity_factor=factor)
    np.testing.assert_array_equal(got, want)
    ref = np.asarray(mr.dense_moe_reference(*inputs), np.float32)
    tol = 2e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(got, ref, atol=tol * np.abs(ref).max(), rtol=0)


def test_each_copy_lands_in_its_expert_window(mesh, monkeypatch):
    """The dispatch verb's windows: on every chip, the rows within its experts' window sizes
    equal the XLA path's (each copy of each source at its virtual row), and the sizes agree;
    a -1 choice is not sent and leaves the other tokens alone. The per-copy table is streamed
    through SMEM 8 entries at a time here (12 copies per chip: two chunks, the second padded)."""
    from jax.sharding import PartitionSpec as P

    monkeypatch.setattr(pallas_kernels, "TABLE_CHUNK", 8)
    assert pallas_kernels.table_chunk(T * K) == 8

    x, ids, w, *_ = moe_inputs(8 * T, D, F, E, K, seed=5)
    ids = ids.at[3, 1].set(-1)

    def both(x, ids, w):
        h = pallas_remote.plan_copies(x, ids, w, num_experts=E, axis_name="ep",
                                      rows_per_round=2 * T * K)
        got = pallas_remote.dispatch(h)
        xla = prefill.dispatch_round(prefill.plan_and_pack(
            x, ids, w, num_experts=E, axis_name="ep", rows_per_round=2 * T * K))
        rows = got.rows.reshape(got.rows.shape[0], -1)[:xla.rows.shape[0]]
        filled = jnp.arange(rows.shape[0]) < got.group_sizes.sum()
        return (jnp.where(filled[:, None], rows, 0), xla.rows, got.group_sizes[None],
                xla.group_sizes[None])

    tok = P("ep")
    got, want, sizes, want_sizes = jax.jit(jax.shard_map(
        both, mesh=mesh, in_specs=(tok,) * 3, out_specs=(tok,) * 4))(x, ids, w)
    np.testing.assert_array_equal(np.asarray(sizes), np.asarray(want_sizes))
    assert int(np.asarray(sizes).sum()) == 8 * T * K - 1  # the -1 choice went nowhere
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_decode_with_counts_after_the_data_equals_the_planned_writes(mesh):
    """The decode form (no count exchange: fixed per-source regions, each sender's counts
    DMA'd after its data): with as many landing rows as the prefill form's window (8*T*k),
    the same bits as the prefill form (the receiver's compaction lays the rows out as the
    plan does, hot expert included), and the dense reference's values."""
    ids = jnp.asarray(skewed_ids("one_expert", 8 * T, K, E, 8))
    inputs = moe_inputs(8 * T, D, F, E, K, seed=4, ids=ids)
    assert pallas_decode.source_slots(T, K, 8, E // 8, 8 * T * K) * 8 == 8 * T * K
    got = _layer(mesh, "relayfree_pallas", inputs, schedule="decode", capacity_factor=8.0)
    want = _layer(mesh, "relayfree_pallas", inputs, schedule="prefill", capacity_factor=8.0)
    np.testing.assert_array_equal(got, want)
    ref = np.asarray(mr.dense_moe_reference(*inputs), np.float32)
    np.testing.assert_allclose(got, ref, atol=2e-5 * np.abs(ref).max(), rtol=0)


def _against_dense(mesh, moe, ids, seed):
    """``moe(x, ids, w, expert_fn)`` per chip (the Pallas expert kernel, interpreted) under
    ``shard_map`` over the 8 chips, against the dense reference."""
    from jax.sharding import PartitionSpec as P

    from moe_relayfree.pallas_experts import windows_swiglu_packed

    x, ids, w, wg, wu, wd = moe_inputs(8 * T, D, F, E, K, seed=seed, ids=ids)

    def layer(x, ids, w, wg, wu, wd):
        return moe(x, ids, w, lambda win: windows_swiglu_packed(win, wg, wu, wd, platform="cpu"))

    tok, ex = P("ep"), P("ep", None, None)
    got = jax.jit(jax.shard_map(layer, mesh=mesh, in_specs=(tok,) * 3 + (ex,) * 3,
                                out_specs=tok))(x, ids, w, wg, wu, wd)
    ref = np.asarray(mr.dense_moe_reference(x, ids, w, wg, wu, wd))
    np.testing.assert_allclose(np.asarray(got), ref, atol=2e-5 * np.abs(ref).max(), rtol=0)


def test_decode_rounds_agree_from_the_counts_alone(mesh):
    """Every copy to the last chip with 3-row regions: each source's 12 copies take 4 rounds,
    which every chip learns from the count rows it received (no collective), and a -1 choice
    is not sent; against the dense reference."""
    ids = jnp.asarray(skewed_ids("one_rank", 8 * T, K, E, 8)).at[5, 0].set(-1)
    _against_dense(mesh, lambda x, ids, w, experts: pallas_decode.pallas_decode_moe(
        x, ids, w, experts, num_experts=E, axis_name="ep", rows=32, platform="cpu", slots=3),
        ids, seed=6)


def test_the_combine_returns_rows_in_passes(mesh):
    """The prefill form's combine in passes of 5 returned rows (each source's 12 copies come
    back in 3 passes, the last short), over 3 rounds of all-to-one routing with a -1 choice:
    every copy comes back once, in its pass and its round, against the dense reference. (At
    the default, one pass while ``T*k <= 16``: the bit-for-bit tests above.)"""
    assert pallas_remote.pass_rows(T, K) == T * K
    assert pallas_remote.pass_rows(2048, 8) == 2048 and pallas_remote.pass_rows(8, 8) == 16
    ids = jnp.asarray(skewed_ids("one_rank", 8 * T, K, E, 8)).at[2, 1].set(-1)
    _against_dense(mesh, lambda x, ids, w, experts: pallas_remote.pallas_prefill_moe(
        x, ids, w, experts, num_experts=E, axis_name="ep", rows_per_round=32, platform="cpu",
        combine_rows=5), ids, seed=8)


@pytest.mark.parametrize("dtype,sizes", [
    (jnp.float32, [7, 0, 20]),  # windows start and end inside row blocks; an empty window
    (jnp.bfloat16, [16, 17]),  # rows as [R, 2, d/2]; the second window spans two blocks
])
def test_the_expert_kernel_computes_each_window_in_the_row_layout(dtype, sizes):
    """The relayfree_pallas expert kernel (interpreted) against float64 numpy SwiGLU per
    window, with 16-row blocks so windows share blocks: each window row gets its expert's
    output, rows past the windows hold NaN and reach no window row, and the output is the
    input buffer written over (the rows past the windows' blocks are as they were)."""
    from moe_relayfree.pallas_experts import packed_swiglu, window_rows

    rows, d, f, bm = 48, 256, 256, 16
    rng = np.random.default_rng(1)
    sub = 2 if dtype == jnp.bfloat16 else 1
    x = rng.standard_normal((rows, d))
    used = sum(sizes)
    x[used:] = np.nan
    w = [rng.standard_normal(shape) / np.sqrt(shape[1]) for shape in
         [(len(sizes), d, f), (len(sizes), d, f), (len(sizes), f, d)]]
    xs, ws = jnp.asarray(x, dtype), [jnp.asarray(a, dtype) for a in w]
    got = packed_swiglu(xs.reshape(rows, sub, d // sub), jnp.asarray(sizes, jnp.int32), *ws,
                        block_rows=bm, interpret=pallas_remote.interpret_params("cpu"))
    got = np.asarray(got.reshape(rows, d), np.float64)
    x64, (wg, wu, wd) = np.asarray(xs, np.float64), [np.asarray(a, np.float64) for a in ws]
    start = 0
    for e, n in enumerate(sizes):
        a = x64[start:start + n]
        g, u = a @ wg[e], a @ wu[e]
        want = (g / (1 + np.exp(-g)) * u) @ wd[e]
        tol = 1e-5 if dtype == jnp.float32 else 3e-2
        np.testing.assert_allclose(got[start:start + n], want, atol=tol * np.abs(x64[:used]).max())
        start += n
    past = -(-used // bm) * bm
    assert np.isnan(got[past:]).all()  # never written: the buffer was the input's
    assert window_rows(40, bm) == 48 and window_rows(12, bm) == 12
    with pytest.raises(ValueError, match="window_rows"):
        packed_swiglu(xs[:40].reshape(40, sub, d // sub), jnp.asarray(sizes, jnp.int32), *ws,
                      block_rows=bm, interpret=pallas_remote.interpret_params("cpu"))


def test_the_paths_are_in_the_table_for_tpu():
    for name in ("relayfree_pallas", "relayfree_pallas_decode"):
        path = PATHS[name]
        assert path.native("tpu") and not path.native("cpu") and not path.native("gpu")
        assert not path.gradients and path.multi_axis and not path.drops


NEGATIVE = r"""
import os, sys
sys.path.insert(0, {tests!r})
import jax, jax.numpy as jnp, numpy as np
import moe_relayfree as mr
from jax.experimental.pallas import tpu as pltpu
from moe_relayfree import pallas_experts, pallas_kernels
from helpers import moe_inputs
pallas_experts.CPU_INTERPRET_PARAMS = pltpu.InterpretParams(**{params!r})
if {skip_recv_wait}:
    wait = pallas_kernels._wait_rows
    pallas_kernels._wait_rows = lambda *a, send: wait(*a, send=send) if send else None
inputs = moe_inputs(48, 128, 32, 16, 2, seed=3)
ref = np.asarray(mr.dense_moe_reference(*inputs))
for schedule in {schedules!r}:
    got = np.asarray(mr.expert_parallel_moe(*inputs, mesh=mr.make_ep_mesh(8),
                                            implementation="relayfree_pallas",
                                            schedule=schedule))
    print(schedule, "EXACT" if np.allclose(got, ref, atol=1e-4) else "WRONG")
"""


def test_no_races_and_a_receiver_that_does_not_wait_is_caught():
    """Under the interpreter's happens-before race detector, with every DMA run as soon as it
    starts (so a receiver that did not wait could read a row while it is written): both forms
    of the layer (prefill, and decode with the counts after the data) are exact and no race is
    found. The negative controls, with the receivers' waits for their rows removed (in the
    decode form they still wait for the count rows): run eagerly, the detector reports the
    race between the senders' writes and the expert kernel's reads; run as the interpreter
    does by default (a DMA when it is waited on), the rows never land and the output is
    wrong. (The entry barrier cannot be checked here: the interpreter
    adds its own barrier around every kernel.)"""
    tests = os.path.dirname(os.path.abspath(__file__))
    races = dict(detect_races=True, dma_execution_mode="eager")
    outs = []
    for schedules, skip, params in ((("prefill", "decode"), False, races),
                                    (("prefill",), True, races), (("decode",), True, {})):
        run = subprocess.run([sys.executable, "-c", NEGATIVE.format(
            tests=tests, skip_recv_wait=skip, params=params, schedules=schedules)],
            capture_output=True, text=True, env=script_env(8), timeout=300)
        lines = [line for line in run.stdout.splitlines() if line.endswith(("EXACT", "WRONG"))]
        outs.append((lines or run.stderr[-500:], "RACE DETECTED" in run.stdout))
    assert outs == [(["prefill EXACT", "decode EXACT"], False), (outs[1][0], True),
                    (["decode WRONG"], False)], outs
