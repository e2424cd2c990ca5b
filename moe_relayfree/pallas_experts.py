"""SwiGLU experts over expert-major windows as one Pallas TPU kernel that reads and writes the
rows in the remote-write path's DMA row layout (:func:`moe_relayfree.pallas_remote.row_layout`).

Why a kernel: the remote-write dispatch lands each copy as one row of a ``[R, s, d/s]`` buffer
(rows on a leading untiled dimension, bf16 as ``[R, 2, d/2]``: Mosaic refuses a DMA of one row
of a tiled ``[R, d]`` buffer). XLA's grouped GEMM wants ``[R, d]``, so on XLA:TPU the window
was relaid to ``[R, d]``, its f32 gate / up / down-projection results held for all ``R`` rows
at once, and the output relaid back for the combine's DMAs: each of those a window-sized
temporary, the peak of the layer. Here a block of ``bm`` rows is brought into VMEM as it lies,
reshaped there, multiplied by one expert's weights ``bf`` columns of ``f`` at a time with the
down projection accumulated in an f32 VMEM block, and written back in the row layout, over the
window's own buffer (aliased): no window-sized temporary at all.

Grouping (megablox's): a window may start and end inside a row block, so the grid walks
*tiles*, one per (local expert, row block) pair the windows touch, at most ``R/bm + El - 1`` of
them, in row order; the tiles of one block are consecutive, so its accumulator stays in VMEM
across experts. A row of a tile outside that tile's expert contributes 0 (masked after the
activation, so whatever a row past the windows holds, NaN included, reaches nothing). Rows
past the last window are not written (the window buffer is never zero-filled, and the combine
reads only window rows).

On CPU the kernel runs in Pallas's TPU interpreter (the tests); elsewhere it is refused, like
the remote-write kernels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from moe_relayfree.quant import as_dtype
from moe_relayfree.windows import ExpertWindows

_I32 = jnp.int32
_F32 = jnp.float32

# Rows per tile and expert columns per step: 256 rows make a tile's weight reads (all of one
# expert's, once per tile) worth 2*256 flops per weight element, past v5p's compute to HBM
# bandwidth ratio.
BLOCK_ROWS = 256
BLOCK_COLS = 128


def vmem_bytes(block_rows: int, block_cols: int, d: int, itemsize: int) -> int:
    """VMEM one grid step holds: the row block in and out (two buffers each), the three
    weight blocks (two buffers each), the f32 accumulator and the f32 gate / up / hidden
    blocks. DeepSeek-V3 (d=7168, bf16, 256 x 128): 31.9 MiB."""
    rows = 4 * block_rows * d * itemsize
    weights = 6 * d * block_cols * itemsize
    return rows + weights + 4 * block_rows * d + 3 * 4 * block_rows * block_cols


# How the interpreter runs the kernels on CPU (a test sets race detection, eager DMAs).
CPU_INTERPRET_PARAMS = pltpu.InterpretParams()


def interpret_params(platform: str | None = None):
    """How the TPU kernels run on ``platform`` (default: JAX's default backend): None
    (compiled) on TPU, Pallas's TPU interpreter on CPU (:data:`CPU_INTERPRET_PARAMS`)."""
    platform = platform or jax.default_backend()
    if platform == "tpu":
        return None
    if platform == "cpu":
        return CPU_INTERPRET_PARAMS
    raise NotImplementedError(f"the Pallas TPU kernels run on TPU (and interpreted on CPU), "
                              f"not on {platform}")


def _column_block(f: int, want: int) -> int:
    """The widest of ``want``, ``want/2``, ... (down to 128) that divides ``f``; ``f`` itself
    when none does (a block must tile the expert width exactly)."""
    b = want
    while b >= 128:
        if f % b == 0:
            return b
        b //= 2
    return f


def window_rows(rows: int, block_rows: int = BLOCK_ROWS) -> int:
    """Rows of a window buffer that holds ``rows`` and that :func:`packed_swiglu` tiles
    exactly: ``rows`` up to ``block_rows``, else rounded up to a multiple of it (the extra
    rows are never written by a dispatch nor read by a combine). Pallas's TPU interpreter
    mis-shapes an aliased output whose last block is partial, so the kernel takes none."""
    return rows if rows <= block_rows else -(-rows // block_rows) * block_rows


def tile_map(group_sizes: jax.Array, rows: int, block_rows: int) -> tuple:
    """The grid's tiles: for each of ``R/bm + El - 1`` tiles, its local expert and row block
    (``[n] int32`` each), and the number of tiles in use ``[1] int32``. Tiles past those in
    use repeat the last one (its blocks stay in VMEM: no DMA) and compute nothing."""
    gs = group_sizes.astype(_I32)
    local = gs.shape[0]
    ends = jnp.cumsum(gs)
    starts = ends - gs
    first = starts // block_rows
    last = jnp.maximum(ends - 1, 0) // block_rows
    per_group = jnp.where(gs > 0, last - first + 1, 0)
    group_end = jnp.cumsum(per_group)
    used = group_end[-1]
    n = pl.cdiv(rows, block_rows) + local - 1
    t = jnp.arange(n, dtype=_I32)
    t_in_use = jnp.minimum(t, jnp.maximum(used - 1, 0))
    group = jnp.minimum(jnp.searchsorted(group_end, t_in_use, side="right"), local - 1)
    block = first[group] + t_in_use - (group_end[group] - per_group[group])
    return group.astype(_I32), block.astype(_I32), used.reshape(1).astype(_I32)


def _kernel(group_ref, block_ref, used_ref, bounds_ref, x_ref, wg_ref, wu_ref, wd_ref, o_ref,
            acc_ref, *, block_rows: int, d: int):
    t, j = pl.program_id(0), pl.program_id(1)
    last_j = pl.num_programs(1) - 1
    used = used_ref[0]
    b = block_ref[t]
    g = group_ref[t]
    live = t < used
    starts_block = (t == 0) | (block_ref[jnp.maximum(t - 1, 0)] != b)
    ends_block = (t == used - 1) | (block_ref[jnp.minimum(t + 1, pl.num_programs(0) - 1)] != b)

    @pl.when(live & starts_block & (j == 0))
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(live)
    def _():
        x = x_ref[...].reshape(block_rows, d)
        gate = jnp.dot(x, wg_ref[...], preferred_element_type=_F32)
        up = jnp.dot(x, wu_ref[...], preferred_element_type=_F32)
        row = b * block_rows + lax.broadcasted_iota(_I32, (block_rows, 1), 0)
        mine = (row >= bounds_ref[g]) & (row < bounds_ref[g + 1])
        h = jnp.where(mine, jax.nn.silu(gate) * up, 0.0).astype(x.dtype)
        acc_ref[...] += jnp.dot(h, wd_ref[...], preferred_element_type=_F32)

    @pl.when(live & ends_block & (j == last_j))
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype).reshape(o_ref.shape)


def packed_swiglu(rows: jax.Array, group_sizes: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                  w_down: jax.Array, *, block_rows: int = BLOCK_ROWS,
                  block_cols: int = BLOCK_COLS, interpret=None) -> jax.Array:
    """``(silu(x @ Wg[e]) * (x @ Wu[e])) @ Wd[e]`` for every row ``x`` of local expert ``e``'s
    window, in the row layout.

    rows ``[R, s, d/s]`` (expert-major windows, window ``e`` rows ``[sum(gs[:e]),
    sum(gs[:e+1]))``); group_sizes ``[El] int32``; w_gate, w_up ``[El, d, f]``, w_down ``[El,
    f, d]`` in rows' dtype -> ``[R, s, d/s]`` in rows' dtype, written over ``rows`` (aliased:
    donate nothing else into it). Window rows get their expert's output (the down projection
    accumulated in f32, rounded once); rows past the windows are 0 or left as they were.
    ``R``: at most ``block_rows``, or a multiple of it (:func:`window_rows`).
    ``interpret``: as ``pallas_call``'s (``pltpu.InterpretParams()`` on CPU)."""
    r, s, lanes = rows.shape
    d = s * lanes
    local, _, f = w_gate.shape
    bm = min(block_rows, r)
    if r % bm:
        raise ValueError(f"{r} rows do not split into blocks of {bm}: size the window buffer "
                         "with window_rows")
    bf = _column_block(f, block_cols)
    group, block, used = tile_map(group_sizes, r, bm)
    bounds = jnp.concatenate([jnp.zeros(1, _I32), jnp.cumsum(group_sizes.astype(_I32))])
    last_col = f // bf - 1

    def col(t, j, used):
        # tiles past those in use keep the last tile's weight block: no DMA at all
        return jnp.where(t < used[0], j, last_col)

    row_spec = pl.BlockSpec((bm, s, lanes), lambda t, j, g, b, *_: (b[t], 0, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4, grid=(group.shape[0], f // bf),
        in_specs=[row_spec,
                  pl.BlockSpec((None, d, bf), lambda t, j, g, b, u, _: (g[t], 0, col(t, j, u))),
                  pl.BlockSpec((None, d, bf), lambda t, j, g, b, u, _: (g[t], 0, col(t, j, u))),
                  pl.BlockSpec((None, bf, d), lambda t, j, g, b, u, _: (g[t], col(t, j, u), 0))],
        out_specs=row_spec,
        scratch_shapes=[pltpu.VMEM((bm, d), _F32)])
    kernel = functools.partial(_kernel, block_rows=bm, d=d)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(rows.shape, rows.dtype,
                                       manual_axis_type=jax.typeof(rows).manual_axis_type),
        grid_spec=grid_spec,
        # operand 4 (after the four scalar tables) is the rows: written over in place
        input_output_aliases={4: 0},
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("arbitrary", "arbitrary"),
            # what the blocks need and a quarter more (Mosaic's own scratch): above the
            # default scoped limit at DeepSeek-V3's width
            vmem_limit_bytes=vmem_bytes(bm, bf, d, rows.dtype.itemsize) * 5 // 4 + 2**20),
        interpret=interpret,
    )(group, block, used, bounds, rows, w_gate, w_up, w_down)


def windows_swiglu_packed(windows: ExpertWindows, w_gate, w_up, w_down, *,
                          platform: str | None = None) -> jax.Array:
    """:func:`packed_swiglu` over the remote-write path's windows (rows ``[R, s, d/s]``): the
    expert compute of ``relayfree_pallas``. Block-quantized weights are dequantized to the
    rows' dtype first (as the XLA path does off CPU); ``platform``: what the kernel is lowered
    for (:func:`interpret_params`)."""
    dense = (as_dtype(w, windows.rows.dtype) for w in (w_gate, w_up, w_down))
    return packed_swiglu(windows.rows, windows.group_sizes, *dense,
                         interpret=interpret_params(platform))


__all__ = ["BLOCK_COLS", "BLOCK_ROWS", "CPU_INTERPRET_PARAMS", "interpret_params",
           "packed_swiglu", "tile_map", "vmem_bytes", "window_rows", "windows_swiglu_packed"]
