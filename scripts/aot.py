"""Deviceless XLA:TPU compiles of the MoE layer or a whole model step: per-device memory and
collectives of the real compiled program, without a TPU (needs ``pip install -e ".[tpu]"``).

    python scripts/aot.py layer --topology v5p:4x4x4 --shapes deepseek-v3 --tokens 1 8 128
    python scripts/aot.py layer --implementation relayfree ragged_baseline_bounded --schedule auto
    python scripts/aot.py model --config models/configs/deepseek-v3 --batch 8 --context 4096
    python scripts/aot.py serving --config models/configs/deepseek-v3 --context 4096 32768 \
        --implementation relayfree ragged_baseline_bounded --layers 4   # largest batch that fits
    python scripts/aot.py layer --experts bf16 fp8     # FP8 expert weights (128x128 block scales)
    python scripts/aot.py ... --out results/aot/NAME     # NAME.json and NAME.md

Layer rows: temp / argument MiB per device, the schedule "auto" chose, the largest ragged
all-to-all receive buffer, MiB a device moves per call (uniform routing; a skewed batch's extra
rounds not counted), compile seconds. A program XLA:TPU refuses for the chip's HBM shows the
temporaries the compiler said it needs, and "OOM (compile)".
"""

from __future__ import annotations

import argparse
import json
import os
import sys


LAYER_COLUMNS = [("topology", "topology"), ("T", "tokens_per_device"),
                 ("implementation", "implementation"), ("schedule", "schedule"),
                 ("experts", "experts"), ("ran", "resolved_schedule"), ("temp MiB", "temp_mib"),
                 ("peak temp MiB", "peak_temp_mib"), ("args MiB", "args_mib"),
                 ("recv rows", "recv_rows"), ("P(over)", "overflow_text"),
                 ("moved MiB", "moved_mib"), ("collectives", "ops"), ("compile s", "compile_s")]
MODEL_COLUMNS = [("topology", "topology"), ("layers", "layers"), ("compiled", "compiled_layers"),
                 ("batch/dev", "batch_per_device"),
                 ("context", "context"), ("implementation", "implementation"),
                 ("experts", "experts"), ("params GiB", "params_gib"), ("KV GiB", "kv_gib"), ("temp GiB", "temp_gib"),
                 ("total GiB", "total_gib"), ("compile s", "compile_s")]

SERVING_COLUMNS = [("topology", "topology"), ("layers", "layers"), ("context", "context"),
                   ("implementation", "implementation"), ("experts", "experts"),
                   ("schedule", "resolved_schedule"), ("max batch/dev", "max_batch"), ("params GiB", "params_gib"),
                   ("KV GiB", "kv_gib"), ("temp GiB", "temp_gib"), ("total GiB", "total_gib"),
                   ("HBM GiB", "hbm_gib")]


def overflow_text(overflow: dict | None) -> str | None:
    """The chance some rank overflows, as its two bounds ("0.29-0.34"), or one where they
    agree to two digits."""
    if overflow is None:
        return None
    low, high = (f"{overflow[key]:.2g}" for key in ("any_rank_low", "any_rank_high"))
    return high if low == high else f"{low}-{high}"


def summarize(report: dict) -> dict:
    """Adds the table's derived columns to a report."""
    from moe_relayfree.tools.aot import receive_rows  # main imports it after parsing

    mem, coll = report["memory"], report["collectives"]
    if report.get("oom"):  # the compiler refused it: what it said the temporaries need
        gib = 2**30
        return dict(report, temp_mib=(mem["temp"] or 0) / 2**20, ops="OOM (compile)",
                    temp_gib=(mem["temp"] or 0) / gib, total_gib=None,
                    params_gib=mem.get("params", 0) / gib, kv_gib=mem.get("kv_cache", 0) / gib)
    peak_temp = mem.get("peak_temp")
    out = dict(report, temp_mib=mem["temp"] / 2**20, args_mib=mem.get("argument", 0) / 2**20,
               peak_temp_mib=None if peak_temp is None else peak_temp / 2**20,
               moved_mib=sum(c["moved_bytes"] for c in coll) / 2**20,
               recv_rows=receive_rows(coll),
               overflow_text=overflow_text(report.get("overflow")),
               ops=" ".join(sorted({c["op"] for c in coll})))
    gib = 2**30
    for key in ("params", "kv_cache", "temp", "total"):
        if key in mem:
            out[("kv" if key == "kv_cache" else key) + "_gib"] = mem[key] / gib
    return out


