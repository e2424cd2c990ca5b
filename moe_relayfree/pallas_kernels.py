"""The Mosaic kernels of the remote-write paths (:mod:`moe_relayfree.pallas_remote`,
:mod:`moe_relayfree.pallas_decode`) and their launcher: a chip's address on the mesh, the
entry barrier, the waits on DMA semaphores (bytes, so one wait covers many rows), the
dispatch kernel (one remote DMA per copy, its per-copy table streamed through SMEM) and the
combine kernel (one remote DMA per segment). They move rows and count bytes; which row goes
where is the plan's (:mod:`moe_relayfree.plan`), computed outside them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from moe_relayfree.pallas_experts import interpret_params

_I32 = jnp.int32
_MESH = pl.DeviceIdType.MESH


def mesh_axes(axis_name: str) -> tuple[str, ...]:
    """The axes of the mesh the caller's ``shard_map`` runs over, in mesh order (a chip is
    addressed by its coordinates on all of them); ``(axis_name,)`` outside one."""
    axes = tuple(jax.sharding.get_abstract_mesh().axis_names)
    return axes if axis_name in axes else (axis_name,)


def _chip(rank, axes: tuple[str, ...], axis_name: str) -> tuple:
    """Device id of ``rank`` on the expert axis, this chip's coordinates on the other axes
    (the peers of one expert-parallel group: the same data / tensor replica)."""
    return tuple(rank if a == axis_name else lax.axis_index(a) for a in axes)


def _barrier(num_ranks: int, axes: tuple[str, ...], axis_name: str) -> None:
    """Every chip of the group has entered this kernel (so its output buffer exists)."""
    sem = pltpu.get_barrier_semaphore()
    for p in range(num_ranks):
        pl.semaphore_signal(sem, 1, device_id=_chip(p, axes, axis_name), device_id_type=_MESH)
    pl.semaphore_wait(sem, num_ranks)


def _wait_rows(ref, count, rows: int, send_sem, recv_sem, axes: tuple[str, ...],
               axis_name: str, *, send: bool) -> None:
    """Waits for ``count`` rows' bytes of DMAs into (``send``: out of) this chip, by
    descriptors over at most ``rows`` rows of ``ref`` (a zero-row wait is skipped: the
    interpreter's race detector trips on it)."""
    me = _chip(lax.axis_index(axis_name), axes, axis_name)

    def wait(i, carry):
        m = jnp.minimum(rows, count - i * rows)

        @pl.when(m > 0)
        def _():
            d = pltpu.make_async_remote_copy(ref.at[pl.ds(0, m)], ref.at[pl.ds(0, m)], send_sem,
                                             recv_sem, device_id=me, device_id_type=_MESH)
            d.wait_send() if send else d.wait_recv()
        return carry

    lax.fori_loop(0, pl.cdiv(count, rows), wait, 0)


# Per-copy table entries brought into SMEM at a time: the table lives in HBM, so the copies
# per chip are not bounded by SMEM's 1 MiB (scalar-prefetched whole, one int32 per copy ran
# out of it past T*k = 262,144 less the other tables).
TABLE_CHUNK = 8192


def table_chunk(copies: int) -> int:
    """Entries per chunk of a ``copies``-entry table: :data:`TABLE_CHUNK`, or the table
    rounded up to 8 when it is smaller."""
    return min(TABLE_CHUNK, -(-copies // 8) * 8)


def _issue_copies(target_hbm, x_ref, win_ref, table, table_sem, send_sem, recv_sem, *,
                  k: int, num_ranks: int, axes: tuple[str, ...], axis_name: str) -> None:
    """Starts one remote DMA per copy of the per-copy table ``target_hbm [n] int32`` (``row *
    P + receiver``, -1: none), from its token's row ``x_ref[j // k]`` into row ``row`` of the
    receiver's ``win_ref``; the table is brought into the SMEM buffer ``table`` a chunk at a
    time."""
    chunk = table.shape[0]

    def load(c, carry):
        copy = pltpu.make_async_copy(target_hbm.at[pl.ds(c * chunk, chunk)], table, table_sem)
        copy.start()
        copy.wait()

        def issue(i, carry):
            target = table[i]

            @pl.when(target >= 0)
            def _():
                row, dst = target // num_ranks, target % num_ranks
                t = (c * chunk + i) // k
                pltpu.make_async_remote_copy(x_ref.at[pl.ds(t, 1)], win_ref.at[pl.ds(row, 1)],
                                             send_sem, recv_sem,
                                             device_id=_chip(dst, axes, axis_name),
                                             device_id_type=_MESH).start()
            return carry

        return lax.fori_loop(0, chunk, issue, carry)

    lax.fori_loop(0, target_hbm.shape[0] // chunk, load, 0)


def _dispatch_kernel(n_ref, target_hbm, x_ref, win_ref, table, table_sem, send_sem, recv_sem,
                     *, k: int, num_ranks: int, axes: tuple[str, ...], axis_name: str):
    _barrier(num_ranks, axes, axis_name)
    _issue_copies(target_hbm, x_ref, win_ref, table, table_sem, send_sem, recv_sem, k=k,
                  num_ranks=num_ranks, axes=axes, axis_name=axis_name)
    rows = win_ref.shape[0]
    _wait_rows(win_ref, n_ref[0], rows, send_sem, recv_sem, axes, axis_name, send=True)
    _wait_rows(win_ref, n_ref[1], rows, send_sem, recv_sem, axes, axis_name, send=False)


def _combine_kernel(src_ref, size_ref, dst_off_ref, n_ref, out_ref, *refs, local: int,
                    num_ranks: int, axes: tuple[str, ...], axis_name: str):
    returned_ref, send_sem, recv_sem = refs[-3:]
    _barrier(num_ranks, axes, axis_name)

    def issue(g, carry):
        m = size_ref[g]

        @pl.when(m > 0)
        def _():
            pltpu.make_async_remote_copy(out_ref.at[pl.ds(src_ref[g], m)],
                                         returned_ref.at[pl.ds(dst_off_ref[g], m)], send_sem,
                                         recv_sem, device_id=_chip(g // local, axes, axis_name),
                                         device_id_type=_MESH).start()
        return carry

    lax.fori_loop(0, size_ref.shape[0], issue, 0)
    _wait_rows(out_ref, n_ref[0], out_ref.shape[0], send_sem, recv_sem, axes, axis_name,
               send=True)
    _wait_rows(returned_ref, n_ref[1], out_ref.shape[0], send_sem, recv_sem, axes, axis_name,
               send=False)


def _call(kernel, prefetch: tuple, operands: tuple, out_shape: tuple, collective_id: int,
          platform: str | None, scratch: tuple = (), reuse: jax.Array | None = None):
    """A kernel over HBM refs: ``prefetch`` int32 tables in SMEM, ``operands`` in HBM (the
    last: the source rows), a fresh, unfilled output of ``out_shape`` in the rows' dtype,
    varying over the axes they do (under ``shard_map``'s ``check_vma``); ``scratch`` before
    the send and receive DMA semaphores. ``reuse``: a dead buffer of the output's shape and
    dtype the output is written into (an extra operand after ``operands``, aliased)."""
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    rows = operands[-1]
    aliases = {}
    if reuse is not None:
        aliases = {len(prefetch) + len(operands): 0}
        operands = (*operands, reuse)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(out_shape, rows.dtype,
                                       manual_axis_type=jax.typeof(rows).manual_axis_type),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch), grid=(1,), in_specs=[any_spec] * len(operands),
            out_specs=any_spec,
            scratch_shapes=[*scratch, pltpu.SemaphoreType.DMA, pltpu.SemaphoreType.DMA]),
        input_output_aliases=aliases,
        compiler_params=pltpu.CompilerParams(collective_id=collective_id),
        interpret=interpret_params(platform),
    )(*prefetch, *operands)


def copy_table(dst: jax.Array, row: jax.Array, num_ranks: int,
               rows: int) -> tuple[jax.Array, int]:
    """The dispatch kernel's per-copy table from each copy's receiver ``dst [n]`` and window
    row ``row [n]`` (-1: not sent) in a ``rows``-row window: one int32 per copy, ``row * P +
    receiver`` or -1 (half the table of two), padded with -1 to whole SMEM chunks -> (table,
    chunk entries)."""
    if rows * num_ranks >= 2**31:
        raise ValueError(f"{rows} receive rows on {num_ranks} chips do not pack into an int32 "
                         "per copy; lower capacity_factor")
    target = jnp.where(row >= 0, row * num_ranks + dst, -1).astype(_I32)
    chunk = table_chunk(target.shape[0])
    return jnp.pad(target, (0, -target.shape[0] % chunk), constant_values=-1), chunk


__all__ = ["TABLE_CHUNK", "copy_table", "mesh_axes", "table_chunk"]
