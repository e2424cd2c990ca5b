"""Tiled grouped SwiGLU over expert-major windows: XLA:CPU's kernel, and block-quantized
experts' kernel at decode-sized buffers elsewhere.

On XLA:CPU ``ragged_dot`` is a dense masked dot that does ``El`` times the work, so CPU gets a
tiled loop that visits only the rows of each window (plus at most one partial tile per
expert), fused over the three matmuls, with its own backward pass; tiles shrink with the mean
window, and an empty expert costs nothing (its weights are not read). Block-quantized weights
(:mod:`moe_relayfree.quant`) are dequantized one expert at a time inside that loop.

:func:`grouped_swiglu_quantized_tiles`: the same loop over experts with rows and their tiles for
block-quantized weights on GPU/TPU, each tile's dots reading the expert's FP8 values and scales
(dequantized inside the tile, where XLA can fuse it into the dots' operands): no dequantized
stack of the rank's experts as a temporary.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from moe_relayfree.collectives import bitcast_as, vary_like
from moe_relayfree.ffn import _swiglu_f32, swiglu
from moe_relayfree.quant import block_scaled_dot, is_quantized

_F32 = jnp.float32


def _tile_rows(num_rows: int, tile: int) -> int:
    return max(1, min(tile, num_rows))


def _tiles(group_sizes, num_rows: int, tile: int):
    """Per expert: window [start, end) and tile count; tiles never straddle past ``num_rows``."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    starts = ends - group_sizes.astype(jnp.int32)
    counts = -(-(ends - starts) // tile)
    return starts, ends, counts


def _tile_at(start, end, c, num_rows: int, tile: int):
    """Slice start of tile ``c`` of a window, and the mask of rows it owns.

    The nominal tile is ``[start + c*tile, min(start + (c+1)*tile, end))``; the slice is
    shifted back when it would run past the buffer, and the mask keeps exactly the nominal
    rows so no row is written or accumulated twice.
    """
    nominal = start + c * tile
    a = jnp.clip(nominal, 0, num_rows - tile)
    rows = a + jnp.arange(tile, dtype=jnp.int32)
    mask = (rows >= nominal) & (rows < jnp.minimum(nominal + tile, end))
    return a, mask


def _over_experts_with_rows(counts, expert, init):
    """``expert(e, carry)`` for each expert with at least one tile, in expert order.

    XLA:CPU copies an expert's weight slices out of the stacked weights once, before its tile
    loop, even when that loop runs zero times; looping over all ``El`` experts would make every
    empty expert pay that copy (a decode-sized batch leaves most experts of a rank empty); a
    ``lax.cond`` per expert was slower when every expert has rows.
    """
    with_rows = jnp.argsort(counts == 0, stable=True).astype(jnp.int32)  # non-empty first
    return lax.fori_loop(0, jnp.sum(counts > 0), lambda j, c: expert(with_rows[j], c), init)


def _compute_dtype(dtype) -> jnp.dtype:
    """What the CPU kernel's backward pass computes in: float32 for 16-bit floats, else the
    dtype itself."""
    return jnp.promote_types(dtype, _F32)


def _dot_dtype(dtype) -> jnp.dtype:
    """What the CPU kernel's forward dots take: bf16 as it is, other 16-bit floats widened to f32.

    XLA:CPU runs a bf16 x bf16 -> f32 dot as one YNNPACK kernel (AVX512-BF16 / AMX where the
    CPU has them); widening the weights to f32 first cost a conversion pass over every expert's
    weights and twice the bytes in the dot. YNNPACK has
    no f16 dot kernel.
    A bf16 product is exact in f32, so the results are those of the widened dot up to the
    order of the f32 sums.
    """
    return jnp.dtype(dtype) if jnp.dtype(dtype) == jnp.bfloat16 else _compute_dtype(dtype)


def _bits(a: jax.Array) -> jax.Array:
    """A 16-bit float array as its raw uint16 bits (others as they are): XLA:CPU widens a
    scatter into a whole bf16 array to f32 and back; it leaves integer ones alone."""
    if jnp.issubdtype(a.dtype, jnp.floating) and a.dtype.itemsize == 2:
        return lax.bitcast_convert_type(a, jnp.uint16)
    return a


def _expert_slices(*stacked, as_dtype=_compute_dtype, quantized_dtype=None):
    """``e -> (w[e] for w in stacked)``, each in ``as_dtype(w.dtype)``: to be called inside
    the loop over experts, once per expert, before its tiles. A block-quantized stack
    (:class:`~moe_relayfree.quant.BlockQuantized`) gives ``w[e]`` dequantized to
    ``quantized_dtype`` (the activations'), then in ``as_dtype`` of that: only the visited
    expert's values and scales are read.

    XLA:CPU's float normalization rewrites a slice of a bf16 array as a slice of its f32
    conversion, and its loop-invariant code motion then hoists that conversion of the **whole**
    ``[El, d, f]`` stack out of the loop: every call wrote and read three f32 stacks, most of
    them for experts with no rows at decode sizes. Slicing the raw uint16 bits instead still
    cost a whole-stack copy per call (XLA:CPU materialises the bitcast, also hoisted). An
    optimization barrier over the stacks *and the loop index* makes them loop-variant, so
    nothing is hoisted and the conversion stays fused into the slice: only ``w[e]`` is read.
    """
    def one(w, e):
        if is_quantized(w):
            return w[e].dequantize(quantized_dtype).astype(as_dtype(quantized_dtype))
        return w[e].astype(as_dtype(w.dtype))

    def weights_of(e):
        *ws, e = lax.optimization_barrier((*stacked, e))
        return tuple(one(w, e) for w in ws)

    return weights_of


def _weight_dtype(w, dtype) -> jnp.dtype:
    """The dtype ``w`` is computed in: a block-quantized weight's is the activations'."""
    return jnp.dtype(dtype) if is_quantized(w) else jnp.dtype(w.dtype)


def _one_expert_pass(x, w_gate) -> bool:
    """Whether the forward pass is one dense pass over all ``n`` rows of x: one local expert,
    bf16 dots and at most ``CPU_TILE_ROWS`` rows (decode-sized windows).

    The tile loop would slice (copy) the expert's three matrices out of their ``[1, d, f]``
    stacks on every call and run a loop for one or two tiles; here ``w[0]`` is a view and the
    rows past the window (at most the buffer's padding) are masked in the hidden activation,
    which XLA fuses into the SwiGLU product. Not for f32, where the tile loop's 1-row dots beat
    the dense rows."""
    return (w_gate.shape[0] == 1 and x.shape[0] <= CPU_TILE_ROWS
            and _dot_dtype(x.dtype) == jnp.bfloat16
            and _dot_dtype(_weight_dtype(w_gate, x.dtype)) == jnp.bfloat16)


def _grouped_swiglu_tiled_fwd_impl(x, group_sizes, w_gate, w_up, w_down, tile):
    n, d = x.shape
    if _one_expert_pass(x, w_gate):
        # never fewer rows than a bf16 tile: a 1-row dot would widen the weights (min_tile_rows)
        m = max(n, BF16_MIN_TILE_ROWS)
        xm = jnp.pad(x, ((0, m - n), (0, 0)))
        kept = jnp.arange(m, dtype=jnp.int32) < group_sizes[0]
        wg, wu, wd = (w[0].dequantize(x.dtype) if is_quantized(w) else w[0]
                      for w in (w_gate, w_up, w_down))
        y = _swiglu_f32(xm, wg, wu, wd, x.dtype, kept)
        return y[:n].astype(x.dtype)
    tile = _tile_rows(n, tile)
    starts, ends, counts = _tiles(group_sizes, n, tile)
    weights_of = _expert_slices(w_gate, w_up, w_down, as_dtype=_dot_dtype, quantized_dtype=x.dtype)

    # Outputs accumulate in f32 and are rounded once at the end; f16 rows are widened once here
    # (f16 dots run in f32, see _dot_dtype); swiglu's rounding of the hidden activation to
    # x.dtype is kept.
    xc = x.astype(_dot_dtype(x.dtype))

    def expert(e, y):
        wg, wu, wd = weights_of(e)

        def one_tile(c, y):
            a, mask = _tile_at(starts[e], ends[e], c, n, tile)
            # as for the weights (_expert_slices): without the barrier XLA:CPU converted the
            # whole bf16 x to f32 once per call and each tile back
            xv, a = lax.optimization_barrier((xc, a))
            yt = _swiglu_f32(lax.dynamic_slice_in_dim(xv, a, tile), wg, wu, wd, x.dtype)
            old = lax.dynamic_slice_in_dim(y, a, tile)
            return lax.dynamic_update_slice_in_dim(y, jnp.where(mask[:, None], yt, old), a, 0)

        return lax.fori_loop(0, counts[e], one_tile, y)

    y0 = vary_like(jnp.zeros(x.shape, _compute_dtype(x.dtype)), x, group_sizes,
                   *jax.tree.leaves((w_gate, w_up, w_down)))
    return _over_experts_with_rows(counts, expert, y0).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _grouped_swiglu_tiled(x, group_sizes, w_gate, w_up, w_down, tile):
    return _grouped_swiglu_tiled_fwd_impl(x, group_sizes, w_gate, w_up, w_down, tile)


def _tiled_fwd(x, group_sizes, w_gate, w_up, w_down, tile):
    y = _grouped_swiglu_tiled_fwd_impl(x, group_sizes, w_gate, w_up, w_down, tile)
    return y, (x, group_sizes, w_gate, w_up, w_down)


def _tiled_bwd(tile, res, dy):
    x, group_sizes, w_gate, w_up, w_down = res
    n, d = x.shape
    tile = _tile_rows(n, tile)
    starts, ends, counts = _tiles(group_sizes, n, tile)
    weights_of = _expert_slices(w_gate, w_up, w_down)

    def expert(e, carry):
        dx, dwg, dwu, dwd = carry
        wg, wu, wd = weights_of(e)

        def one_tile(c, inner):
            dx, gwg, gwu, gwd = inner
            a, mask = _tile_at(starts[e], ends[e], c, n, tile)
            xt = lax.dynamic_slice_in_dim(x, a, tile)
            dyt = jnp.where(mask[:, None], lax.dynamic_slice_in_dim(dy, a, tile), 0)
            _, vjp = jax.vjp(swiglu, xt, wg, wu, wd)
            dxt, dg, du, dd = vjp(dyt)
            old = lax.dynamic_slice_in_dim(dx, a, tile)
            dxt = dxt.astype(dx.dtype)
            dx = lax.dynamic_update_slice_in_dim(dx, jnp.where(mask[:, None], dxt, old), a, 0)
            return dx, gwg + dg.astype(_F32), gwu + du.astype(_F32), gwd + dd.astype(_F32)

        zeros = tuple(vary_like(jnp.zeros_like(w, dtype=_F32), w) for w in (wg, wu, wd))
        dx, gwg, gwu, gwd = lax.fori_loop(0, counts[e], one_tile, (dx,) + zeros)
        # set as raw bits: a bf16 scatter was a whole-stack conversion per expert
        dwg, dwu, dwd = (acc.at[e].set(_bits(g.astype(w.dtype))) for acc, g, w in
                         ((dwg, gwg, w_gate), (dwu, gwu, w_up), (dwd, gwd, w_down)))
        return dx, dwg, dwu, dwd

    # Inside shard_map each cotangent carries its primal's varying axes: jax.vjp already sums
    # a replicated weight's per-device partials (and x's over a tensor axis), so the carries
    # start like their primals and nothing is summed again here.
    init = tuple(vary_like(jnp.zeros_like(a), a) for a in (x, w_gate, w_up, w_down))
    # dx in f32 and dW as bits: XLA:CPU rewrites a row update of a bf16 array as an update of
    # its f32 conversion, which is no longer in place: every tile wrote the whole [R, d] dx
    # (and copied it), a cost quadratic in the rows. Each row is set once, so the f32 carry
    # holds the bf16 values exactly.
    init = (init[0].astype(_compute_dtype(x.dtype)),) + tuple(_bits(a) for a in init[1:])
    # an empty expert's weight gradients stay the initial zeros
    dx, dwg, dwu, dwd = _over_experts_with_rows(counts, expert, init)
    return (dx.astype(x.dtype), None) + tuple(bitcast_as(g, w.dtype) for g, w in
                              ((dwg, w_gate), (dwu, w_up), (dwd, w_down)))


_grouped_swiglu_tiled.defvjp(_tiled_fwd, _tiled_bwd)

CPU_TILE_ROWS = 64


def cpu_tile_rows(num_rows: int, num_groups: int) -> int:
    """Tile rows for the CPU kernel: at most ``CPU_TILE_ROWS``, and no larger than the power of
    two above the mean window (``num_rows / num_groups``), so tiny windows (decode-sized
    batches) do not pay a mostly-masked 64-row tile per expert.

    No floor: at decode sizes the masked rows of a tile are paid in full (8 emulated devices
    share the cores), so small tiles pay; bf16 is
    the exception (:func:`min_tile_rows`)."""
    mean = max(1, num_rows // max(1, num_groups))
    return min(CPU_TILE_ROWS, 1 << (mean - 1).bit_length())


# bf16 tiles have at least this many rows (see min_tile_rows)
BF16_MIN_TILE_ROWS = 4


def min_tile_rows(dtype) -> int:
    """``BF16_MIN_TILE_ROWS`` for bf16, else 1.

    A one-row dot is a matrix-vector product, which YNNPACK does not take: XLA:CPU converts the
    expert's bf16 matrices to f32 for its own kernel, on every call; YNNPACK's 2-row bf16 call
    costs more than that at small experts, its 4-row call no more than its 2-row one (measured
    in one process, alternating). f32 keeps 1-row tiles."""
    return BF16_MIN_TILE_ROWS if jnp.dtype(dtype) == jnp.bfloat16 else 1


def grouped_swiglu_tiled(x, group_sizes, w_gate, w_up, w_down, tile: int | None = None, *,
                         expected_rows: int | None = None):
    """CPU grouped SwiGLU: only window rows (+ one partial tile per expert) are computed.

    Tiles follow the mean window of ``expected_rows`` (default: all ``R`` rows of x): a decode
    buffer sized for the worst case would otherwise give tiles of mostly masked rows, which the
    CPU pays in full. Weights may be block-quantized (forward only: no gradient flows into
    them, and none through them to x).
    """
    if tile is None:
        rows = x.shape[0] if expected_rows is None else min(expected_rows, x.shape[0])
        tile = max(cpu_tile_rows(rows, w_gate.shape[0]), min_tile_rows(x.dtype))
    if any(is_quantized(w) for w in (w_gate, w_up, w_down)):
        return _grouped_swiglu_tiled_fwd_impl(x, group_sizes, w_gate, w_up, w_down, tile)
    return _grouped_swiglu_tiled(x, group_sizes, w_gate, w_up, w_down, tile)


# grouped_swiglu_quantized_tiles: tile rows at most this many (a power of two at or above the
# mean window below it), at least QUANTIZED_MIN_TILE_ROWS (a bf16 sublane tile's 16 rows)
QUANTIZED_TILE_ROWS = 512
QUANTIZED_MIN_TILE_ROWS = 16


def _block_scaled_swiglu(x, w_gate, w_up, w_down) -> jax.Array:
    """:func:`~moe_relayfree.ffn.swiglu` of one expert's block-quantized matrices through
    :func:`~moe_relayfree.quant.block_scaled_dot` (arrays: plain dots): ``[n, d]`` -> ``[n, d]``.

    Dequantizing the matrices inside the tile instead (values * scales, then dots) fused the
    values' conversion into each dot, but XLA:TPU wrote the scales out at the weights' full
    shape in f32 first (56 MiB per DeepSeek-V3 expert matrix, two alive at once)."""
    def dot(a, w):
        if is_quantized(w):
            return block_scaled_dot(a, w)
        return jnp.dot(a, w.astype(a.dtype), preferred_element_type=_F32)

    h = (jax.nn.silu(dot(x, w_gate)) * dot(x, w_up)).astype(x.dtype)
    return dot(h, w_down).astype(x.dtype)


def _quantized_tiles(x, group_sizes, w_gate, w_up, w_down, tile: int):
    n, _ = x.shape
    tile = _tile_rows(n, tile)
    starts, ends, counts = _tiles(group_sizes, n, tile)

    def expert(e, y):
        def one_tile(c, y):
            a, mask = _tile_at(starts[e], ends[e], c, n, tile)
            # The barrier keeps the stacks' slices in the tile loop (as _expert_slices does):
            # hoisted out of it, they were copied out per expert.
            stacks, e_, a = lax.optimization_barrier(((w_gate, w_up, w_down), e, a))
            rows = lax.dynamic_slice_in_dim(x, a, tile)
            yt = _block_scaled_swiglu(rows, *(w[e_] for w in stacks))
            old = lax.dynamic_slice_in_dim(y, a, tile)
            return lax.dynamic_update_slice_in_dim(y, jnp.where(mask[:, None], yt, old), a, 0)

        return lax.fori_loop(0, counts[e], one_tile, y)

    # each row is written once, by the tile that owns it: x's dtype holds it exactly
    y0 = vary_like(jnp.zeros_like(x), x, group_sizes, *jax.tree.leaves((w_gate, w_up, w_down)))
    return _over_experts_with_rows(counts, expert, y0)


def grouped_swiglu_quantized_tiles(x, group_sizes, w_gate, w_up, w_down, *,
                                   expected_rows: int | None = None):
    """Grouped SwiGLU for block-quantized weights (forward only), tile by tile: each expert
    with rows, each tile of its window, the expert's matrices dequantized to x's dtype inside
    the tile's computation. Rows past the windows are 0. Tiles: the power of two at or above
    the mean window of ``expected_rows`` (default all rows), within
    [``QUANTIZED_MIN_TILE_ROWS``, ``QUANTIZED_TILE_ROWS``]."""
    rows = x.shape[0] if expected_rows is None else min(expected_rows, x.shape[0])
    mean = max(1, rows // max(1, w_gate.shape[0]))
    tile = min(QUANTIZED_TILE_ROWS, max(QUANTIZED_MIN_TILE_ROWS, 1 << (mean - 1).bit_length()))
    return _quantized_tiles(x, group_sizes, w_gate, w_up, w_down, tile)
