"""The implementations a benchmark compares, by name: whole-layer programs and per-phase parts.

Whole layers (:func:`layer_program`), on a 1-D ``"ep"`` mesh, args ``(x, ids, weights,
w_gate, w_up, w_down)`` as :func:`..inputs.layer_inputs` makes them:

* ``decode`` / ``prefill`` / ``auto``: ``expert_parallel_moe`` with that schedule;
* ``ragged_baseline`` / ``capacity_baseline``: the buffer-centric paths that drop nothing;
* ``prefill_one_round``: prefill with one worst-case round (a skewed batch's bytes);
* ``decode_gather``: the decode schedule's gather transport, called directly;
* ``decode_exchange`` / ``prefill_exchange``: the schedule called directly with the expert
  compute replaced by a copy of the window rows: its own work (exchange, windows, combine)
  apart from the weight reads both schedules share.

Phases (:func:`phases`): dispatch, experts and combine of each path as per-rank functions, to
time and analyse apart.
"""

from __future__ import annotations

LAYERS = ("decode", "prefill", "auto", "ragged_baseline", "capacity_baseline")
EXCHANGES = ("decode_exchange", "prefill_exchange")
PHASED = ("relayfree", "relayfree_decode", "ragged_baseline", "capacity_baseline")
CAPACITY_FACTOR = 1.25  # GShard's usual training/eval factor for the capacity path; drops counted
RELAYFREE_FACTOR = 2.0  # relay-free receive rows per round (exact at any factor)


def schedule_program(mesh, schedule: str, *, transport: str = "auto", gemm: bool = True,
                     axis: str = "ep"):
    """One schedule called directly (``decode_moe`` / ``prefill_moe``) under ``shard_map``,
    jitted; ``gemm=False``: the expert compute is a copy of the window rows."""
    import jax
    from jax.sharding import PartitionSpec as P

    from moe_relayfree import decode, prefill
    from moe_relayfree.experts import windows_swiglu
    from moe_relayfree.plan import rows_per_round

    def body(x, ids, w, wg, wu, wd):
        def experts(win):
            return windows_swiglu(win, wg, wu, wd) if gemm else win.rows

        common = dict(num_experts=wg.shape[0] * mesh.shape[axis], axis_name=axis)
        if schedule == "decode":
            return decode.decode_moe(x, ids, w, experts, transport=transport, **common)
        rows = rows_per_round(x.shape[0], ids.shape[1], mesh.shape[axis], RELAYFREE_FACTOR)
        return prefill.prefill_moe(x, ids, w, experts, rows_per_round=rows, **common)

    tok, exp = P(axis), P(axis, None, None)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(tok,) * 3 + (exp,) * 3, out_specs=tok))


def layer_program(mesh, name: str):
    """The jitted whole-layer program ``name`` (see the module docstring)."""
    import jax

    import moe_relayfree as mr

    if name == "decode_gather":
        return schedule_program(mesh, "decode", transport="gather")
    if name in EXCHANGES:
        return schedule_program(mesh, name.split("_")[0], gemm=False)
    kw = {"decode": dict(schedule="decode"), "prefill": dict(schedule="prefill"),
          "auto": dict(schedule="auto"), "ragged_baseline": dict(implementation="ragged_baseline"),
          "capacity_baseline": dict(implementation="capacity_baseline"),
          "prefill_one_round": dict(schedule="prefill", capacity_factor=None)}
    if name not in kw:
        raise ValueError(f"unknown layer program {name!r}; choose from "
                         f"{sorted(kw) + ['decode_gather', *EXCHANGES]}")
    return jax.jit(lambda *a: mr.expert_parallel_moe(*a, mesh=mesh, **kw[name]))


def phases(num_experts: int, tokens: int, k: int, num_ranks: int, axis: str = "ep"):
    """Per-rank ``{name: {"dispatch", "experts", "combine"[, "layer"]}}`` of :data:`PHASED`
    (``dispatch(x, ids, w) -> (received, handle)``, ``experts(received, wg, wu, wd)``,
    ``combine(out, handle) -> y``; ``layer`` where the path's whole layer is not just the three
    chained), and the sizes used: ``{"relayfree_rows", "capacity"}``."""
    import jax

    from moe_relayfree import decode, prefill
    from moe_relayfree.baselines import capacity, ragged
    from moe_relayfree.experts import grouped_swiglu, swiglu, windows_swiglu
    from moe_relayfree.plan import rows_per_round

    rows = rows_per_round(tokens, k, num_ranks, RELAYFREE_FACTOR)
    cap = capacity.capacity_for(tokens, k, num_experts, CAPACITY_FACTOR)
    common = dict(num_experts=num_experts, axis_name=axis)

    def rf_disp(x, ids, w):
        h = prefill.plan_and_pack(x, ids, w, rows_per_round=rows, **common)
        return prefill.dispatch_round(h, 0), h

    def rf_comb(out, h):
        return prefill.weighted_sum(prefill.combine_round(h, out, 0))

    def rf_layer(x, ids, w, wg, wu, wd):
        return prefill.prefill_moe(
            x, ids, w, lambda win: windows_swiglu(win, wg, wu, wd), rows_per_round=rows, **common)

    def decode_layer(x, ids, w, wg, wu, wd):
        return decode.decode_moe(x, ids, w, lambda win: windows_swiglu(win, wg, wu, wd), **common)

    impls = {
        "relayfree": dict(dispatch=rf_disp, experts=windows_swiglu, combine=rf_comb, layer=rf_layer),
        "relayfree_decode": dict(
            dispatch=lambda x, ids, w: decode.dispatch(x, ids, w, **common),
            experts=windows_swiglu, combine=decode.combine, layer=decode_layer),
        "ragged_baseline": dict(
            dispatch=lambda x, ids, w: ragged.dispatch(x, ids, w, **common),
            experts=lambda g, wg, wu, wd: grouped_swiglu(g[0], g[1], wg, wu, wd),
            combine=ragged.combine),
        "capacity_baseline": dict(
            dispatch=lambda x, ids, w: capacity.dispatch(x, ids, w, capacity=cap, **common),
            experts=lambda e, wg, wu, wd: jax.vmap(swiglu)(e, wg, wu, wd),
            combine=capacity.combine),
    }
    return impls, dict(relayfree_rows=rows, capacity=cap)
