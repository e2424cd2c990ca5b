"""Collectives used by the schedules: native ragged all-to-all, or an exact emulation.

XLA:CPU has no ``ragged-all-to-all`` (``UNIMPLEMENTED: HLO opcode ragged-all-to-all``), so
the CPU lowering gets an exact emulation from dense collectives: padded per-peer rows and
their destination rows through ``all_to_all``; the receiver inverts the int destinations and
gathers whole rows (a row gather is several times faster than a row scatter on XLA:CPU). The choice is made at lowering time with ``jax.lax.platform_dependent``: one traced
program serves every platform, and a CPU compile keeps only the CPU branch.

Integrators can register another implementation per platform (e.g. a vendor dispatch op on a
PJRT plugin) with :func:`register_ragged_all_to_all`.
"""

from __future__ import annotations

from typing import Callable, Protocol

import jax
import jax.numpy as jnp
from jax import lax

from moe_relayfree.registry import PlatformRegistry
from moe_relayfree.windows import take_rows


class RaggedAllToAll(Protocol):
    def __call__(
        self,
        operand: jax.Array,
        output: jax.Array,
        input_offsets: jax.Array,
        send_sizes: jax.Array,
        output_offsets: jax.Array,
        recv_sizes: jax.Array,
        *,
        axis_name: str,
        rows_per_peer: int,
        typical_rows_per_peer: int | None,
    ) -> jax.Array: ...


def varying_axes(x) -> frozenset:
    """Mesh axes ``x`` varies over inside ``shard_map`` (empty outside)."""
    return frozenset(jax.typeof(x).manual_axis_type.varying)


def vary_like(x: jax.Array, *like: jax.Array, axes: tuple[str, ...] = ()) -> jax.Array:
    """Marks ``x`` varying over ``axes`` and every axis some array of ``like`` varies over.

    Buffers made inside a ``shard_map`` body (``jnp.zeros``) vary over no axis; under
    ``check_vma`` a collective's output, loop carries and both branches of a platform choice
    must carry the axes of the data they will hold, which on a ``(data, ep)`` mesh is both
    axes, not only the expert axis. Outside ``shard_map`` this is the identity.
    """
    want = frozenset(axes).union(*(varying_axes(a) for a in like))
    missing = tuple(a for a in want if a not in varying_axes(x))
    return lax.pcast(x, missing, to="varying") if missing else x


def ensure_varying(x: jax.Array, axis_name: str, *like: jax.Array) -> jax.Array:
    """:func:`vary_like` that always includes ``axis_name`` (a buffer a collective fills)."""
    return vary_like(x, *like, axes=(axis_name,))


def bitcast_as(x: jax.Array, dtype) -> jax.Array:
    """x's bits read as ``dtype`` (same width, or a trailing axis as for
    ``lax.bitcast_convert_type``); x itself when it already has that dtype."""
    return x if x.dtype == dtype else lax.bitcast_convert_type(x, dtype)


def _padded_exchange(operand, output, input_offsets, send_sizes, output_offsets, *, axis_name,
                     rows_per_peer):
    """One dense exchange with ``rows_per_peer`` padded rows per peer (exact if they fit)."""
    num_peers = lax.axis_size(axis_name)
    m = input_offsets.shape[0] // num_peers
    b = rows_per_peer
    sizes = send_sizes.reshape(num_peers, m)
    seg_end = jnp.cumsum(sizes, axis=1)
    seg_start = seg_end - sizes
    slot = jnp.arange(b, dtype=seg_end.dtype)
    # Segment that slot b of peer p's padded buffer belongs to (m means "padding").
    seg = jax.vmap(lambda e: jnp.searchsorted(e, slot, side="right"))(seg_end)
    valid = seg < m
    seg = jnp.minimum(seg, m - 1)
    within = slot[None, :] - jnp.take_along_axis(seg_start, seg, axis=1)
    src = jnp.take_along_axis(input_offsets.reshape(num_peers, m), seg, axis=1) + within
    dst = jnp.take_along_axis(output_offsets.reshape(num_peers, m), seg, axis=1) + within
    out_rows = output.shape[0]
    dst = jnp.where(valid, dst, out_rows)  # padding: an out-of-range destination
    rows = take_rows(operand, jnp.clip(src, 0, operand.shape[0] - 1))  # [P, b, ...]
    rows = lax.all_to_all(rows, axis_name, 0, 0, tiled=True)
    dst = lax.all_to_all(dst, axis_name, 0, 0, tiled=True).reshape(-1)
    # The receiver inverts the int destinations (cheap) and then gathers whole rows: on
    # XLA:CPU a row gather is several times faster than a row scatter of the P*b slots.
    incoming = jnp.full((out_rows,), -1, jnp.int32).at[dst].set(
        jnp.arange(num_peers * b, dtype=jnp.int32), mode="drop"
    )
    flat = rows.reshape((num_peers * b,) + operand.shape[1:])
    picked = take_rows(flat, jnp.maximum(incoming, 0))
    keep = (incoming >= 0).reshape((out_rows,) + (1,) * (output.ndim - 1))
    return jnp.where(keep, picked, output)


