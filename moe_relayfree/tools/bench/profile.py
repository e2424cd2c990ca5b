"""Where a layer's time goes on emulated CPU devices, from XLA:CPU's own profile.

Each layer program (:mod:`.variants`: decode, prefill, auto, ragged_baseline,
capacity_baseline, decode_exchange, prefill_exchange) is compiled for one decode-sized case
(P=8 emulated devices, the decode benchmark's shapes and routing), timed in interleaved
rounds (median), then traced with ``jax.profiler`` for some calls (:func:`run`); a model's
decode step per dispatch path: ``moe_relayfree_models.tools.bench.profile_step``. The trace's events are reduced to *self*
time (an event's duration less that of the events nested in it on the same thread) and summed
per call, per op class and per thread kind:

* op classes: ``dot`` (the expert GEMM's dot kernels), ``weight_slice`` (an expert's matrix
  copied out of the stacked weights: found in the compiled program, whatever XLA named it),
  ``collective`` (collectives and their rendezvous), ``intra_op_wait`` (a kernel waiting for
  the parts of it that XLA split off to the intra-op pool), ``program_wait`` (a client thread
  waiting for the rest of its program, which moved onto the pool), ``other``;
* thread kinds: ``client`` (the PjRt client threads that start each device's program) and
  ``pool`` (XLA:CPU's intra-op pool).

Thread-milliseconds are summed over every emulated device's threads, which share the cores,
so they exceed the wall time; compare implementations with each other, in one run. The
command: ``scripts/profile_layer.py``.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile

from moe_relayfree.tools.bench.inputs import case_inputs
from moe_relayfree.tools.bench.timing import interleaved
from moe_relayfree.tools.bench.variants import layer_program

CLASSES = ("dot", "weight_slice", "collective", "intra_op_wait", "program_wait", "other")
_COLLECTIVES = ("all_gather", "all-gather", "all_to_all", "all-to-all", "ragged", "reduce_scatter",
                "reduce-scatter", "all-reduce", "all_reduce", "collective", "Rendezvous",
                "InvokeRendezvous", "Wait: pending_threads")


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?\bfusion\(.*\bcalls=%?([\w.\-]+)")
_COMPUTATION = re.compile(r"^%?([\w.\-]+) \(.*\) -> .* \{$")
# one whole matrix of a rank-3 stack: dynamic_slice_sizes={1,d,f}
_MATRIX_SLICE = re.compile(r"dynamic-slice\(.*dynamic_slice_sizes=\{1,\d+,\d+\}")


def weight_slice_ops(hlo: str) -> set[str]:
    """Names of the instructions of a compiled program (``compiled.as_text()``) that copy one
    expert's matrix out of a ``[El, d, f]`` stack: a dynamic-slice of sizes ``{1, d, f}``, on
    its own or inside a fusion. XLA names such a fusion after what else it fuses (a bf16 slice
    becomes ``convert_bitcast_fusion``: sliced through an f32 conversion), so its trace events
    cannot be told from other fusions by name."""
    sliced, ops, current = set(), set(), None
    for line in hlo.splitlines():
        head = _COMPUTATION.match(line)
        if head:
            current = head.group(1)
        elif _MATRIX_SLICE.search(line):
            sliced.add(current)  # the computation, if a fusion calls it
            ops.add(line.split(" = ")[0].split()[-1].lstrip("%"))  # the slice, if unfused
    for line in hlo.splitlines():
        m = _INSTRUCTION.match(line)
        if m and m.group(2) in sliced:
            ops.add(m.group(1))
    return ops


def op_class(name: str, weight_slices: set | None = None) -> str:
    """The class of one trace event name (XLA:CPU thunk names and runtime scopes);
    ``weight_slices``: instruction names :func:`weight_slice_ops` found in the program (may be
    empty); ``None`` (no program text): ops named ``dynamic-slice*`` are taken for them."""
    if name in weight_slices if weight_slices is not None else name.startswith("dynamic-slice"):
        return "weight_slice"
    if name == "SlinkyThreadPool::Await":
        return "intra_op_wait"
    if name == "ThunkExecutor::Execute (wait for completion)":
        return "program_wait"
    if name.startswith(("ynn_fusion", "xnn_fusion", "dot")) or "_dot" in name:
        return "dot"
    if name.startswith(_COLLECTIVES):
        return "collective"
    return "other"


def self_times(events: list[dict]) -> list[tuple[dict, float]]:
    """Complete events (``ph == "X"``, ``ts``/``dur`` in us) of ONE thread -> (event, self us):
    its duration less the durations of the events directly nested in it."""
    out, stack = [], []  # stack of [event, end, children_us]
    for e in sorted(events, key=lambda e: (e["ts"], -e.get("dur", 0))):
        while stack and stack[-1][1] <= e["ts"]:
            done = stack.pop()
            out.append((done[0], done[0].get("dur", 0) - done[2]))
        if stack:
            stack[-1][2] += e.get("dur", 0)
        stack.append([e, e["ts"] + e.get("dur", 0), 0.0])
    out.extend((s[0], s[0].get("dur", 0) - s[2]) for s in reversed(stack))
    return out


def summarize(trace: dict | list, calls: int, weight_slices: set | None = None) -> dict:
    """A perfetto trace (``jax.profiler.trace(..., create_perfetto_trace=True)``) -> thread-ms
    per call by class and thread kind, and the ten ops with most self time (``weight_slices``:
    see :func:`op_class`)."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
    per_thread = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and "XLA" in names.get((e["pid"], e["tid"]), ""):
            per_thread[(e["pid"], e["tid"])].append(e)
    by_class = {c: {"client": 0.0, "pool": 0.0} for c in CLASSES}
    ops = collections.Counter()
    for key, evs in per_thread.items():
        kind = "client" if "Client" in names[key] else "pool"
        for e, us in self_times(evs):
            cls = op_class(e["name"], weight_slices)
            if e["name"].startswith("ThunkExecutor::Execute") and cls == "other":
                continue  # the executor's own bookkeeping around the thunks
            by_class[cls][kind] += us / 1e3 / calls
            ops[e["name"]] += us / 1e3 / calls
    return {"thread_ms_per_call": by_class,
            "top_ops": [[n, round(v, 3)] for n, v in ops.most_common(10)]}


