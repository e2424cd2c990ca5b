"""Buffer-centric ragged expert parallelism (MaxText ``moe.py`` sparse path), for comparison.

Per rank (call inside ``shard_map``), the steps the relay-free schedule removes are marked (*):

1. permute: sort the ``T*k`` copies by global expert, gather -> ``[T*k, d]``.
2. ``ragged_all_to_all`` with ONE segment per peer into a receive buffer (default worst case
   ``P*T*k`` rows, so it never drops; with ``recv_rows=R``, MaxText's bounded buffer, rows past
   ``R`` on a receiver are DROPPED, sources in rank order, and counted); rows arrive
   source-major.
3. (*) local permute: argsort the received rows by local expert (padding rows included) and
   gather -> another ``[R, d]``.
4. grouped SwiGLU.
5. (*) un-sort: gather back to arrival order -> ``[R, d]``.
6. reverse ``ragged_all_to_all`` -> ``[T*k, d]`` in sorted order on the source.
7. (*) un-permute: scatter back to (token, choice) order -> ``[T*k, d]``, then the weighted sum
   over k.

It shares the collective layer (native or CPU-emulated ragged all-to-all) and the grouped
GEMM with the relay-free schedule, so differences come from layout work only.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from moe_relayfree.collectives import ensure_varying, peer_rows, ragged_all_to_all_bounded
from moe_relayfree.plan import sort_and_count
from moe_relayfree.routing import poison_rows, screen_choices
from moe_relayfree.windows import take_rows

_F32 = jnp.float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RaggedHandle:
    """order ``[T*k]``; per-peer sizes and offsets ``[P]``;
    local_order ``[R]`` (the receiver's sort); weights ``[T, k] f32``; dropped ``[]`` int32
    copies of this rank's tokens a bounded receive buffer had no room for; invalid ``[T]
    bool`` tokens with out-of-range ids (output NaN)."""

    order: jax.Array
    send_sizes: jax.Array
    send_offsets: jax.Array
    dest_offsets: jax.Array
    recv_sizes: jax.Array
    recv_offsets: jax.Array
    return_offsets: jax.Array
    local_order: jax.Array
    weights: jax.Array
    dropped: jax.Array
    invalid: jax.Array
    num_copies: int = dataclasses.field(metadata=dict(static=True))
    axis_name: str = dataclasses.field(metadata=dict(static=True))


def dispatch(
    x: jax.Array,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    *,
    num_experts: int,
    axis_name: str,
    recv_rows: int | None = None,
) -> tuple[tuple[jax.Array, jax.Array], RaggedHandle]:
    """Steps 1-3. Returns ((rows ``[R, d]`` sorted by local expert, group_sizes ``[El]``), handle).
    Ids in ``[0, E)`` or ``-1`` (no expert); any other id makes its token's output NaN."""
    num_ranks = lax.axis_size(axis_name)
    local = num_experts // num_ranks
    topk_ids, topk_weights, invalid = screen_choices(topk_ids, topk_weights, num_experts)
    t, k = topk_ids.shape
    n = t * k
    rows_bound = num_ranks * n if recv_rows is None else recv_rows
    order, _, all_counts = sort_and_count(topk_ids, num_experts, axis_name)
    permuted = take_rows(x, order // k)  # step 1: [T*k, d]

    me = lax.axis_index(axis_name)
    wanted = all_counts.sum(-1)  # [P_src, P_dst]
    # A receiver keeps the first rows_bound rows, sources in rank order; each source's segment
    # is sorted by local expert, so what survives of it is a prefix per (source, receiver).
    before = jnp.cumsum(wanted, axis=0) - wanted
    per_peer = jnp.clip(rows_bound - before, 0, wanted)
    kept_counts = jnp.clip(rows_bound - before[..., None] - (jnp.cumsum(all_counts, -1) - all_counts),
                           0, all_counts)  # [P_src, P_dst, El]
    dropped = (wanted[me] - per_peer[me]).sum().astype(jnp.int32)
    send_sizes = per_peer[me]
    send_offsets = jnp.cumsum(wanted[me]) - wanted[me]  # segments start where they are sorted
    arrive = jnp.cumsum(per_peer, axis=0) - per_peer  # receiver-side offset of each source
    dest_offsets = arrive[me]  # where my block starts on each receiver
    recv_sizes = per_peer[:, me]
    recv_offsets = arrive[:, me]
    # where each source's block for me sits in that source's sorted send buffer
    return_offsets = (jnp.cumsum(wanted, axis=1) - wanted)[:, me]
    buf = ensure_varying(jnp.zeros((rows_bound, x.shape[1]), x.dtype), axis_name, x)
    received = ragged_all_to_all_bounded(  # step 2: source-major
        permuted, buf, send_offsets, send_sizes, dest_offsets, recv_sizes,
        axis_name=axis_name, **peer_rows(n, rows_bound, num_ranks),
    )

    # Step 3: local expert of every received row (padding rows sort last), argsort, gather.
    mine = kept_counts[:, me, :]  # [P_src, El] rows received per (source, local expert)
    row = jnp.arange(rows_bound, dtype=jnp.int32)
    block_starts = jnp.cumsum(recv_sizes) - recv_sizes  # [P_src]
    src = jnp.clip(jnp.searchsorted(jnp.cumsum(recv_sizes), row, side="right"), 0, num_ranks - 1)
    within = row - block_starts[src]
    expert_ends = jnp.cumsum(mine, axis=1)  # [P_src, El]
    local_expert = jax.vmap(lambda ends, w: jnp.searchsorted(ends, w, side="right"))(
        expert_ends[src], within
    )
    local_expert = jnp.where(row < recv_sizes.sum(), local_expert, local)
    local_order = jnp.argsort(local_expert, stable=True).astype(jnp.int32)
    grouped = take_rows(received, local_order)
    group_sizes = mine.sum(0)
    handle = RaggedHandle(
        order=order, send_sizes=send_sizes, send_offsets=send_offsets,
        dest_offsets=dest_offsets, recv_sizes=recv_sizes, recv_offsets=recv_offsets,
        return_offsets=return_offsets, local_order=local_order,
        weights=topk_weights.astype(_F32), dropped=dropped, invalid=invalid, num_copies=n,
        axis_name=axis_name,
    )
    return (grouped, group_sizes), handle


def combine(expert_out: jax.Array, handle: RaggedHandle) -> jax.Array:
    """Steps 5-7. expert_out ``[R, d]`` in local-expert order -> ``[T, d]``."""
    unsorted = jnp.zeros_like(expert_out).at[handle.local_order].set(expert_out)  # step 5
    back = ensure_varying(
        jnp.zeros((handle.num_copies, expert_out.shape[1]), expert_out.dtype), handle.axis_name,
        expert_out,
    )
    returned = ragged_all_to_all_bounded(  # step 6: lands in the source's sorted order
        unsorted, back, handle.recv_offsets, handle.recv_sizes, handle.return_offsets,
        handle.send_sizes, axis_name=handle.axis_name,
        **peer_rows(handle.num_copies, expert_out.shape[0], handle.send_sizes.shape[0]),
    )
    unpermuted = jnp.zeros_like(returned).at[handle.order].set(returned)  # step 7
    t, k = handle.weights.shape
    y = jnp.einsum("tk,tkd->td", handle.weights, unpermuted.reshape(t, k, -1).astype(_F32))
    return poison_rows(y, handle.invalid).astype(expert_out.dtype)


def dropped_copies(topk_ids, num_experts: int, num_ranks: int, recv_rows: int) -> np.ndarray:
    """Copies a ``recv_rows`` receive buffer drops, per source rank (host-side, NumPy): the
    exact rule of :func:`dispatch`, for benchmark reports. topk_ids ``[N, k]``, split in
    ``num_ranks`` equal row blocks. Returns ``[P] int``."""
    ids = np.asarray(topk_ids).reshape(num_ranks, -1)
    local = num_experts // num_ranks
    wanted = np.stack([np.bincount(r // local, minlength=num_ranks) for r in ids])  # [src, dst]
    before = np.cumsum(wanted, axis=0) - wanted
    kept = np.clip(recv_rows - before, 0, wanted)
    return (wanted - kept).sum(axis=1)
