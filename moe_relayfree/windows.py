"""Expert windows and the row bookkeeping both schedules share.

An expert window is a run of received rows that all belong to one local expert; windows are
laid out expert-major, so a grouped GEMM (``ragged_dot``, or the CPU tiled kernel) runs on
them with the window sizes as group sizes and no re-sort.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

_F32 = jnp.float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExpertWindows:
    """Received rows, expert-major: window ``l`` is rows ``[sum(gs[:l]), sum(gs[:l+1]))``.

    rows ``[R, d]``; group_sizes ``[El] int32``. Rows past the last window are unused.
    expected_rows (static): rows all windows hold together in the usual case, when ``R`` is
    sized for more (both schedules' buffers take a skewed batch; a rank receives ``T*k`` copies
    on average, which is what they set). A tiled kernel sizes its tiles from it; ``None``: from
    ``R``.
    """

    rows: jax.Array
    group_sizes: jax.Array
    expected_rows: int | None = dataclasses.field(default=None, metadata=dict(static=True))


def exclusive_cumsum(x: jax.Array, axis: int) -> jax.Array:
    return jnp.cumsum(x, axis=axis) - x


def sizes_in_range(group_sizes: jax.Array, start: int, rows: int) -> jax.Array:
    """Window sizes ``[El] int32`` of the expert-major rows ``[start, start + rows)``.

    group_sizes ``[El]``: the windows' full sizes. Lets a grouped GEMM run on a slice of the
    windows (rows past ``start + rows`` in a second call) without re-laying anything out.
    """
    ends = jnp.cumsum(group_sizes)
    begins = ends - group_sizes
    stop = start + rows
    return (jnp.clip(ends, start, stop) - jnp.clip(begins, start, stop)).astype(jnp.int32)


def take_rows(a: jax.Array, index: jax.Array) -> jax.Array:
    """``a[index]`` along axis 0, for indices the caller guarantees are in ``[0, len(a))``.

    A plain gather (XLA clamps its indices, so nothing is read out of bounds). ``jnp.take``'s
    default out-of-bounds fill adds a mask and a select over the whole result, which XLA:CPU
    does not fuse into the gather (``moe_relayfree.tools.analysis.nan_filled_selects`` finds
    such selects in a compiled program).
    """
    return a.at[index].get(mode="promise_in_bounds")


def weighted_row_sum(
    rows: jax.Array,
    index: jax.Array,
    weights: jax.Array,
    valid: jax.Array | None = None,
    into: jax.Array | None = None,
) -> jax.Array:
    """``out[t] = into[t] + sum_j weights[t, j] * rows[index[t, j]]`` over the valid ``(t, j)``.

    rows ``[R, d]`` (or ``[R, ...]``, each row flattened to ``d``: a TPU row layout such as
    ``[R, 2, d/2]`` is gathered as it lies, only the picked rows relaid); index ``[n, k]
    int32`` in ``[0, R)``; weights ``[n, k] float32``; valid
    ``[n, k] bool`` (default: all); into ``[n, d] float32`` (default: zeros) -> ``[n, d]
    float32``. One gather per choice, each added to a running sum in choice order: no
    ``[n, k, d]`` intermediate, and no scatter-add (whose repeated rows are float atomics on
    a GPU), so the result is the same bits on every run. XLA:CPU fuses the k gathers into the
    sum; other backends may materialise each gathered ``[n, d]`` at once (XLA:TPU does), so
    there the choices run one at a time in a loop.
    """
    from moe_relayfree.collectives import vary_like  # collectives imports this module

    n, k = index.shape
    width = math.prod(rows.shape[1:])
    out = jnp.zeros((n, width), _F32) if into is None else into
    valid = jnp.ones(index.shape, bool) if valid is None else valid
    out = vary_like(out, rows, index, weights, valid)

    def add(j, out, pick, relaid_first=False):
        picked = take_rows(rows, pick(index)).reshape(n, width)
        if relaid_first:
            # The picked rows relaid to [n, d] in rows' dtype, then widened inside the sum: left
            # to itself XLA:TPU widened them first and relaid the f32 copy, two f32 [n, d]
            # buffers per choice (DeepSeek-V3, T=128: the Pallas path's peak 40.4 -> 35.1 MiB).
            picked = lax.optimization_barrier(picked)
        term = picked.astype(_F32) * pick(weights)[:, None]
        return out + jnp.where(pick(valid)[:, None], term, 0.0)

    def unrolled(out):
        for j in range(k):
            out = add(j, out, lambda a, j=j: a[:, j])
        return out

    def looped(out):
        return lax.fori_loop(
            0, k, lambda j, o: add(j, o, lambda a: lax.dynamic_index_in_dim(a, j, 1, False),
                                   relaid_first=rows.ndim > 2), out)

    return lax.platform_dependent(out, cpu=unrolled, default=looped)


def local_expert_order(keys: jax.Array, num_local: int) -> tuple[jax.Array, jax.Array]:
    """Expert-major order of copies from their local-expert keys (``num_local`` = not mine).

    keys ``[n] int32`` in ``[0, El]`` -> (order ``[n] int32``, stable, so copies keep their
    (source, token, choice) order inside a window; group_sizes ``[El] int32``).
    """
    order = jnp.argsort(keys, stable=True).astype(jnp.int32)
    sizes = jnp.zeros((num_local + 1,), jnp.int32).at[keys].add(1)
    return order, sizes[:num_local]