def profile(fn, args, calls: int, hlo: str = "") -> dict:
    """Traces ``calls`` calls of ``fn(*args)`` (``args=None``: ``fn()``); ``hlo``: the
    compiled program's text, to find its weight slices by what they compute."""
    import jax

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(calls):
                jax.block_until_ready(fn() if args is None else fn(*args))
        (path,) = glob.glob(os.path.join(d, "**", "*perfetto_trace.json.gz"), recursive=True)
        with gzip.open(path) as fh:
            return summarize(json.load(fh), calls, weight_slice_ops(hlo) if hlo else None)


def run(case: dict, impls, *, rounds: int, calls: int) -> dict:
    import jax
    import numpy as np

    import moe_relayfree as mr

    mesh = mr.make_ep_mesh(8)
    args = case_inputs(mesh, case)
    # compiled once: the program that is timed and traced is the one whose text is read
    fns = {name: layer_program(mesh, name).lower(*args).compile() for name in impls}
    for fn in fns.values():
        jax.block_until_ready(fn(*args))
    times = interleaved(fns, args, min_rounds=rounds, max_rounds=rounds)
    out = {}
    for name, fn in fns.items():
        out[name] = dict(ms=float(np.median(times[name]) * 1e3),
                         **profile(fn, args, calls, fn.as_text()))
    return out


def markdown(report: dict) -> str:
    c = report["case"]
    title = (f"# Decode-step profile: {c['checkpoint']}, batch {c['batch']}" if "batch" in c else
             f"# Layer profile: E={c['E']}, T={c['T']}/rank, k={c['k']}, d={c['d']}, f={c['f']}")
    lines = [title + ", P=8 emulated CPU devices", "",
             f"Command: `{report['command']}`. Thread-ms per call, summed over the devices' "
             "threads (client / pool).", "",
             f"| impl | {'step' if 'batch' in c else 'layer'} ms | " + " | ".join(CLASSES) + " |",
             "|---" * (2 + len(CLASSES)) + "|"]
    for name, r in report["impls"].items():
        cells = [f"{r['thread_ms_per_call'][k]['client']:.1f} / {r['thread_ms_per_call'][k]['pool']:.1f}"
                 for k in CLASSES]
        lines.append(f"| {name} | {r['ms']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
