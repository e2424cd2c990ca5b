"""Expert compute over expert-major windows: SwiGLU experts ``(silu(x @ Wg) * (x @ Wu)) @ Wd``,
the strategy chosen per platform at lowering time.

``jax.lax.ragged_dot`` where it is native (GPU/TPU); on XLA:CPU the project's tiled kernel
(:mod:`moe_relayfree.tiled`); any platform can register its own
(:func:`register_grouped_swiglu`). The math every path shares (:func:`swiglu`,
:func:`dense_dot`): :mod:`moe_relayfree.ffn`. Expert weights may be block-quantized
(:class:`~moe_relayfree.quant.BlockQuantized`): the CPU kernel dequantizes per expert it
visits, every other path gets the local stack dequantized to the activations' dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from moe_relayfree.tiled import grouped_swiglu_quantized_tiles, grouped_swiglu_tiled
from moe_relayfree.quant import as_dtype, inference_only_call, is_quantized
from moe_relayfree.registry import PlatformRegistry
from moe_relayfree.windows import ExpertWindows, sizes_in_range

_F32 = jnp.float32


# Rows per ragged_dot call of the native path: a buffer of R rows holds f32 gate, up and
# down-projection results of R rows at once (at R = 32768, d = 7168: 1.4 GiB on top of the
# buffer itself); in chunks they are chunk-sized, and a chunk this large keeps the matrix
# units busy.
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
    1176 -> 941 MB). XLA:TPU copies that buffer between the
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


# impls that take block-quantized weights as they are (they dequantize what they read); the
# others get the local stacks dequantized to x's dtype first
_TAKES_QUANTIZED = frozenset({grouped_swiglu_tiled})


def _with_dense_weights(impl):
    def run(x, group_sizes, *weights, **kw):
        return impl(x, group_sizes, *(as_dtype(w, x.dtype) for w in weights), **kw)
    return run


# Block-quantized weights on GPU/TPU: buffers of at most this many rows (decode sizes) run tile
# by tile with each tile dequantizing what it reads (grouped_swiglu_quantized_tiles); larger
# ones dequantize the rank's stacks once and run ragged_dot, whose work hides the extra pass.
QUANTIZED_TILED_MAX_ROWS = 4096


def _native_quantized(x, group_sizes, w_gate, w_up, w_down, *, expected_rows=None):
    if x.shape[0] <= QUANTIZED_TILED_MAX_ROWS:
        return grouped_swiglu_quantized_tiles(x, group_sizes, w_gate, w_up, w_down,
                                              expected_rows=expected_rows)
    return _with_dense_weights(grouped_swiglu_native)(x, group_sizes, w_gate, w_up, w_down)


def grouped_swiglu(
    x: jax.Array, group_sizes: jax.Array, w_gate, w_up, w_down,
    *, expected_rows: int | None = None,
) -> jax.Array:
    """SwiGLU over expert-major windows, strategy chosen per platform at lowering time.

    x ``[R, d]`` with window ``l`` at rows ``[sum(gs[:l]), sum(gs[:l+1]))``, group_sizes
    ``[El] int32`` (sum <= R), w_gate/w_up ``[El, d, f]``, w_down ``[El, f, d]`` (arrays, or
    :class:`~moe_relayfree.quant.BlockQuantized`) -> ``[R, d]`` (x.dtype); rows past the last
    window are 0. expected_rows: the windows' usual total when ``R`` is sized for a worst case
    (passed to impls that take it).

    Quantized weights: the CPU kernel dequantizes each expert it visits; GPU/TPU run buffers of
    up to ``QUANTIZED_TILED_MAX_ROWS`` tile by tile, each tile dequantizing the expert's
    matrices it reads, and larger ones through ``ragged_dot`` over the local stacks dequantized
    once; registered kernels get the dequantized stacks (one layer's local experts as a
    temporary).
    """
    quantized = any(is_quantized(w) for w in (w_gate, w_up, w_down))

    def prepared(f):
        dense = quantized and f not in _TAKES_QUANTIZED
        if expected_rows is not None and _takes_expected_rows(f):
            f = functools.partial(f, expected_rows=expected_rows)
        return _with_dense_weights(f) if dense else f

    impls = {p: prepared(f) for p, f in _GROUPED_SWIGLU.impls().items()}
    native = (functools.partial(_native_quantized, expected_rows=expected_rows) if quantized
              else grouped_swiglu_native)

    def run(*args):
        return lax.platform_dependent(*args, **impls, default=native)

    if quantized:  # a gradient through FP8 experts says so, not a kernel's internal error
        return inference_only_call(run, x, group_sizes, w_gate, w_up, w_down)
    return run(x, group_sizes, w_gate, w_up, w_down)


def windows_swiglu(windows: ExpertWindows, w_gate, w_up, w_down) -> jax.Array:
    """:func:`grouped_swiglu` over a schedule's windows, their ``expected_rows`` passed on:
    ``[R, d]`` rows -> ``[R, d]`` (rows past the windows 0). The expert compute to give
    ``decode_moe`` / ``prefill_moe``, or to run between the ``dispatch`` and ``combine`` verbs."""
    return grouped_swiglu(windows.rows, windows.group_sizes, w_gate, w_up, w_down,
                          expected_rows=windows.expected_rows)


__all__ = ["NATIVE_CHUNK_ROWS", "QUANTIZED_TILED_MAX_ROWS", "grouped_swiglu",
           "grouped_swiglu_impls", "grouped_swiglu_native", "register_grouped_swiglu",
           "windows_swiglu"]
