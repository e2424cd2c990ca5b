"""The benchmark script runs end to end and its structural claims hold on tiny shapes."""

import json
import os
import subprocess
import sys

from helpers import script_env

from moe_relayfree.paths import PATHS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_smoke(tmp_path):
    env = script_env(8)
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench.py"), "--smoke",
                    "--out", str(tmp_path)], check=True, env=env, cwd=ROOT, timeout=600)
    report = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "bench.md").read_text().startswith("# Benchmark (smoke)")
    assert (tmp_path / "scaling_tokens.png").stat().st_size > 1000
    impls = report["main"][0]["impls"]
    # every path of the table that compiles for this CPU (the Pallas TPU path: its own tests)
    assert set(impls) == {name for name, p in PATHS.items() if p.native("cpu")}
    for name in ("decode", "ragged_baseline"):  # exact paths agree with relay-free
        assert impls[name]["max_abs_diff_vs_first"] < 1e-4
    assert impls["capacity_baseline"]["dropped_copies"] > 0  # tiny shapes overflow at 1.25
    native = {n: {p: impls[n]["full_size"][p]["native"] for p in ("dispatch", "combine")}
              for n in impls}
    # relay-free: gather + ragged all-to-all out, ragged all-to-all back (the weighted sum over
    # k gathers [T, d] per choice, no [T, k, d]); the baseline adds the receiver re-sort on
    # dispatch and the receiver un-sort + source un-permute on combine.
    assert native["prefill"]["dispatch"]["count"] == 2
    assert native["prefill"]["combine"]["count"] == 1
    assert native["ragged_baseline"]["dispatch"]["count"] == 3
    assert native["ragged_baseline"]["combine"]["count"] == 3
    for row in impls.values():
        assert row["dispatch_s"] > 0 and row["combine_s"] > 0 and row["layer_s"] > 0
    meshes = report["meshes"][0]["meshes"]
    assert set(meshes) == {"ep=8", "data=2,ep=4", "data=2,ep=4, tokens over ep only",
                           "ep=8 with 2E experts"}
    assert meshes["ep=8"]["vs_1d"] == 1.0 and all(r["layer_s"] > 0 for r in meshes.values())
    assert "## Meshes with several axes" in (tmp_path / "bench.md").read_text()
    # auto's choice over the token sweep: both schedules timed in paired rounds
    auto = report["scaling_tokens"][0]["auto"]
    assert auto["schedule"] == "decode" and auto["rounds"] == 5  # 2 * repeats + 1
    assert auto["decode_s"] > 0 and auto["prefill_s"] > 0 and auto["vs_faster"] >= 1.0
    assert "| decode / prefill |" in (tmp_path / "bench.md").read_text()


def test_bench_decode_bytes_stay_flat_in_ranks(tmp_path):
    """Lowered for cuda at P = 4, 8, 16 (k=4): the decode schedule moves the copies once each
    way at P > k, whatever P; the gather transport forced at every P grows with P."""
    env = script_env()
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_decode.py"), "--smoke",
                    "--part", "bytes", "--out", str(tmp_path)], check=True, env=env, cwd=ROOT,
                   timeout=600)
    rows = {(r["impl"], r["P"]): r for r in json.loads((tmp_path / "decode.json").read_text())["bytes"]}
    for p in (8, 16):
        assert rows[("decode", p)]["vs_exact"] < 1.05, rows[("decode", p)]
        assert "all_gather" not in rows[("decode", p)]["collectives"]
    assert rows[("decode", 4)]["collectives"] == ["all_gather", "reduce_scatter"]  # P <= k
    gathered = [rows[("decode_gather", p)]["vs_exact"] for p in (4, 8, 16)]
    assert gathered[2] > 1.9 * gathered[1] > 3.5 * gathered[0]
    assert "| decode |" in (tmp_path / "decode.md").read_text()


def test_bench_generation_smoke(tmp_path):
    """scripts/bench_generation.py: the A/Bs run (the step one in fresh processes) and report
    their times and whether the variants' tokens agree; FP8 experts kept on the devices give
    the tokens of the same checkpoint dequantized at load, in half the expert bytes."""
    env = script_env(8)
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_generation.py"),
                    "--batches", "8", "--prompt-lengths", "8", "--rounds", "1", "--new-tokens", "3",
                    "--fp8-batches", "8", "--fp8-prompt", "8",
                    "--out", str(tmp_path)], check=True, capture_output=True, text=True, env=env,
                   cwd=ROOT, timeout=600)
    report = json.loads((tmp_path / "generation.json").read_text())
    cases = [r["case"].split(":")[0] for r in report["rows"]]
    assert cases == ["prefill", "fp8 experts", "fp8 experts", "decode step"]
    for r in report["rows"][1:3]:
        assert r["same_tokens"] is True
        assert 0 < r["variant_expert_mib"] < 0.51 * r["baseline_expert_mib"]
    for r in report["rows"]:
        assert r["variant_ms"] > 0 and r["baseline_ms"] > 0 and isinstance(r["same_tokens"], bool)
    assert report["rows"][-1]["tokens_per_device"] == 1 and report["rows"][0]["prompt"] == 8
    assert (tmp_path / "generation.md").exists()
