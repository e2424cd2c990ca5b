"""Expert compute: SwiGLU experts ``(silu(x @ Wg) * (x @ Wu)) @ Wd``.

Numerics, shared by every path and the dense reference: matmuls accumulate in float32, the
hidden activation is cast to the input dtype before the down projection (as bf16 checkpoints
run in Hugging Face), the expert output is cast to the input dtype.

Grouped compute over expert-major windows (prefill): ``jax.lax.ragged_dot`` where it is
native (GPU/TPU). On XLA:CPU ``ragged_dot`` is a dense masked dot that does ``El`` times the
work, so CPU gets a tiled loop that visits only the rows of each window (plus at most one
partial tile per expert), fused over the three matmuls, with its own backward pass; tiles shrink
with the mean window, and an empty expert costs nothing (its weights are not read).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from moe_relayfree.collectives import bitcast_as, vary_like
from moe_relayfree.registry import PlatformRegistry
from moe_relayfree.windows import ExpertWindows, sizes_in_range

_F32 = jnp.float32


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """One expert. x ``[n, d]``, w_gate/w_up ``[d, f]``, w_down ``[f, d]`` -> ``[n, d]`` (x.dtype)."""
    return _swiglu_f32(x, w_gate, w_up, w_down, x.dtype).astype(x.dtype)


def _swiglu_f32(x, w_gate, w_up, w_down, dtype, rows_kept=None) -> jax.Array:
    """:func:`swiglu` for inputs of ``dtype``, before its last rounding: the f32 output. x and
    the weights may already be widened to f32 (the CPU kernel): the products and f32 sums are
    the same, and the hidden activation is still rounded to ``dtype``. ``rows_kept`` ``[n]
    bool``: the other rows' hidden activations (so their outputs) are 0."""
    g = jnp.dot(x, w_gate, preferred_element_type=_F32)
    u = jnp.dot(x, w_up, preferred_element_type=_F32)
    h = jax.nn.silu(g) * u
    if rows_kept is not None:
        h = jnp.where(rows_kept[:, None], h, 0.0)
    return jnp.dot(h.astype(dtype), w_down, preferred_element_type=_F32)


# Rows per ragged_dot call of the native path: a buffer of R rows holds f32 gate, up and
# down-projection results of R rows at once (at R = 32768, d = 7168: 1.4 GiB on top of the
# buffer itself); in chunks they are chunk-sized, and a chunk this large keeps the matrix
# units busy (docs/benchmarks.md, "At scale").
NATIVE_CHUNK_ROWS = 4096


def _ragged_swiglu(x, gs, w_gate, w_up, w_down):
    g = lax.ragged_dot(x, w_gate, gs, preferred_element_type=_F32)
    u = lax.ragged_dot(x, w_up, gs, preferred_element_type=_F32)
    h = (jax.nn.silu(g) * u).astype(x.dtype)
    # The down projection's output in x's dtype: the matrix units accumulate in f32 either way
    # and round once; an f32 result was an [R, d] f32 buffer next to its bf16 copy.
    return lax.ragged_dot(h, w_down, gs, preferred_element_type=x.dtype)


def _copied(rows: jax.Array) -> jax.Array:
    """``rows`` copied by a gather. On XLA:TPU the chunks below update their input in place,
    and when that input was a ragged all-to-all's output (the receive buffer of a schedule)
    the compiled program reserved a second ``[T*k, d]``-sized region of temporaries; from a
    gathered copy it does not (a DeepSeek-V3 prefill layer, 2048 tokens per device on v5p-64:
    1176 -> 941 MB; docs/benchmarks.md, "At scale"). XLA:TPU copies that buffer between the
    two layouts anyway; elsewhere nothing is copied."""
    index = jnp.arange(rows.shape[0], dtype=jnp.int32)[::-1]
    return rows.at[index].get(mode="promise_in_bounds")[::-1]


def grouped_swiglu_native(x, group_sizes, w_gate, w_up, w_down, *,
                          chunk_rows: int = NATIVE_CHUNK_ROWS):
    """Expert-major windows through ``lax.ragged_dot``; rows past the windows come out 0.

    More than ``chunk_rows`` rows run ``chunk_rows`` at a time (the group sizes clipped to
    each chunk), each chunk's results written over its own input rows: the same products,
    and the output can take x's buffer (a receive buffer nothing reads again)."""
    gs = group_sizes.astype(jnp.int32)
    rows = x.shape[0]
    if rows <= chunk_rows:
        return _ragged_swiglu(x, gs, w_gate, w_up, w_down)

    def run(out, start, size):
        part = lax.dynamic_slice_in_dim(out, start, size)
        result = _ragged_swiglu(part, sizes_in_range(gs, start, size), w_gate, w_up, w_down)
        return lax.dynamic_update_slice_in_dim(out, result, start, 0)

    full, rest = divmod(rows, chunk_rows)
    x = lax.platform_dependent(x, tpu=_copied, default=lambda a: a)
    out = lax.fori_loop(0, full, lambda c, out: run(out, c * chunk_rows, chunk_rows), x)
    return run(out, full * chunk_rows, rest) if rest else out


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
    ``lax.cond`` per expert was slower when every expert has rows (docs/benchmarks.md).
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
    weights and twice the bytes in the dot (docs/benchmarks.md, "bf16 on the CPU"). YNNPACK has
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


