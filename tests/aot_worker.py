"""Run by tests/test_aot.py in .venv-tpu (libtpu): deviceless XLA:TPU compiles of one MoE layer
on v5p:4x4x4 (64 chips, P > k), small widths. Prints one JSON object of reports."""

import json
import sys

import moe_relayfree as mr
from moe_relayfree.tools import aot

SHAPES = aot.LayerShapes(num_experts=256, k=8, d_model=256, d_ff=128)  # El = 4 per chip
# where the two relay-free programs' memory is compared: at the widths above a few KB of rows
# are outweighed by small tables, each in its own 16 KiB-aligned slot of the temporaries
DSV3 = aot.LAYER_SHAPES["deepseek-v3"]


def main() -> None:
    mesh = aot.tpu_mesh("v5p:4x4x4")
    reports = {}
    for name, impl, schedule, tokens, block, shapes in [
            ("decode", "relayfree", "auto", 8, None, SHAPES),
            ("bounded", "ragged_baseline_bounded", "auto", 8, None, SHAPES),
            ("prefill", "relayfree", "prefill", 8, None, SHAPES),
            ("prefill_dsv3", "relayfree", "prefill", 8, None, DSV3),
            ("decode_fp8", "relayfree", "auto", 8, aot.FP8_BLOCK, SHAPES),
            ("pallas", "relayfree_pallas", "prefill", 8, None, DSV3),
            ("pallas_decode", "relayfree_pallas", "decode", 8, None, SHAPES),
            ("pallas_copies", "relayfree_pallas", "auto", 40960, None, SHAPES)]:
        config = mr.DispatchConfig(mesh, schedule=schedule, implementation=impl)
        report = aot.layer_report(config, shapes, tokens, block)
        report["hlo_ops"] = sorted({c["op"] for c in report["collectives"]})
        reports[name] = report
    # the remote writes on a 2-D mesh: 4 data replicas, each an expert-parallel group of 16
    config = mr.DispatchConfig(aot.tpu_mesh("v5p:4x4x4", {"data": 4, "ep": 16}),
                               implementation="relayfree_pallas", schedule="prefill")
    reports["pallas_mesh2d"] = aot.layer_report(config, SHAPES, 8)
    json.dump(reports, sys.stdout)


if __name__ == "__main__":
    main()
