"""Grouped SwiGLU: the CPU tiled kernel and ragged_dot agree with per-window math, grads too."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_relayfree.experts import grouped_swiglu, grouped_swiglu_native
from moe_relayfree.ffn import swiglu
from moe_relayfree.tiled import grouped_swiglu_tiled


def per_window(x, gs, wg, wu, wd):
    out = jnp.zeros_like(x)
    start = 0
    for e, n in enumerate(np.asarray(gs)):
        if n:
            out = out.at[start : start + n].set(swiglu(x[start : start + n], wg[e], wu[e], wd[e]))
        start += n
    return out


def weights(rng, el, d, f):
    wg = rng.standard_normal((el, d, f)).astype(np.float32) / np.sqrt(d)
    wu = rng.standard_normal((el, d, f)).astype(np.float32) / np.sqrt(d)
    wd = rng.standard_normal((el, f, d)).astype(np.float32) / np.sqrt(f)
    return jnp.asarray(wg), jnp.asarray(wu), jnp.asarray(wd)


CASES = [
    # rows, group sizes, tile
    (40, [7, 0, 13, 5], 8),  # partial tiles, an empty expert, unused tail
    (40, [40, 0, 0, 0], 8),  # one expert owns the whole buffer
    (12, [0, 0, 0, 12], 64),  # tile larger than the buffer
    (33, [10, 10, 10, 3], 16),  # last tile runs past the end and is shifted back
    (16, [0, 0, 0, 0], 4),  # nothing to do
]


@pytest.mark.parametrize("rows,gs,tile", CASES)
def test_tiled_forward_and_backward_match_per_window(rows, gs, tile):
    rng = np.random.default_rng(rows + tile)
    d, f = 6, 10
    x = jnp.asarray(rng.standard_normal((rows, d)).astype(np.float32))
    wg, wu, wd = weights(rng, len(gs), d, f)
    gsa = jnp.asarray(gs, jnp.int32)
    got = jax.jit(lambda *a: grouped_swiglu_tiled(*a, tile=tile))(x, gsa, wg, wu, wd)
    want = per_window(x, gs, wg, wu, wd)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(got)[sum(gs):], 0)

    ct = jnp.asarray(rng.standard_normal((rows, d)).astype(np.float32))
    loss = lambda fn: lambda x, wg, wu, wd: jnp.sum(ct * fn(x, wg, wu, wd))  # noqa: E731
    # group sizes as a runtime argument, as in a layer (a closed-over constant lets XLA fold
    # the loops over experts away)
    tiled = jax.jit(jax.grad(
        lambda x, g, *w: loss(lambda *a: grouped_swiglu_tiled(a[0], g, *a[1:], tile=tile))(x, *w),
        argnums=(0, 2, 3, 4)))
    g_tiled = tiled(x, gsa, wg, wu, wd)
    g_ref = jax.grad(loss(lambda *a: per_window(a[0], gs, *a[1:])), argnums=(0, 1, 2, 3))(x, wg, wu, wd)
    for a, b in zip(g_tiled, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_native_ragged_dot_and_platform_choice_agree():
    rows, gs = 40, [7, 0, 13, 5]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((rows, 6)).astype(np.float32))
    wg, wu, wd = weights(rng, 4, 6, 10)
    gsa = jnp.asarray(gs, jnp.int32)
    want = per_window(x, gs, wg, wu, wd)
    np.testing.assert_allclose(grouped_swiglu_native(x, gsa, wg, wu, wd), want, atol=1e-5)
    np.testing.assert_allclose(jax.jit(grouped_swiglu)(x, gsa, wg, wu, wd), want, atol=1e-5)
    cuda = jax.jit(grouped_swiglu).trace(x, gsa, wg, wu, wd).lower(lowering_platforms=("cuda",))
    assert "ragged_dot" in cuda.as_text()
    assert "ragged_dot" not in jax.jit(grouped_swiglu).trace(x, gsa, wg, wu, wd).lower().as_text()


def test_bf16_windows():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((24, 8)), jnp.bfloat16)
    wg, wu, wd = (w.astype(jnp.bfloat16) for w in weights(rng, 3, 8, 16))
    gs = [5, 11, 6]
    got = jax.jit(lambda *a: grouped_swiglu_tiled(*a, tile=4))(x, jnp.asarray(gs), wg, wu, wd)
    assert got.dtype == jnp.bfloat16
    want = per_window(x, gs, wg, wu, wd)
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=2e-2, rtol=2e-2)


def test_cpu_tile_rows_follow_the_mean_window():
    from moe_relayfree.tiled import CPU_TILE_ROWS, cpu_tile_rows

    assert cpu_tile_rows(8192, 8) == CPU_TILE_ROWS  # prefill-sized windows
    assert cpu_tile_rows(128, 8) == 16  # decode-sized windows
    assert cpu_tile_rows(16, 8) == 2  # T=1, k=8: two rows per window on average
    assert cpu_tile_rows(16, 32) == 1  # fewer rows than experts
    assert cpu_tile_rows(100, 3) == CPU_TILE_ROWS


def test_bf16_tiles_have_four_rows():
    """A tile of fewer than 4 rows is a slow dot in bf16 on XLA:CPU (one row: the expert's
    matrices converted to f32 on every call; two: YNNPACK's slower kernel), so bf16 tiles have
    at least 4 rows even where the windows hold one row each; f32 keeps 1-row tiles."""
    from moe_relayfree.tiled import min_tile_rows

    assert min_tile_rows(jnp.bfloat16) == 4
    assert min_tile_rows(jnp.float32) == 1
    d, f = 512, 256
    rng = np.random.default_rng(5)
    wg, wu, wd = (w.astype(jnp.bfloat16) for w in weights(rng, 32, d, f))
    x = jnp.asarray(rng.standard_normal((8, d)), jnp.bfloat16)  # 8 rows over 32 experts
    gs = jnp.asarray([1] * 8 + [0] * 24, jnp.int32)
    fn = jax.jit(lambda *a: grouped_swiglu(*a, expected_rows=8))
    text = fn.trace(x, gs, wg, wu, wd).lower().as_text()
    assert {int(r) for r in re.findall(r"stablehlo.dot_general.*?: \(tensor<(\d+)x", text)} == {4}
    np.testing.assert_allclose(fn(x, gs, wg, wu, wd).astype(np.float32),
                               per_window(x, [1] * 8 + [0] * 24, wg, wu, wd).astype(np.float32),
                               atol=2e-2, rtol=2e-2)


def test_one_local_expert_in_bf16_is_one_dense_pass():
    """One local expert, bf16, a decode-sized buffer: one dense SwiGLU over the buffer, rows
    past the window masked (no tile loop, no copy of the expert's weights out of their
    ``[1, d, f]`` stacks); f32 keeps the tile loop. Exact against per-window math, rows past
    the window 0, gradients through the kernel's backward pass."""
    rng = np.random.default_rng(11)
    rows, d, f, gs = 16, 24, 40, [11]
    wg, wu, wd = weights(rng, 1, d, f)
    x = jnp.asarray(rng.standard_normal((rows, d)).astype(np.float32))
    ct = jnp.asarray(rng.standard_normal((rows, d)).astype(np.float32))
    gsa = jnp.asarray(gs, jnp.int32)

    def loss(x, g, *w):
        return jnp.sum(ct * grouped_swiglu_tiled(x, g, *w, tile=4).astype(jnp.float32))

    def program(*a):
        return jax.jit(lambda *a: grouped_swiglu_tiled(*a, tile=4)).lower(*a).compile().as_text()

    bf = [a.astype(jnp.bfloat16) for a in (x, wg, wu, wd)]
    text = program(bf[0], gsa, *bf[1:])
    assert " while(" not in text and " dynamic-slice(" not in text
    assert " while(" in program(x, gsa, wg, wu, wd)  # f32: the tile loop
    got = jax.jit(lambda *a: grouped_swiglu_tiled(*a, tile=4))(bf[0], gsa, *bf[1:])
    want = per_window(bf[0], gs, *bf[1:])
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=2e-2, rtol=2e-2)
    np.testing.assert_array_equal(np.asarray(got.astype(np.float32))[gs[0]:], 0)
    g_got = jax.jit(jax.grad(loss, argnums=(0, 2, 3, 4)))(bf[0], gsa, *bf[1:])
    ref = lambda x, *w: jnp.sum(ct * per_window(x, gs, *w).astype(jnp.float32))  # noqa: E731
    g_ref = jax.grad(ref, argnums=(0, 1, 2, 3))(*bf)
    for a, b in zip(g_got, g_ref):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   atol=5e-2, rtol=5e-2)


