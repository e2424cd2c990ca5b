"""Markdown tables and plots of :mod:`.layer`'s report (a dict, also its JSON)."""

from __future__ import annotations

import os
import sys

from moe_relayfree.tools.bench.variants import PHASED as IMPL_ORDER


def fmt_ms(s):
    return f"{s * 1e3:.2f}"


def markdown(report) -> str:
    lines = [f"# Benchmark ({report['mode']})", "",
             f"Machine: {report['machine']}; JAX {report['jax']}; {report['devices']} "
             f"{report['platform']} devices. Command: `{report['command']}`.", "",
             "Times are medians in ms; `x` columns are ratios to relay-free (prefill schedule) "
             "measured in the same run; floor = one read+write pass over `T*k*d` per rank.", ""]
    lines += ["## Dispatch / combine / layer", "",
              "| case | P | T/rank | E | k | d | impl | dispatch | x | combine | x | layer | x "
              "| temp MiB/dev | dropped |",
              "|" + "---|" * 15]
    for case in report["main"]:
        for name in IMPL_ORDER:
            row = case["impls"].get(name)
            if row is None:
                continue
            head = f"| {case['name']} | {case['P']} | {case['T']} | {case['E']} | {case['k']} | {case['d']} | {name} "
            if "skipped" in row:
                lines.append(head + f"| skipped: {row['skipped']} |" + " |" * 9)
                continue
            lines.append(
                head + f"| {fmt_ms(row['dispatch_s'])} | {row.get('dispatch_vs_relayfree', 1):.2f} "
                f"| {fmt_ms(row['combine_s'])} | {row.get('combine_vs_relayfree', 1):.2f} "
                f"| {fmt_ms(row['layer_s'])} | {row.get('layer_vs_relayfree', 1):.2f} "
                f"| {row['temp_bytes_per_device'] / 2**20:.1f} | {row.get('dropped_copies', 0)} |")
    lines += ["", "## Full-size (>= T*k*d elements) buffers per rank", "",
              "native = data-movement ops in the `cuda`-lowered StableHLO; cpu = materialised "
              "buffers of the compiled CPU program.", "",
              "| case | impl | dispatch native | combine native | dispatch cpu | combine cpu |",
              "|---|---|---|---|---|---|"]
    for case in report["main"]:
        for name in IMPL_ORDER:
            row = case["impls"].get(name, {})
            fs = row.get("full_size")
            if not fs:
                continue
            cell = lambda s: f"{s['count']} ({s['bytes'] / 2**20:.0f} MiB)"  # noqa: E731
            lines.append(f"| {case['name']} T={case['T']} | {name} | {cell(fs['dispatch']['native'])} "
                         f"| {cell(fs['combine']['native'])} | {cell(fs['dispatch']['cpu'])} "
                         f"| {cell(fs['combine']['cpu'])} |")
    for title, key, col in (("Scaling with tokens per rank", "scaling_tokens", "T"),
                            ("Scaling with ranks", "scaling_ranks", "P")):
        first = report[key][0] if report[key] else {}
        fixed = ", ".join(f"{c}={first.get(c)}" for c in ("P", "T", "E", "k", "d") if c != col)
        lines += ["", f"## {title} ({fixed}; dispatch + combine, ms)", "",
                  f"| {col} | " + " | ".join(IMPL_ORDER) + " |", "|---" * (len(IMPL_ORDER) + 1) + "|"]
        for case in report[key]:
            cells = []
            for name in IMPL_ORDER:
                row = case["impls"].get(name)
                if row is None:
                    cells.append("-")
                elif "skipped" in row:
                    cells.append("skipped")
                else:
                    cells.append(fmt_ms(row["dispatch_s"] + row["combine_s"]))
            lines.append(f"| {case[col]} | " + " | ".join(cells) + " |")
    lines += ["", "## Schedule choice (`auto`) over the token sweep (layer ms)", "",
              "The two schedules' layer programs timed in alternating order (`rounds` rounds, "
              "each call warm); ms are medians, ratios medians of per-round ratios. `auto` runs "
              "the program of the schedule it picks; `auto / faster` is that schedule's time "
              "over the faster one's in the same round.", "",
              "| T | rounds | prefill | decode | decode / prefill | auto picks | auto / faster |",
              "|---|---|---|---|---|---|---|"]
    for case in report["scaling_tokens"]:
        auto = case.get("auto", {})
        if "vs_faster" in auto:
            cells = [str(auto["rounds"]), fmt_ms(auto["prefill_s"]), fmt_ms(auto["decode_s"]),
                     f"{auto['decode_vs_prefill']:.2f}"]
            ratio = f"{auto['vs_faster']:.2f}"
        else:  # a schedule was skipped by the memory guard
            cells = ["-"] + [case["impls"].get(n, {}).get("skipped", "-")
                             for n in ("prefill", "decode")] + ["-"]
            ratio = "-"
        lines.append(f"| {case['T']} | " + " | ".join(cells) + f" | {auto.get('schedule', '-')} "
                     f"(threshold {auto.get('threshold', '-')}) | {ratio} |")
    lines += mesh_markdown(report.get("meshes", []))
    return "\n".join(lines) + "\n"


def mesh_markdown(cases) -> list[str]:
    if not cases:
        return []
    lines = ["", "## Meshes with several axes (8 devices, same total tokens; layer ms)", "",
             "`x 1-D` = layer time over the 1-D `ep=8` mesh's, interleaved rounds, same run. "
             "`tokens over ep only`: each data replica repeats the work (the old placement). "
             "`ep=8 with 2E experts`: the 1-D mesh holding E/4 experts per device, like "
             "`data=2,ep=4`.", "",
             "| schedule | T/device | E | k | d | mesh | layer | x 1-D |", "|---" * 8 + "|"]
    for case in cases:
        for label, row in case["meshes"].items():
            lines.append(f"| {case['schedule']} | {case['T']} | {case['E']} | {case['k']} "
                         f"| {case['d']} | {label} | {fmt_ms(row['layer_s'])} | {row['vs_1d']:.2f} |")
    return lines


def plots(report, out_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots", file=sys.stderr)
        return []
    files = []
    for key, col, label in (("scaling_tokens", "T", "tokens per rank"), ("scaling_ranks", "P", "ranks (P)")):
        if not report[key]:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in IMPL_ORDER:
            pts = [(c[col], c["impls"][name]["dispatch_s"] + c["impls"][name]["combine_s"])
                   for c in report[key] if "dispatch_s" in c["impls"].get(name, {})]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("dispatch + combine (s, median)")
        ax.set_title(f"{key.replace('_', ' ')}: {report['devices']} {report['platform']} devices")
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
        path = os.path.join(out_dir, f"{key}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