def _expert_slices(*stacked: jax.Array, as_dtype=_compute_dtype):
    """``e -> (w[e] for w in stacked)``, each in ``as_dtype(w.dtype)``: to be called inside
    the loop over experts, once per expert, before its tiles.

    XLA:CPU's float normalization rewrites a slice of a bf16 array as a slice of its f32
    conversion, and its loop-invariant code motion then hoists that conversion of the **whole**
    ``[El, d, f]`` stack out of the loop: every call wrote and read three f32 stacks, most of
    them for experts with no rows at decode sizes. Slicing the raw uint16 bits instead still
    cost a whole-stack copy per call (XLA:CPU materialises the bitcast, also hoisted). An
    optimization barrier over the stacks *and the loop index* makes them loop-variant, so
    nothing is hoisted and the conversion stays fused into the slice: only ``w[e]`` is read
    (docs/benchmarks.md, "bf16 on the CPU").
    """
    def weights_of(e):
        *ws, e = lax.optimization_barrier((*stacked, e))
        return tuple(w[e].astype(as_dtype(w.dtype)) for w in ws)

    return weights_of


def _one_expert_pass(x, w_gate) -> bool:
    """Whether the forward pass is one dense pass over all ``n`` rows of x: one local expert,
    bf16 dots and at most ``CPU_TILE_ROWS`` rows (decode-sized windows).

    The tile loop would slice (copy) the expert's three matrices out of their ``[1, d, f]``
    stacks on every call and run a loop for one or two tiles; here ``w[0]`` is a view and the
    rows past the window (at most the buffer's padding) are masked in the hidden activation,
    which XLA fuses into the SwiGLU product. Not for f32, where the tile loop's 1-row dots beat
    the dense rows (docs/benchmarks.md, "bf16 on the CPU")."""
    return (w_gate.shape[0] == 1 and x.shape[0] <= CPU_TILE_ROWS
            and _dot_dtype(x.dtype) == jnp.bfloat16 and _dot_dtype(w_gate.dtype) == jnp.bfloat16)


