"""Relay-free vs buffer-centric expert parallelism: dispatch, combine, whole layer, memory, HLO.

All implementations (:func:`.variants.phases`) run in the same process on the same inputs and
share the collective layer (native ragged all-to-all, or the CPU emulation) and the expert
math; every comparison is a ratio measured in the same run. Medians over repeats. The command:
``scripts/bench.py``; the report's tables: :mod:`.layer_report`.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import moe_relayfree as mr
from moe_relayfree import selection
from moe_relayfree.baselines import capacity
from moe_relayfree.paths import PATHS
from moe_relayfree.plan import rows_per_round
from moe_relayfree.tools import analysis
from moe_relayfree.tools.bench import env, variants
from moe_relayfree.tools.bench.inputs import layer_inputs
from moe_relayfree.tools.bench.layer_report import markdown, plots
from moe_relayfree.tools.bench.report import write
from moe_relayfree.tools.bench.timing import interleaved, median_seconds
from moe_relayfree.tools.bench.variants import CAPACITY_FACTOR, PHASED, RELAYFREE_FACTOR

AXIS = "ep"

# Ops that move or materialise data (elementwise ops fuse away on accelerators and are not
# counted; the GEMMs themselves are not layout work).
LAYOUT_OPS = {
    "stablehlo.gather", "stablehlo.scatter", "stablehlo.sort", "stablehlo.custom_call",
    "stablehlo.all_to_all", "stablehlo.all_gather", "stablehlo.reduce_scatter",
    "stablehlo.dot_general", "stablehlo.transpose", "stablehlo.concatenate",
    "stablehlo.dynamic_update_slice", "stablehlo.pad",
}


def estimated_bytes(name: str, tokens: int, k: int, d: int, num_ranks: int, num_experts: int,
                    itemsize: int = 4) -> int:
    """Rough size of the big buffers of one layer call over all ranks (for the skip guard)."""
    tk = tokens * k
    if name in ("prefill", "ragged_baseline_bounded"):
        rows = rows_per_round(tokens, k, num_ranks, RELAYFREE_FACTOR)
        per_rank = 3 * tk + 2 * rows + 2 * num_ranks * min(tk, rows)  # + emulation padding
    elif name == "decode":
        # gathered tokens or per-source blocks, worst-case windows (in, expert out, partials)
        worst = num_ranks * tokens * min(k, num_experts // num_ranks)
        per_rank = num_ranks * tokens + 3 * worst + 2 * tk
    elif name == "ragged_baseline":
        per_rank = 3 * tk + 5 * num_ranks * tk + 2 * num_ranks * tk
    elif name == "allgather_baseline":  # gathered tokens, worst-case windows in and out, partials
        per_rank = num_ranks * tokens + 3 * num_ranks * tk + num_ranks * tokens
    else:
        cap = capacity.capacity_for(tokens, k, num_experts, CAPACITY_FACTOR)
        per_rank = 5 * num_experts * cap + tokens * num_experts * cap // max(d, 1) * 2
    return per_rank * d * itemsize * num_ranks


def stack(tree):
    return jax.tree.map(lambda a: a[None], tree)


def unstack(tree):
    return jax.tree.map(lambda a: a[0], tree)


def sharded(mesh, fn, in_specs, out_specs):
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs))


def measure_impl(mesh, impl, tokens_in, weights, *, repeats, analyse, min_elements):
    tok, exp, stacked = P(AXIS), P(AXIS, None, None), P(AXIS)
    disp = sharded(mesh, lambda x, i, w: stack(impl["dispatch"](x, i, w)), (tok,) * 3, stacked)
    recv, handle = disp(*tokens_in)
    experts = sharded(mesh, lambda r, *w: stack(impl["experts"](unstack(r), *w)),
                      (stacked, exp, exp, exp), stacked)
    out = experts(recv, *weights)
    comb = sharded(mesh, lambda o, h: impl["combine"](unstack(o), unstack(h)), (stacked, stacked), tok)

    def whole(x, i, w, wg, wu, wd):
        if "layer" in impl:
            return impl["layer"](x, i, w, wg, wu, wd)
        r, h = impl["dispatch"](x, i, w)
        return impl["combine"](impl["experts"](r, wg, wu, wd), h)

    layer = sharded(mesh, whole, (tok,) * 3 + (exp,) * 3, tok)
    row = {
        "dispatch_s": median_seconds(disp, *tokens_in, repeats=repeats),
        "combine_s": median_seconds(comb, out, handle, repeats=repeats),
        "layer_s": median_seconds(layer, *tokens_in, *weights, repeats=repeats),
    }
    y = layer(*tokens_in, *weights)
    if hasattr(handle, "dropped"):
        row["dropped_copies"] = int(np.asarray(handle.dropped).sum())
    compiled = layer.lower(*tokens_in, *weights).compile()
    row["temp_bytes_per_device"] = int(compiled.memory_analysis().temp_size_in_bytes)
    if analyse:
        row["full_size"] = {}
        for phase, fn, fargs in (("dispatch", disp, tokens_in), ("combine", comb, (out, handle))):
            native = fn.trace(*fargs).lower(lowering_platforms=("cuda",)).as_text()
            bufs = [b for b in analysis.stablehlo_buffers(native, min_elements) if b.op in LAYOUT_OPS]
            cpu = analysis.compiled_hlo_buffers(fn.lower(*fargs).compile().as_text(), min_elements)
            row["full_size"][phase] = {"native": analysis.summarize(bufs),
                                       "cpu": analysis.summarize(cpu)}
    return row, y, layer


def floor_seconds(mesh, rows_per_rank, d, repeats):
    """One read+write pass over T*k*d elements per rank: the memcpy floor."""
    a = jax.device_put(jnp.ones((rows_per_rank * mesh.shape[AXIS], d), jnp.float32),
                       NamedSharding(mesh, P(AXIS)))
    fn = sharded(mesh, lambda a: a * 2.0, P(AXIS), P(AXIS))
    return median_seconds(fn, a, repeats=repeats)


def run_case(case, *, repeats, analyse, budget_bytes, names=None, choice_seconds=0.0):
    num_ranks, tokens, num_experts, k, d, f = (case[key] for key in ("P", "T", "E", "k", "d", "f"))
    mesh = jax.make_mesh((num_ranks,), (AXIS,), devices=jax.devices()[:num_ranks])
    placed = layer_inputs(mesh, tokens, num_experts, k, d, f, axis=AXIS)
    tokens_in, weights = tuple(placed[:3]), tuple(placed[3:])
    impls, sizes = variants.phases(num_experts, tokens, k, num_ranks, AXIS)
    # the paths compiled for this platform (the Pallas TPU path runs only interpreted here,
    # which times the interpreter, and does not lower for cuda)
    platform = mesh.devices.flat[0].platform
    names = [n for n in (names or impls) if PATHS[n].native(platform)]
    result = dict(case, **sizes, floor_s=floor_seconds(mesh, tokens * k, d, repeats), impls={})
    reference, layers = None, {}
    for name in names:
        est = estimated_bytes(name, tokens, k, d, num_ranks, num_experts)
        if est > budget_bytes:
            result["impls"][name] = {"skipped": f"estimated {est / 2**30:.1f} GiB of buffers"}
            continue
        row, y, layers[name] = measure_impl(mesh, impls[name], tokens_in, weights,
                                            repeats=repeats, analyse=analyse,
                                            min_elements=tokens * k * d)
        if reference is None:
            reference = np.asarray(y)
        row["max_abs_diff_vs_first"] = float(np.abs(np.asarray(y) - reference).max())
        result["impls"][name] = row
        print(f"  {case['name']:>22s} P={num_ranks} T={tokens:5d} {name:18s} "
              f"dispatch {row['dispatch_s']*1e3:8.2f} ms  combine {row['combine_s']*1e3:8.2f} ms  "
              f"layer {row['layer_s']*1e3:8.2f} ms", flush=True)
    result["auto"] = auto_choice(layers, (*tokens_in, *weights), tokens,
                                 min_rounds=2 * repeats + 1, seconds=choice_seconds)
    base = result["impls"].get("prefill", {})
    for name, row in result["impls"].items():
        if "skipped" in row or "dispatch_s" not in base:
            continue
        for key in ("dispatch_s", "combine_s", "layer_s"):
            row[key.replace("_s", "_vs_relayfree")] = row[key] / base[key]
            row[key.replace("_s", "_vs_floor")] = row[key] / result["floor_s"]
    return result


CHOICE_SECONDS = 3.0  # per schedule: small layers get more rounds, so one noisy round weighs less
MAX_CHOICE_ROUNDS = 400


def auto_choice(layers: dict, args: tuple, tokens: int, *, min_rounds: int,
                seconds: float = 0.0) -> dict:
    """What ``schedule="auto"`` resolves to at this size, and how its choice compares with the
    faster schedule: the two schedules' layer programs timed in alternating order, at least
    ``min_rounds`` rounds and until each has been timed ``seconds``; medians of per-round
    ratios (the program auto runs is the chosen one's)."""
    choice = selection.select_schedule(tokens, platform=jax.devices()[0].platform)
    row = {"schedule": choice, "threshold": selection.decode_threshold(jax.devices()[0].platform)}
    fns = {s: layers.get(s) for s in ("decode", "prefill")}
    if any(fn is None for fn in fns.values()):
        return row  # one schedule skipped (memory guard): nothing to compare against
    times = interleaved(fns, args, min_rounds=min_rounds, seconds=seconds,
                        max_rounds=MAX_CHOICE_ROUNDS)
    dec, pre = times["decode"], times["prefill"]
    row.update(rounds=len(dec), decode_s=float(np.median(dec)), prefill_s=float(np.median(pre)),
               decode_vs_prefill=float(np.median(dec / pre)),
               vs_faster=float(np.median({"decode": dec, "prefill": pre}[choice]
                                         / np.minimum(dec, pre))))
    return row


# --- meshes with several axes ----------------------------------------------------------------

MESHES = (  # (label, mesh axes, batch_axes, experts multiplier)
    ("ep=8", {"ep": 8}, None, 1),
    ("data=2,ep=4", {"data": 2, "ep": 4}, None, 1),
    ("data=2,ep=4, tokens over ep only", {"data": 2, "ep": 4}, ("ep",), 1),
    ("ep=8 with 2E experts", {"ep": 8}, None, 2),
)


def mesh_case(case, *, repeats: int, rounds: int = 3) -> dict:
    """Whole-layer time of ``expert_parallel_moe`` on a 2-D mesh against the 1-D mesh of the
    same 8 devices and total tokens, programs timed in interleaved rounds (median).

    Also: the old placement (tokens split over the expert axis only, each data replica
    repeating the work), and a 1-D mesh with 2E experts, which holds E/4 experts per device
    like the (2, 4) mesh: the cost of the layout itself, apart from the mesh handling.
    """
    n, e, k, d, f = (case[c] for c in ("N", "E", "k", "d", "f"))
    rng = np.random.default_rng(0)
    programs = {}
    for label, axes, batch_axes, mult in MESHES:
        mesh = mr.make_mesh(axes)
        ne = e * mult
        lay = mr.make_layout(mesh, batch_axes=batch_axes)
        put = lambda a, spec: jax.device_put(a, lay.sharding(spec))  # noqa: E731
        ids = np.argsort(rng.random((n, ne)), axis=1)[:, :k].astype(np.int32)
        tokens = [put(jnp.asarray(a), lay.tokens) for a in
                  (rng.standard_normal((n, d)).astype(np.float32), ids,
                   rng.uniform(0.1, 1, (n, k)).astype(np.float32))]
        weights = [put(jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[1]), jnp.float32), spec)
                   for shape, spec in (((ne, d, f), lay.w_in), ((ne, d, f), lay.w_in),
                                       ((ne, f, d), lay.w_out))]
        fn = jax.jit(lambda *a, mesh=mesh, b=batch_axes: mr.expert_parallel_moe(
            *a, mesh=mesh, batch_axes=b, schedule=case["schedule"]))
        jax.block_until_ready(fn(*tokens, *weights))
        programs[label] = (fn, tokens + weights)
    times = {label: [] for label in programs}
    for _ in range(rounds):
        for label, (fn, a) in programs.items():
            times[label].append(median_seconds(fn, *a, repeats=repeats))
    base = float(np.median(times["ep=8"]))
    rows = {label: {"layer_s": float(np.median(t)), "rounds_s": t,
                    "vs_1d": float(np.median(t)) / base} for label, t in times.items()}
    for label, row in rows.items():
        print(f"  mesh {case['schedule']:7s} T/dev={n // 8:4d} {label:34s} "
              f"layer {row['layer_s'] * 1e3:8.2f} ms  x{row['vs_1d']:.2f}", flush=True)
    return dict(case, T=n // 8, meshes=rows)


# --- configurations ---------------------------------------------------------------------------

def configurations(mode: str):
    if mode == "smoke":
        main = [dict(name="smoke", P=4, T=16, E=8, k=2, d=32, f=16)]
        return main, [dict(P=4, T=4, E=8, k=2, d=16, f=8)], []
    quick = mode == "quick"
    main = [
        dict(name="prefill E64 k8", P=8, T=256 if quick else 512, E=64, k=8, d=1024, f=512),
        dict(name="prefill DeepSeek-like", P=8, T=256 if quick else 512, E=256, k=8, d=1024, f=256),
        dict(name="decode E64 k8", P=8, T=8, E=64, k=8, d=1024, f=512),
        dict(name="decode DeepSeek-like", P=8, T=8, E=256, k=8, d=1024, f=256),
    ]
    if not quick:
        main.insert(2, dict(name="decode E64 k8", P=8, T=64, E=64, k=8, d=1024, f=512))
        main.insert(2, dict(name="decode E64 k8", P=8, T=1, E=64, k=8, d=1024, f=512))
    tokens = (16, 64, 256, 1024) if quick else (16, 64, 256, 1024, 4096, 16384)
    scaling_t = [dict(P=8, T=t, E=64, k=8, d=128, f=64) for t in tokens]
    scaling_p = [dict(P=p, T=256, E=64, k=8, d=128, f=64) for p in (1, 2, 4, 8)]
    return main, scaling_t, scaling_p


def mesh_configurations(mode: str):
    if mode == "smoke":
        return [dict(schedule="prefill", N=64, E=16, k=2, d=32, f=16)]
    shape = dict(E=64, k=8, d=1024, f=512)
    cases = [dict(schedule="prefill", N=8 * (256 if mode == "quick" else 512), **shape),
             dict(schedule="decode", N=8 * 8, **shape)]
    if mode != "quick":
        cases.append(dict(schedule="decode", N=8 * 64, **shape))
    return cases


def run(mode: str, *, repeats: int | None = None, budget_gb: float = 14.0, out: str,
        scaling_only: bool = False, meshes_only: bool = False, with_plots: bool = True,
        command: str = "") -> dict:
    """Every table of ``mode`` (``"smoke"``, ``"quick"``, ``"full"``), written to ``out``
    (``bench.json``, ``bench.md``, plots)."""
    repeats = repeats or {"smoke": 2, "quick": 3, "full": 5}[mode]
    budget = budget_gb * 2**30
    main_cases, scaling_t, scaling_p = configurations(mode)
    if meshes_only:
        main_cases, scaling_t, scaling_p = [], [], []
    if scaling_only:
        main_cases = []
    report = {
        "mode": mode, "command": command, "machine": env.machine(),
        "jax": jax.__version__, "platform": jax.devices()[0].platform, "devices": len(jax.devices()),
        "relayfree_capacity_factor": RELAYFREE_FACTOR, "baseline_capacity_factor": CAPACITY_FACTOR,
        "main": [], "scaling_tokens": [], "scaling_ranks": [], "meshes": [],
    }
    for case in main_cases:
        names = [n for n in PHASED if n != "decode" or case["T"] <= 64]
        report["main"].append(run_case(case, repeats=repeats, analyse=True, budget_bytes=budget,
                                       names=names))
    # smoke: the sweep's code with the two schedules auto chooses between (every path ran in
    # the main table above)
    sweep_names = list(PHASED) if mode != "smoke" else ["prefill", "decode"]
    for key, cases in (("scaling_tokens", scaling_t), ("scaling_ranks", scaling_p)):
        for case in cases:
            # decode runs wherever its worst-case buffers fit the budget, so auto's choice is
            # checked against both schedules across the sweep
            report[key].append(run_case(dict(case, name=key), repeats=repeats, analyse=False,
                                        budget_bytes=budget, names=sweep_names,
                                        choice_seconds=0.0 if mode == "smoke" else CHOICE_SECONDS))
    if len(jax.devices()) >= 8 and not scaling_only:
        for case in mesh_configurations(mode):
            report["meshes"].append(mesh_case(case, repeats=repeats))
    paths = write(out, "bench", report, markdown(report))
    if with_plots and not meshes_only:
        paths += plots(report, out)
    print("wrote " + ", ".join(paths))
    return report
