"""HLO buffer analysis: counts the full-size buffers a program really makes."""

import jax
import jax.numpy as jnp

from moe_relayfree.tools import analysis


def program(x, idx):
    y = x[idx]  # gather: full size
    z = jnp.zeros_like(x).at[idx].set(y)  # scatter (an op with a region): full size
    return jnp.sin(z).sum(0), x[:4]  # elementwise + reduce; a small slice


def test_stablehlo_buffers_finds_gather_and_scatter_with_regions():
    x, idx = jnp.ones((64, 32)), jnp.arange(64)[::-1]
    text = jax.jit(program).trace(x, idx).lower(lowering_platforms=("cuda",)).as_text()
    bufs = analysis.stablehlo_buffers(text, 64 * 32)
    ops = {b.op for b in bufs}
    assert "stablehlo.gather" in ops and "stablehlo.scatter" in ops
    assert all(b.elements >= 64 * 32 for b in bufs)
    assert not any(b.shape == (4, 32) for b in bufs)  # below the threshold
    assert any(b.shape == (4, 32) for b in analysis.stablehlo_buffers(text, 4 * 32))


def test_compiled_hlo_buffers_skip_fusion_internals():
    x, idx = jnp.ones((64, 32)), jnp.arange(64)[::-1]
    text = jax.jit(program).lower(x, idx).compile().as_text()
    bufs = analysis.compiled_hlo_buffers(text, 64 * 32)
    assert bufs, "the scatter result is materialised"
    assert all(b.elements >= 64 * 32 for b in bufs)
    # a fused elementwise chain makes no buffer of its own: fewer buffers than HLO ops
    assert len(bufs) < text.count("f32[64,32]")
    s = analysis.summarize(bufs)
    assert s["count"] == len(bufs) and s["bytes"] == sum(b.nbytes for b in bufs)


def test_float_scatter_adds_are_found_unless_unique_or_integer():
    def adds(x, idx, perm, counts):
        a = jnp.zeros((8, 32)).at[idx].add(x)  # float add, repeated indices: reported
        b = jnp.zeros((64, 32)).at[perm].add(x, unique_indices=True)  # declared unique
        c = counts.at[idx].add(1)  # integer add: exact in any order
        d = jnp.zeros((8, 32)).at[idx].set(x)  # no add
        return a, b, c, d

    x, idx, perm = jnp.ones((64, 32)), jnp.arange(64) % 8, jnp.arange(64)[::-1]
    text = jax.jit(adds).trace(x, idx, perm, jnp.zeros(8, jnp.int32)).lower(
        lowering_platforms=("cuda",)).as_text()
    found = analysis.float_scatter_adds(text)
    assert [(b.shape, b.dtype) for b in found] == [((8, 32), "f32")]


def test_nan_filled_selects_find_jnp_takes_out_of_bounds_fill():
    from moe_relayfree.windows import take_rows

    x, idx = jnp.ones((16, 4)), jnp.arange(8)

    def count(fn, *args):
        return analysis.nan_filled_selects(jax.jit(fn).lower(*args).as_text())

    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        assert count(lambda a, i: jnp.take(a, i, axis=0), x.astype(dtype), idx) == 1
    assert count(take_rows, x, idx) == 0
    assert count(lambda a, i: a[i], x, idx) == 0  # indexing clamps, no fill
    assert count(lambda a, i: jnp.take(a, i, axis=0) + take_rows(a, i), x, idx) == 1