def test_expected_rows_sizes_cpu_tiles_and_reaches_only_impls_that_take_it():
    """grouped_swiglu(expected_rows=n): the CPU kernel tiles from n rows, not the buffer's R
    (same results); an impl registered without ``takes_expected_rows`` is called as before."""
    from moe_relayfree import experts

    rng = np.random.default_rng(3)
    rows, gs = 64, [9, 0, 3, 4]
    x = jnp.asarray(rng.standard_normal((rows, 6)).astype(np.float32))
    wg, wu, wd = weights(rng, 4, 6, 10)
    gsa = jnp.asarray(gs, jnp.int32)

    def dot_rows(**kw):
        fn = jax.jit(lambda *a: grouped_swiglu(*a, **kw))
        np.testing.assert_allclose(fn(x, gsa, wg, wu, wd), per_window(x, gs, wg, wu, wd),
                                   atol=1e-5, rtol=1e-5)
        text = fn.trace(x, gsa, wg, wu, wd).lower().as_text()
        return {int(r) for r in re.findall(r"stablehlo.dot_general.*?: \(tensor<(\d+)x", text)}

    assert dot_rows() == {16}  # 64 rows over 4 experts
    assert dot_rows(expected_rows=16) == {4}

    calls = []

    def plain(x, gs, wg, wu, wd):  # the five arrays only
        calls.append(x.shape)
        return grouped_swiglu_tiled(x, gs, wg, wu, wd, tile=8)

    experts.register_grouped_swiglu("cpu", plain)
    try:
        assert dot_rows(expected_rows=16) == {8} and calls
    finally:
        experts.register_grouped_swiglu("cpu", grouped_swiglu_tiled)