def pivot(rows: list[dict], key: str = "temp_mib") -> str:
    """Layer rows as one table: ``key`` (temp MiB) per (topology, T), a column per
    implementation and relay-free schedule, and relay-free auto over the bounded baseline."""
    def name(r):
        # the schedule where one was asked for (always for relay-free: its "auto" column)
        shown = r["implementation"] == "relayfree" or r.get("schedule") not in (None, "auto")
        kind = r["implementation"] + (f" {r['schedule']}" if shown else "")
        return kind + (" fp8" if r.get("experts") == "fp8" else "")

    names = list(dict.fromkeys(name(r) for r in rows))
    cells: dict = {}
    for r in rows:
        cells.setdefault((r["topology"], r["tokens_per_device"]), {})[name(r)] = r
    lines = ["| topology | T | " + " | ".join(names) + " | auto / bounded |",
             "|---|---|" + "---|" * (len(names) + 1)]
    for (topo, t), by in cells.items():
        def cell(n):
            r = by.get(n)
            if r is None:
                return ""
            if r.get(key) is None:
                return ""
            text = f"{r[key]:.1f}"
            return text + " (OOM)" if r.get("oom") else text
        auto, bounded = by.get("relayfree auto"), by.get("ragged_baseline_bounded")
        ratio = (f"{auto[key] / bounded[key]:.3f}" if auto and bounded and auto.get(key)
                 and bounded.get(key) else "")
        lines.append(f"| {topo} | {t} | " + " | ".join(cell(n) for n in names) + f" | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["layer", "model", "serving"])
    p.add_argument("--topology", nargs="+", default=["v5p:4x4x4"],
                   help="e.g. v5p:2x2x2 v5p:8x8x4; TOPOLOGY@MESH for a mesh of its own, e.g. "
                   "v5p:8x8x4@data=2,ep=128 (128 experts cannot split over 256 ranks)")
    p.add_argument("--mesh", default=None, help="axes NAME=SIZE,... (default ep=<all chips>)")
    p.add_argument("--shapes", default="deepseek-v3", help="layer shapes: deepseek-v3, qwen3-235b-a22b")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 128, 2048],
                   help="layer: tokens per device")
    p.add_argument("--implementation", nargs="+", default=["relayfree"])
    p.add_argument("--schedule", nargs="+", default=["auto"])
    p.add_argument("--decode-overflow", default="branch")
    p.add_argument("--capacity-factor", type=float, default=None,
                   help="relay-free prefill's receive rows per round, the bounded baseline's buffer: "
                   "CAPACITY_FACTOR * T * k (default: DispatchConfig's)")
    p.add_argument("--experts", nargs="+", choices=["bf16", "fp8"], default=["bf16"],
                   help="routed expert weights: bf16, or FP8 with 128x128 block scales (as "
                   "load_model(..., fp8_experts=True) keeps an FP8 checkpoint's)")
    p.add_argument("--config", default=None, help="model: a folder with a config.json")
    p.add_argument("--batch", type=int, nargs="+", default=[8], help="model: sequences per device")
    p.add_argument("--context", type=int, nargs="+", default=[4096], help="model: KV-cache length")
    p.add_argument("--phase", default="decode", choices=["decode", "prefill"])
    p.add_argument("--layers", type=int, default=None,
                   help="model: compile this many layers (temp does not grow with depth); "
                   "params and KV cache are counted for all of them")
    p.add_argument("--mla-form", choices=["auto", "absorbed", "expanded"], default="auto",
                   help="model/serving, MLA models: force the attention form (default: per call)")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)

    import moe_relayfree as mr
    from moe_relayfree.tools import aot
    from moe_relayfree_models.tools import aot as model_aot

    # implementations with a prefill and a decode form (the table of paths)
    from moe_relayfree.paths import PATHS
    SCHEDULED = {p.implementation for p in PATHS.values() if p.schedule}
    rows = []
    columns = {"layer": LAYER_COLUMNS, "model": MODEL_COLUMNS, "serving": SERVING_COLUMNS}

    def save():  # after every row: a long run that fails later keeps what it measured
        if not args.out:
            return
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".json", "w") as fh:
            json.dump({"argv": sys.argv[1:] if argv is None else argv, "rows": rows}, fh, indent=1)

    for spec in args.topology:
        topology, _, own_mesh = spec.partition("@")
        axes = own_mesh or args.mesh
        mesh = aot.tpu_mesh(topology, mr.parse_mesh(axes) if axes else None)
        variants = [(impl, experts, schedule) for impl in args.implementation
                    for experts in args.experts
                    for schedule in (args.schedule if impl in SCHEDULED else ["auto"])]
        for impl, experts, schedule in variants:
            block = aot.FP8_BLOCK if experts == "fp8" else None
            factor = {} if args.capacity_factor is None else {"capacity_factor": args.capacity_factor}
            config = mr.DispatchConfig(mesh, schedule=schedule, implementation=impl,
                                       decode_overflow=args.decode_overflow, **factor)
            if args.what == "layer":
                for t in args.tokens:
                    report = aot.layer_report(config, aot.LAYER_SHAPES[args.shapes], t, block)
                    rows.append(summarize(report))
                    print(aot.markdown(rows[-1:], LAYER_COLUMNS).splitlines()[-1], flush=True)
                    save()
            elif args.what == "serving":
                hbm = aot.HBM_BYTES[topology.split(":")[0]]
                for ctx in args.context:
                    found = model_aot.largest_batch(args.config, config, ctx, hbm,
                                                    layers=args.layers, fp8_block=block,
                                                    mla_form=args.mla_form)
                    row = summarize(found["report"]) if found["report"] else {}
                    rows.append(dict(row, topology=topology, implementation=impl, context=ctx,
                                     experts=experts, max_batch=found["batch"],
                                     tried=found["tried"], hbm_gib=hbm / 2**30))
                    print(aot.markdown(rows[-1:], SERVING_COLUMNS).splitlines()[-1], flush=True)
                    save()
            else:
                for b in args.batch:
                    for ctx in args.context:
                        rows.append(summarize(model_aot.model_report(
                            args.config, config, b, ctx, args.phase, layers=args.layers,
                            fp8_block=block, mla_form=args.mla_form)))
                        print(aot.markdown(rows[-1:], MODEL_COLUMNS).splitlines()[-1], flush=True)
                        save()
    table = aot.markdown(rows, columns[args.what])
    print(table)
    if args.out:
        save()
        summary = (f"{pivot(rows)}\n\nTemporaries per device, MiB "
                   "(memory_analysis().temp_size_in_bytes).\n\n"
                   f"{pivot(rows, 'peak_temp_mib')}\n\nTemporaries live at the peak, MiB "
                   "(peak_memory_in_bytes - arguments - outputs + aliased).\n\n"
                   if args.what == "layer" else "")
        with open(args.out + ".md", "w") as fh:
            fh.write(f"`python scripts/aot.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n\n"
                     f"{summary}{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
