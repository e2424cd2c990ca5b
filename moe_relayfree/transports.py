"""The decode schedule's gather transport (see :mod:`moe_relayfree.decode` for the op sequence).

``gather``: one ``all_gather`` of tokens with their routing packed in, a local sort of int32
keys, a weighted gather-sum over each token's choices and a ``psum_scatter`` back.
``replicated``: the gather transport for tokens every rank already holds (a batch smaller than
the ranks, whose attention ran replicated): no gather, and one ``psum`` returns every token's
sum to every rank. Both build expert-major :class:`~moe_relayfree.windows.ExpertWindows` of any
row range ``[start, start + rows)``, so the schedule can run its rows in bounded passes.
(Beyond ``k`` ranks the decode schedule runs the planned dispatch of
:mod:`moe_relayfree.prefill` instead.) Call inside ``shard_map`` over the expert axis.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from moe_relayfree.collectives import bitcast_as, ensure_varying
from moe_relayfree.routing import poison_rows
from moe_relayfree.windows import (
    ExpertWindows,
    local_expert_order,
    sizes_in_range,
    take_rows,
    weighted_row_sum,
)

_F32 = jnp.float32
_I32 = jnp.int32


# --- gather transport ---------------------------------------------------------------------


def _wire_dtype(dtype) -> jnp.dtype:
    """The dtype the gather transport's packed rows travel in: x's own, except bf16, which
    goes as uint16. XLA:CPU has no bf16 collectives: it widens a bf16 all-gather to f32 and
    back, two conversions that also canonicalise NaN bit patterns, and the routing weights'
    low halves read as bf16 are NaNs whenever they fall in ``0x7f81-0x7fff`` (tested). f32 and
    f16 rows keep their bits through a float all-gather, and f32 measured faster as f32 than as
    uint32 on CPU."""
    return jnp.dtype(jnp.uint16) if jnp.dtype(dtype) == jnp.bfloat16 else jnp.dtype(dtype)


def _pack(x: jax.Array, ids: jax.Array, w: jax.Array) -> jax.Array:
    """x ``[T, d]``, ids ``[T, k]`` int, w ``[T, k] f32`` -> ``[T, d + m]`` in
    :func:`_wire_dtype`, bit-exact."""
    t, wire = x.shape[0], _wire_dtype(x.dtype)
    meta = jnp.concatenate([ids.astype(_I32), lax.bitcast_convert_type(w, _I32)], axis=1)
    if wire.itemsize == 8:
        meta = lax.bitcast_convert_type(meta.reshape(t, -1, 2), wire)
    else:
        meta = lax.bitcast_convert_type(meta, wire).reshape(t, -1)
    return jnp.concatenate([bitcast_as(x, wire), meta], axis=1)


def _unpack(packed: jax.Array, d: int, k: int, dtype):
    n, size = packed.shape[0], jnp.dtype(packed.dtype).itemsize
    meta = packed[:, d:]
    if size == 8:
        meta = lax.bitcast_convert_type(meta, _I32).reshape(n, 2 * k)
    elif size == 4:
        meta = lax.bitcast_convert_type(meta, _I32)
    else:
        meta = lax.bitcast_convert_type(meta.reshape(n, 2 * k, 4 // size), _I32)
    weights = lax.bitcast_convert_type(meta[:, k:], _F32)
    return bitcast_as(packed[:, :d], dtype), meta[:, :k], weights


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gather_tokens(x: jax.Array, ids: jax.Array, w: jax.Array, axis_name: str):
    """All-gathers x ``[T, d]``, ids ``[T, k]`` and weights ``[T, k] f32`` in ONE collective.

    Returns (``[P*T, d]``, ``[P*T, k] int32``, ``[P*T, k] f32``). Gradients are exact: the
    backward pass reduce-scatters the cotangents of x and w.
    """
    return _gather_fwd(x, ids, w, axis_name)[0]


def _gather_fwd(x, ids, w, axis_name):
    packed = lax.all_gather(_pack(x, ids, w), axis_name, tiled=True)
    return _unpack(packed, x.shape[1], ids.shape[1], x.dtype), None


def _gather_bwd(axis_name, _, cotangents):
    dx, _, dw = cotangents

    def scatter(a):
        return lax.psum_scatter(a, axis_name, scatter_dimension=0, tiled=True)

    return scatter(dx), None, scatter(dw)


gather_tokens.defvjp(_gather_fwd, _gather_bwd)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GatherHandle:
    """What the gather transport's combine needs, for the window rows ``[start, start + B)``.

    position ``[P*T, k] int32`` the expert-major window row of each gathered copy (``>= total``:
    not this rank's); weights ``[P*T, k] f32``; total ``[] int32`` copies this rank holds;
    start ``[] int32`` the first window row of the range; invalid ``[T] bool`` this rank's
    tokens with out-of-range ids (replicated: all ``N``), whose output is NaN.
    """

    position: jax.Array
    weights: jax.Array
    total: jax.Array
    start: jax.Array
    invalid: jax.Array
    out_dtype: jnp.dtype = dataclasses.field(metadata=dict(static=True))
    axis_name: str = dataclasses.field(metadata=dict(static=True))
    replicated: bool = dataclasses.field(default=False, metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GatherPlan:
    """The gather transport's plan (steps 1-2), for ``P*T`` gathered tokens of ``k`` copies.

    tokens ``[P*T, d]`` the gathered rows; weights ``[P*T, k] f32``; order ``[P*T*k] int32``
    the expert-major order of the copies (this rank's first); sizes ``[El] int32`` its window
    sizes; position ``[P*T, k] int32`` each copy's row in that order (the inverse of order);
    invalid ``[T] bool`` this rank's tokens with out-of-range ids (replicated: all ``N``).
    """

    tokens: jax.Array
    weights: jax.Array
    order: jax.Array
    sizes: jax.Array
    position: jax.Array
    invalid: jax.Array

    @property
    def total(self) -> jax.Array:
        """``[] int32`` copies this rank holds."""
        return self.sizes.sum()


def gather_plan(x, ids, w, invalid, num_experts, axis_name,
                replicated: bool = False) -> GatherPlan:
    """Steps 1-2: gather the tokens with their routing, key the copies by local expert (``El``
    = not mine), sort the keys (the scatter that inverts the order writes distinct indices).
    ids ``[T, k] int32`` in ``[0, E]`` (``E``: no copy); invalid ``[T] bool`` (see
    :func:`~moe_relayfree.routing.screen_choices`).

    ``replicated``: x ``[N, d]`` (and ids, w) are already the same N tokens on every rank; they
    are used as the gathered rows (``P*T`` reads ``N`` above and below), nothing is gathered."""
    num_ranks = lax.axis_size(axis_name)
    local = num_experts // num_ranks
    if replicated:
        # varying like a gather's output: each rank reads different rows of them from here on
        xs, w_all = (ensure_varying(a, axis_name) for a in (x, w.astype(_F32)))
        ids_all = ids.astype(_I32)
    else:
        xs, ids_all, w_all = gather_tokens(x, ids, w, axis_name)
    mine = ids_all - lax.axis_index(axis_name) * local
    keys = jnp.where((mine >= 0) & (mine < local), mine, local).reshape(-1)
    order, sizes = local_expert_order(keys, local)
    position = jnp.zeros_like(order).at[order].set(
        jnp.arange(order.shape[0], dtype=_I32), unique_indices=True)
    return GatherPlan(xs, w_all, order, sizes, position.reshape(ids_all.shape), invalid)


def gather_windows(plan: GatherPlan, rows: int, k: int, out_dtype, axis_name: str,
                   start: int | jax.Array = 0, replicated: bool = False):
    """Windows of the expert-major rows ``[start, start + rows)`` (``start`` may be traced)
    and their handle (its combine returns ``out_dtype``)."""
    # rows past the order (a last range running over its end) read copy 0: they are past
    # `total`, so no window holds them and no partial sum reads them
    padded = jnp.concatenate([plan.order, jnp.zeros((rows,), plan.order.dtype)])
    start = jnp.asarray(start, jnp.int32)
    copy = lax.dynamic_slice_in_dim(padded, start, rows)
    handle = GatherHandle(position=plan.position, weights=plan.weights, total=plan.total,
                          start=start, invalid=plan.invalid, out_dtype=out_dtype,
                          axis_name=axis_name, replicated=replicated)
    # the mean copies per rank: T*k (tokens holds P*T of them), or N*k/P replicated
    expected = -(-plan.tokens.shape[0] * k // lax.axis_size(axis_name))
    windows = ExpertWindows(rows=take_rows(plan.tokens, copy // k),
                            group_sizes=sizes_in_range(plan.sizes, start, rows),
                            expected_rows=expected)
    return windows, handle


def gather_partial(expert_out: jax.Array, h: GatherHandle,
                   into: jax.Array | None = None) -> jax.Array:
    """Step 4: ``[P*T, d]`` float32 partial sums, ``sum_j w[s, j] * expert_out[row of copy
    (s, j)]`` over the copies whose window rows this range holds (added to ``into`` if given,
    e.g. the sums of an earlier row range). A gather-sum, not a scatter-add: a token with
    several copies on this rank would be float atomics on a GPU.
    """
    rows = expert_out.shape[0]
    local = h.position - h.start
    valid = (local >= 0) & (local < rows) & (h.position < h.total)
    return weighted_row_sum(expert_out, jnp.where(valid, local, 0), h.weights, valid, into)


def gather_combine(partial: jax.Array, axis_name: str, out_dtype, replicated: bool = False,
                   invalid: jax.Array | None = None) -> jax.Array:
    """Step 5: ``[P*T, d]`` partial sums -> this rank's ``[T, d]``, summed over ranks
    (``replicated``: ``[N, d]`` -> every token's ``[N, d]`` on every rank, one ``psum``);
    the rows of ``invalid`` tokens NaN."""
    if replicated:
        # poisoned before the sum: every rank holds every token, and the sum is what the
        # output's replication is known from
        if invalid is not None:
            partial = poison_rows(partial, invalid)
        return lax.psum(partial, axis_name).astype(out_dtype)
    y = lax.psum_scatter(partial, axis_name, scatter_dimension=0, tiled=True)
    if invalid is not None:
        y = poison_rows(y, invalid)
    return y.astype(out_dtype)