def _computations(hlo: str) -> dict[str, str]:
    """Compiled HLO text -> {computation name: its body}."""
    comps, name, body = {}, None, []
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head and not line.startswith(" "):
            name, body = head.group(1), []
        elif line.startswith("}") and name:
            comps[name] = "\n".join(body)
            name = None
        elif name:
            body.append(line)
    return comps


def _reachable(comps: dict[str, str], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        c = todo.pop()
        if c not in seen and c in comps:
            seen.add(c)
            todo += re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", comps[c])
            for group in re.findall(r"branch_computations=\{([^}]*)\}", comps[c]):
                todo += re.findall(r"%?([\w.\-]+)", group)
    return seen


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "backward"])
def test_cpu_kernel_reads_no_weights_of_an_empty_expert(grad):
    """The loop that slices experts' weights out of the stacked weights runs once per expert
    with rows, not a fixed ``El`` times: XLA:CPU copies an expert's weight slices before its
    tile loop even when that loop runs zero times, so an empty expert used to cost a copy of
    its weights (most of a rank's experts are empty at decode sizes)."""
    el, d, f, rows = 4, 48, 40, 16
    wg, wu, wd = weights(np.random.default_rng(0), el, d, f)
    x = jnp.ones((rows, d), jnp.float32)
    gs = jnp.asarray([16, 0, 0, 0], jnp.int32)

    def fn(x, gs, wg, wu, wd):  # group sizes are an argument: runtime values, as in a layer
        y = grouped_swiglu_tiled(x, gs, wg, wu, wd, tile=8)
        return jnp.sum(y * y)

    fn = jax.grad(fn, argnums=(0, 2, 3, 4)) if grad else fn
    comps = _computations(jax.jit(fn).lower(x, gs, wg, wu, wd).compile().as_text())
    slice_shapes = (f"f32[1,{d},{f}]", f"f32[1,{f},{d}]")
    reading = {name for name, body in comps.items()
               if any(re.search(rf"= {re.escape(s)}\S* dynamic-slice\(", body) for s in slice_shapes)}
    assert reading, "no per-expert weight slice found in the compiled program"
    loops = []  # (body computation, known trip count or None) of every while loop
    for body in comps.values():
        for line in body.splitlines():
            if " while(" in line:
                trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
                loops.append((re.search(r"body=%?([\w.\-]+)", line).group(1),
                              trip and int(trip.group(1))))
    slicing = [n for b, n in loops if _reachable(comps, b) & reading]
    assert slicing, "the weight slices are not inside any loop"
    assert el not in slicing, f"a loop of known trip count {el} slices expert weights"


def _writes(hlo: str) -> list[tuple[bool, str, str, str]]:
    """(in a loop or branch, dtype, shape, op) of every instruction of the compiled program
    that writes an array: the instructions of ENTRY, loop bodies and branches (fusion bodies
    are computed in registers, their result is the fusion's); parameters, tuples and bitcasts
    write nothing."""
    comps = _computations(hlo)
    entry = re.search(r"^ENTRY %?([\w.\-]+)", hlo, re.M).group(1)
    fused = {c for body in comps.values() for c in re.findall(r"calls=%?([\w.\-]+)", body)}
    free = ("parameter", "get-tuple-element", "tuple", "bitcast", "constant")
    return [(name != entry, dt, shape, op) for name, body in comps.items() if name not in fused
            for dt, shape, op in re.findall(r"= (\w+)\[([\d,]*)\]\S* ([\w\-]+)\(", body)
            if op not in free]


