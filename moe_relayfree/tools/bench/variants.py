"""The implementations a benchmark compares, by name: whole-layer programs and per-phase parts,
both read from the table of paths (:data:`moe_relayfree.paths.PATHS`).

Whole layers (:func:`layer_program`), on a 1-D ``"ep"`` mesh, args ``(x, ids, weights,
w_gate, w_up, w_down)`` as :func:`..inputs.layer_inputs` makes them:

* every path by its name (``prefill``, ``decode``, ``ragged_baseline``, ...):
  ``expert_parallel_moe`` with the config that selects it; ``auto``: the schedule auto picks;
* ``prefill_one_round``: prefill with one worst-case round (a skewed batch's bytes);
* ``decode_gather``: the decode schedule's gather transport, called directly;
* ``decode_exchange`` / ``prefill_exchange``: the schedule called directly with the expert
  compute replaced by a copy of the window rows: its own work (exchange, windows, combine)
  apart from the weight reads both schedules share.

Phases (:func:`phases`): dispatch, experts and combine of every path as per-rank functions, to
time and analyse apart.
"""

from __future__ import annotations

from moe_relayfree.paths import PATHS, path_settings

LAYERS = tuple(PATHS) + ("auto",)
EXCHANGES = ("decode_exchange", "prefill_exchange")
PHASED = tuple(PATHS)
CAPACITY_FACTOR = 1.25  # GShard's usual training/eval factor for the capacity path; drops counted
RELAYFREE_FACTOR = 2.0  # relay-free (and bounded baseline) receive rows per round


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
    kw = {name: path_settings(name) for name in PATHS}
    kw.update(auto=dict(schedule="auto"),
              prefill_one_round=dict(schedule="prefill", capacity_factor=None))
    if name not in kw:
        raise ValueError(f"unknown layer program {name!r}; choose from "
                         f"{sorted(kw) + ['decode_gather', *EXCHANGES]}")
    return jax.jit(lambda *a: mr.expert_parallel_moe(*a, mesh=mesh, **kw[name]))


def phases(num_experts: int, tokens: int, k: int, num_ranks: int, axis: str = "ep"):
    """Per-rank ``{name: {"dispatch", "experts", "combine", "layer"}}`` of every path
    (:data:`PHASED`: ``dispatch(x, ids, w) -> (received, handle)``, ``experts(received, wg,
    wu, wd)``, ``combine(out, handle) -> y``, ``layer(x, ids, w, wg, wu, wd) -> y``), and the
    sizes used: ``{"relayfree_rows", "capacity"}``. Receive rows per round: relay-free and the
    bounded baseline ``RELAYFREE_FACTOR * T * k``; the capacity baseline's slots GShard's
    ``CAPACITY_FACTOR`` (it drops, and says how many)."""
    import functools

    from moe_relayfree.baselines import capacity
    from moe_relayfree.paths import Call, ExpertWeights
    from moe_relayfree.plan import rows_per_round

    cap = capacity.capacity_for(tokens, k, num_experts, CAPACITY_FACTOR)
    impls = {}
    for name, path in PATHS.items():
        rows = rows_per_round(tokens, k, num_ranks, RELAYFREE_FACTOR, path.row_floor)
        call = Call(num_experts=num_experts, axis_name=axis, rows=rows, capacity=cap)

        def experts(received, wg, wu, wd, path=path):
            return path.experts(received, ExpertWeights(wg, wu, wd))

        def layer(x, ids, w, wg, wu, wd, path=path, call=call):
            return path.layer(x, ids, w, ExpertWeights(wg, wu, wd), call)

        impls[name] = dict(dispatch=functools.partial(path.dispatch, call=call),
                           experts=experts, combine=path.combine, layer=layer)
    rows = rows_per_round(tokens, k, num_ranks, RELAYFREE_FACTOR)
    return impls, dict(relayfree_rows=rows, capacity=cap)