def _grouped_swiglu_tiled_fwd_impl(x, group_sizes, w_gate, w_up, w_down, tile):
    n, d = x.shape
    if _one_expert_pass(x, w_gate):
        # never fewer rows than a bf16 tile: a 1-row dot would widen the weights (min_tile_rows)
        m = max(n, BF16_MIN_TILE_ROWS)
        xm = jnp.pad(x, ((0, m - n), (0, 0)))
        kept = jnp.arange(m, dtype=jnp.int32) < group_sizes[0]
        y = _swiglu_f32(xm, w_gate[0], w_up[0], w_down[0], x.dtype, kept)
        return y[:n].astype(x.dtype)
    tile = _tile_rows(n, tile)
    starts, ends, counts = _tiles(group_sizes, n, tile)
    weights_of = _expert_slices(w_gate, w_up, w_down, as_dtype=_dot_dtype)

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

    y0 = vary_like(jnp.zeros(x.shape, _compute_dtype(x.dtype)), x, group_sizes, w_gate, w_up, w_down)
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
    share the cores), so small tiles pay (docs/benchmarks.md, "CPU expert kernel"); bf16 is
    the exception (:func:`min_tile_rows`)."""
    mean = max(1, num_rows // max(1, num_groups))
    return min(CPU_TILE_ROWS, 1 << (mean - 1).bit_length())


# bf16 tiles have at least this many rows (see min_tile_rows)
BF16_MIN_TILE_ROWS = 4


def min_tile_rows(dtype) -> int:
    """``BF16_MIN_TILE_ROWS`` for bf16, else 1.

    A one-row dot is a matrix-vector product, which YNNPACK does not take: XLA:CPU converts the
    expert's bf16 matrices to f32 for its own kernel, on every call; YNNPACK's 2-row bf16 call
    costs more than that at small experts, its 4-row call no more than its 2-row one. Same-process
    The measured choice of tile sizes: docs/benchmarks.md, "bf16 on the CPU". f32 keeps
    1-row tiles."""
    return BF16_MIN_TILE_ROWS if jnp.dtype(dtype) == jnp.bfloat16 else 1


# dense projections have at least this many rows per device on XLA:CPU in bf16 (dense_dot)
DENSE_MIN_ROWS = 2


def dense_dot(x: jax.Array, w: jax.Array, *, rows_per_device: int | None = None) -> jax.Array:
    """``x [..., S, d] @ w [d, n]`` -> ``[..., S, n]`` float32: a dense projection (every
    token through the same matrix).

    On XLA:CPU a bf16 dot of one row is a matrix-vector product, which YNNPACK does not take:
    XLA converts all of ``w`` to f32 on every call. A decode step with one token per device did
    that for every dense matrix of the model, the LM head included. There the rows are padded
    with zeros to ``DENSE_MIN_ROWS`` per device and the extra rows dropped (docs/benchmarks.md,
    "Outside the MoE layer"). Other platforms, and dots that already have the rows, run as
    they are.

    rows_per_device: how many rows of x each device holds when x is ``[N, d]`` split over the
    devices; without it, x's second-to-last axis ``S`` (each device holds at least one row of
    the axes before it).
    """
    def plain(x, w):
        return jnp.dot(x, w, preferred_element_type=_F32)

    if x.ndim < 2 or x.dtype != jnp.bfloat16 or w.dtype != jnp.bfloat16:
        return plain(x, w)
    if (x.shape[-2] if rows_per_device is None else rows_per_device) >= DENSE_MIN_ROWS:
        return plain(x, w)
    # with rows_per_device, each row becomes its own group of S=1 (x may hold many rows in all)
    grouped = x[..., None, :] if rows_per_device is not None else x
    s = grouped.shape[-2]

    def padded(x, w):
        zeros = [(0, 0)] * (x.ndim - 2) + [(0, DENSE_MIN_ROWS - s), (0, 0)]
        return plain(jnp.pad(x, zeros), w)[..., :s, :]

    y = lax.platform_dependent(grouped, w, cpu=padded, default=plain)
    return y[..., 0, :] if rows_per_device is not None else y


def grouped_swiglu_tiled(x, group_sizes, w_gate, w_up, w_down, tile: int | None = None, *,
                         expected_rows: int | None = None):
    """CPU grouped SwiGLU: only window rows (+ one partial tile per expert) are computed.

    Tiles follow the mean window of ``expected_rows`` (default: all ``R`` rows of x): a decode
    buffer sized for the worst case would otherwise give tiles of mostly masked rows, which the
    CPU pays in full.
    """
    if tile is None:
        rows = x.shape[0] if expected_rows is None else min(expected_rows, x.shape[0])
        tile = max(cpu_tile_rows(rows, w_gate.shape[0]), min_tile_rows(x.dtype))
    return _grouped_swiglu_tiled(x, group_sizes, w_gate, w_up, w_down, tile)


# platform (as in jax.lax.platform_dependent) -> grouped SwiGLU; others use ragged_dot.
_GROUPED_SWIGLU = PlatformRegistry({"cpu": grouped_swiglu_tiled})
# impls that take the ``expected_rows`` keyword (a sizing hint; the others never see it): the
# project's own kernel always, a registered one as its latest registration said
_BUILTIN_TAKES_EXPECTED_ROWS = frozenset({grouped_swiglu_tiled})
_TAKES_EXPECTED_ROWS: set = set()


def _takes_expected_rows(impl) -> bool:
    return impl in _BUILTIN_TAKES_EXPECTED_ROWS or impl in _TAKES_EXPECTED_ROWS


def register_grouped_swiglu(platform: str, impl, *, takes_expected_rows: bool = False) -> None:
    """Use ``impl(x, group_sizes, w_gate, w_up, w_down)`` on ``platform`` (``None``: ragged_dot).

    ``takes_expected_rows``: impl also accepts the keyword ``expected_rows`` (see
    :class:`~moe_relayfree.windows.ExpertWindows`), e.g. to size tiles. Takes effect for
    programs traced after it, as :func:`~moe_relayfree.collectives.register_ragged_all_to_all`.
    """
    if impl is not None:
        if takes_expected_rows:
            _TAKES_EXPECTED_ROWS.add(impl)
        else:
            _TAKES_EXPECTED_ROWS.discard(impl)
    _GROUPED_SWIGLU.set(platform, impl)


def grouped_swiglu_impls() -> dict:
    return _GROUPED_SWIGLU.impls()


def grouped_swiglu(
    x: jax.Array, group_sizes: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
    *, expected_rows: int | None = None,
) -> jax.Array:
    """SwiGLU over expert-major windows, strategy chosen per platform at lowering time.

    x ``[R, d]`` with window ``l`` at rows ``[sum(gs[:l]), sum(gs[:l+1]))``, group_sizes
    ``[El] int32`` (sum <= R), w_gate/w_up ``[El, d, f]``, w_down ``[El, f, d]``
    -> ``[R, d]`` (x.dtype); rows past the last window are 0. expected_rows: the windows'
    usual total when ``R`` is sized for a worst case (passed to impls that take it).
    """
    impls = {
        p: (functools.partial(f, expected_rows=expected_rows)
            if expected_rows is not None and _takes_expected_rows(f) else f)
        for p, f in _GROUPED_SWIGLU.impls().items()
    }
    return lax.platform_dependent(
        x, group_sizes, w_gate, w_up, w_down, **impls, default=grouped_swiglu_native
    )


def windows_swiglu(
    windows: ExpertWindows, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array
) -> jax.Array:
    """:func:`grouped_swiglu` over a schedule's windows, their ``expected_rows`` passed on:
    ``[R, d]`` rows -> ``[R, d]`` (rows past the windows 0). The expert compute to give
    ``decode_moe`` / ``prefill_moe``, or to run between the ``dispatch`` and ``combine`` verbs."""
    return grouped_swiglu(windows.rows, windows.group_sizes, w_gate, w_up, w_down,
                          expected_rows=windows.expected_rows)