def _buffers(hlo: str) -> set[tuple[str, str]]:
    return {(dt, shape) for _, dt, shape, _ in _writes(hlo)}


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "backward"])
def test_cpu_kernel_reads_only_the_bf16_weights_it_uses(grad):
    """No pass over a whole bf16 weight stack. XLA:CPU had turned ``w[e]`` of a bf16 stack
    into a conversion of the whole ``[El, d, f]`` stack to f32 on every call (hoisted out of
    the expert loop), and slicing the stack's uint16 bits instead still copied the whole stack
    once per call. Forward: no instruction writes a weight-stack-sized array or an f32 copy
    of x, and the dots take the bf16 weights as they are (bf16 x bf16 -> f32). Backward (which writes the bf16
    weight gradients): no f32 stack, one expert's weights widened at a time."""
    el, d, f, rows = 4, 48, 40, 16
    wg, wu, wd = (w.astype(jnp.bfloat16) for w in weights(np.random.default_rng(0), el, d, f))
    x = jnp.ones((rows, d), jnp.bfloat16)
    gs = jnp.asarray([6, 0, 10, 0], jnp.int32)

    def fn(x, gs, wg, wu, wd):
        y = grouped_swiglu_tiled(x, gs, wg, wu, wd, tile=8)
        return jnp.sum(y.astype(jnp.float32) ** 2)

    fn = jax.grad(fn, argnums=(0, 2, 3, 4)) if grad else fn
    text = jax.jit(fn).lower(x, gs, wg, wu, wd).compile().as_text()
    stacks = {f"{el},{d},{f}", f"{el},{f},{d}"}
    written = {(dt, shape) for dt, shape in _buffers(text) if shape in stacks}
    one = {f"{d},{f}", f"1,{d},{f}", f"{f},{d}", f"1,{f},{d}"}
    widened = {shape for dt, shape in _buffers(text) if dt == "f32" and shape in one}
    if grad:
        assert not {w for w in written if w[0] == "f32"}, f"an f32 weight stack is written: {written}"
        assert widened, "no per-expert widening found: the test no longer sees the kernel"
        # dx is updated in place, tile by tile: XLA:CPU rewrites an update of a bf16 array as
        # one of its f32 conversion, which wrote (and copied) all of dx in every tile
        in_loops = {(dt, op) for looped, dt, shape, op in _writes(text) if looped and shape == f"{rows},{d}"}
        assert in_loops and not {w for w in in_loops if w[0] != "f32" or w[1] == "copy"}, in_loops
    else:
        assert not written, f"a whole weight stack is written on every call: {written}"
        assert not widened, "the forward pass widens an expert's weights"
        # nor is the whole x converted to f32 once per call (the same hoisting, on the rows)
        comps = _computations(text)
        calls = re.findall(rf"= f32\[{rows},{d}\]\S* fusion\(.*calls=%?([\w.\-]+)", text)
        assert not [c for c in calls if re.search(r"ROOT \S+ = \S+ convert\(", comps[c])], calls
        # the computations holding the dots (YNNPACK fusions) take bf16 weights
        dot_inputs = {shape for body in _computations(text).values() if " dot(" in body
                      for shape in re.findall(r"= bf16\[([\d,]+)\]\S* parameter\(", body)}
        assert dot_inputs >= {f"{d},{f}", f"{f},{d}"}, dot_inputs


def test_dense_dot_pads_a_one_row_bf16_dot_on_the_cpu():
    """A one-row bf16 dot is a matrix-vector product, for which XLA:CPU converts the whole
    matrix to f32 on every call; dense_dot gives each device two rows instead, same values."""
    from moe_relayfree.ffn import dense_dot

    d, n = 48, 40
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((d, n)) / np.sqrt(d), jnp.bfloat16)
    for x, kw in ((rng.standard_normal((3, 1, d)), {}),  # [B, S=1, d]
                  (rng.standard_normal((5, d)), dict(rows_per_device=1))):  # flat tokens
        x = jnp.asarray(x, jnp.bfloat16)
        want = np.asarray(x, np.float32) @ np.asarray(w, np.float32)
        np.testing.assert_allclose(np.asarray(dense_dot(x, w, **kw)), want, rtol=1e-5, atol=1e-5)

    def widened(fn):
        return (f"f32[{d},{n}]" in " ".join(f"{dt}[{s}]" for dt, s in _buffers(
            jax.jit(fn).lower(jnp.ones((1, d), jnp.bfloat16), w).compile().as_text())))

    assert widened(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))
    assert not widened(dense_dot)
    # lowered for a GPU the dot runs as it is: no padding
    x1 = jnp.ones((1, d), jnp.bfloat16)
    cuda = jax.jit(dense_dot).trace(x1, w).lower(lowering_platforms=("cuda",)).as_text()
    cpu = jax.jit(dense_dot).trace(x1, w).lower().as_text()
    assert "stablehlo.pad" in cpu and "stablehlo.pad" not in cuda