def emulated_ragged_all_to_all(
    operand: jax.Array,
    output: jax.Array,
    input_offsets: jax.Array,
    send_sizes: jax.Array,
    output_offsets: jax.Array,
    recv_sizes: jax.Array,
    *,
    axis_name: str,
    rows_per_peer: int,
    typical_rows_per_peer: int | None = None,
) -> jax.Array:
    """``lax.ragged_all_to_all`` from dense collectives: padded per-peer buffers + row indices.

    Exact for any segments whose rows sent to one peer total at most ``rows_per_peer``
    (the schedules pass a bound they can prove; ``operand.shape[0]`` is always safe for
    non-overlapping send segments). Cost: ``P * b`` rows through ``all_to_all`` where ``b`` is
    ``typical_rows_per_peer`` (default ``2 * N / P``) when every rank's largest per-peer send
    fits it (one ``pmax`` of an int decides, identically on all ranks), else ``rows_per_peer``.

    Shapes: operand ``[N, ...]``, output ``[M, ...]``, offsets/sizes ``[P*m] int32``.
    """
    del recv_sizes  # the receiver learns sizes from the sender's row indices
    num_peers = lax.axis_size(axis_name)
    args = (operand, output, input_offsets, send_sizes, output_offsets)
    if typical_rows_per_peer is None:
        typical_rows_per_peer = -(-2 * operand.shape[0] // num_peers)
    fast = max(1, min(rows_per_peer, -(-typical_rows_per_peer // 8) * 8))

    def exchange(rows):
        return lambda *a: _padded_exchange(*a, axis_name=axis_name, rows_per_peer=rows)

    if fast >= rows_per_peer:
        return exchange(rows_per_peer)(*args)
    largest = send_sizes.reshape(num_peers, -1).sum(axis=1).max()
    largest = lax.pmax(largest, axis_name)
    return lax.cond(largest <= fast, exchange(fast), exchange(rows_per_peer), *args)


def native_ragged_all_to_all(
    operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name,
    rows_per_peer, typical_rows_per_peer=None,
):
    del rows_per_peer, typical_rows_per_peer
    return lax.ragged_all_to_all(
        operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, axis_name=axis_name
    )


_RAGGED_A2A: PlatformRegistry[RaggedAllToAll] = PlatformRegistry({"cpu": emulated_ragged_all_to_all})


def register_ragged_all_to_all(platform: str, impl: RaggedAllToAll | None) -> None:
    """Use ``impl`` for ``platform`` (``None`` restores the native XLA op there). Takes effect
    for programs traced after it: the library's own compiled programs are re-made at their
    next call (:func:`moe_relayfree.registry.generation`); a ``jax.jit`` of your own that
    already traced a call keeps the old kernel until you re-jit it."""
    _RAGGED_A2A.set(platform, impl)


def ragged_all_to_all_impls() -> dict[str, RaggedAllToAll]:
    return _RAGGED_A2A.impls()


def peer_rows(copies: int, bound: int, num_ranks: int) -> dict:
    """Static ``rows_per_peer`` / ``typical_rows_per_peer`` for :func:`ragged_all_to_all` when
    each rank exchanges ``copies`` rows in all (a return trip: the rows of the way out), at most
    ``bound`` with any one peer: ``min(copies, bound)``, and ``2 * copies / P`` when routing is
    balanced."""
    return dict(rows_per_peer=min(copies, bound), typical_rows_per_peer=-(-2 * copies // num_ranks))


def ragged_all_to_all(
    operand: jax.Array,
    output: jax.Array,
    input_offsets: jax.Array,
    send_sizes: jax.Array,
    output_offsets: jax.Array,
    recv_sizes: jax.Array,
    *,
    axis_name: str,
    rows_per_peer: int | None = None,
    typical_rows_per_peer: int | None = None,
) -> jax.Array:
    """Semantics of ``jax.lax.ragged_all_to_all``, on every platform.

    Must be called inside ``shard_map`` over ``axis_name``. ``rows_per_peer`` and
    ``typical_rows_per_peer`` are hints for emulations (the rows this rank usually sends to
    one peer, at most): the CPU emulation takes an exchange of that size when every rank's
    sends fit it and one of the operand's rows otherwise, so a hint that is too small costs
    time, never rows. (The schedules, which can prove their bounds, use
    :func:`ragged_all_to_all_bounded`.)
    """
    hints = [b for b in (rows_per_peer, typical_rows_per_peer) if b is not None]
    return ragged_all_to_all_bounded(
        operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
        axis_name=axis_name, rows_per_peer=operand.shape[0],
        typical_rows_per_peer=min(hints) if hints else None)


def ragged_all_to_all_bounded(
    operand: jax.Array,
    output: jax.Array,
    input_offsets: jax.Array,
    send_sizes: jax.Array,
    output_offsets: jax.Array,
    recv_sizes: jax.Array,
    *,
    axis_name: str,
    rows_per_peer: int | None = None,
    typical_rows_per_peer: int | None = None,
) -> jax.Array:
    """:func:`ragged_all_to_all` where ``rows_per_peer`` is a PROVEN static bound on the rows
    this rank sends to any one peer (an emulation sized by it is wrong past it),
    ``typical_rows_per_peer`` the usual amount; they size emulations only (the CPU one takes
    a small exchange when every rank's sends fit the typical size, and the bound otherwise).
    """
    if rows_per_peer is None:
        rows_per_peer = operand.shape[0]
    rows_per_peer = max(1, min(int(rows_per_peer), operand.shape[0]))
    output = ensure_varying(output, axis_name, operand, input_offsets, send_sizes,
                            output_offsets, recv_sizes)
    args = (operand, output, input_offsets, send_sizes, output_offsets, recv_sizes)

    def bind(impl: RaggedAllToAll) -> Callable[..., jax.Array]:
        return lambda *a: impl(
            *a, axis_name=axis_name, rows_per_peer=rows_per_peer,
            typical_rows_per_peer=typical_rows_per_peer,
        )

    branches = {p: bind(impl) for p, impl in _RAGGED_A2A.impls().items()}
    return lax.platform_dependent(*args, **branches, default=bind(native_ragged_all_to_all))
