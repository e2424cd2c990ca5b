"""Deviceless XLA:TPU compiles (no TPU needed; libtpu in .venv-tpu, scripts/setup_tpu.sh): the
decode schedule at 64 chips, where P > k, as XLA:TPU really compiles it."""

import functools
import json
import os
import subprocess

import pytest

from moe_relayfree import decode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_PYTHON = os.path.join(ROOT, ".venv-tpu", "bin", "python")
WORKER = os.path.join(ROOT, "tests", "aot_worker.py")
T, K, E, P = 8, 8, 256, 64


@functools.lru_cache(maxsize=None)
def reports() -> dict:
    if not os.path.exists(TPU_PYTHON):
        pytest.fail("no .venv-tpu: run bash scripts/setup_tpu.sh (scripts/test.sh does)")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    done = subprocess.run([TPU_PYTHON, WORKER], capture_output=True, text=True, env=env,
                          timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_decode_keeps_native_ragged_collectives_and_bounded_windows():
    """P=64 > k=8: auto picks the decode schedule, which XLA:TPU compiles to native
    ragged-all-to-alls (no emulation) and a ragged_dot; its receive buffer is the usual
    2*T*k rows, not the worst case P*T*min(k, El) (32x more at these sizes), and nothing
    gathers the [P*T, d] tokens; the skew rounds add no second copy of the round."""
    r = reports()["decode"]
    assert r["resolved_schedule"] == "decode"
    assert "ragged_all_to_all" in r["hlo_ops"] and r["ragged_dot"]
    ragged = [c for c in r["collectives"] if c["op"] == "ragged_all_to_all"]
    # every round, the first included, is one loop body: one dispatch and one combine in the
    # program (round 0 inline beside a conditional held both bodies' buffers)
    assert len(ragged) == 2, ragged
    receive = max(c["output_shape"][0] for c in ragged)
    assert receive == decode.typical_rows(T, K) == 2 * T * K
    assert decode.worst_rows(P, T, K, E // P) == 16 * receive
    # how often uniform routing would need a second round of these rows (P*T = 512 tokens)
    assert r["recv_rows"] == receive and r["overflow"]["any_rank_high"] < 1e-3, r["overflow"]
    d = r["shapes"]["d_model"]
    assert not [c for c in r["collectives"]
                if c["op"] == "all_gather" and c["buffer_bytes"] >= P * T * d]


def test_decode_needs_no_more_memory_than_a_bounded_buffer_that_drops():
    """Exact memory of the compiled programs: the dropless decode schedule's temporaries are no
    more than MaxText-style EP with a 2*T*k-row receive buffer, which drops on skew."""
    r = reports()
    assert r["decode"]["memory"]["temp"] <= r["bounded"]["memory"]["temp"], (
        r["decode"]["memory"], r["bounded"]["memory"])
    assert r["prefill"]["memory"]["temp"] <= r["bounded"]["memory"]["temp"]


def test_fp8_experts_halve_the_weights_and_never_write_them_dequantized():
    """FP8 experts with 128 x 128 block scales: the layer's arguments lose half the weights'
    bytes, and the decode step's temporaries grow by less than the rank's expert stacks in bf16
    (what dequantizing them before the GEMM would add): the tiles' block-scaled dots read the
    FP8 values themselves, with no ragged_dot over dequantized stacks."""
    r = reports()
    shapes = r["decode"]["shapes"]
    local_stacks = E // P * 3 * shapes["d_model"] * shapes["d_ff"] * 2  # bf16 bytes
    bf16, fp8 = r["decode"]["memory"], r["decode_fp8"]["memory"]
    # half the weights' bytes, less the scales (a few KB once TPU tiles pad them)
    saved = bf16["argument"] - fp8["argument"]
    assert local_stacks // 2 - 4096 < saved < local_stacks // 2, saved
    assert fp8["temp"] - bf16["temp"] < local_stacks, (bf16, fp8)
    assert not r["decode_fp8"]["ragged_dot"]
    assert r["decode_fp8"]["resolved_schedule"] == "decode"


def test_remote_writes_compile_for_tpu_with_no_send_buffer():
    """The Pallas remote-write path compiles for 64 chips (Mosaic kernels in the program), with
    no ragged all-to-all, no gather of the tokens into a [T*k, d] send buffer and no XLA
    grouped GEMM (the experts run in the Pallas kernel on the DMAs' row layout; the XLA
    relay-free prefill program has all three), and temporaries no larger than that program's,
    in both of XLA's accounts (temp_size_in_bytes, and the bytes live at its peak), at
    DeepSeek-V3's widths and T=8 (where the combine's one pass of T*k returned rows held 4.98
    MiB against the XLA program's 4.83; in passes of 16 rows, 4.04)."""
    r = reports()
    pallas, xla = r["pallas"], r["prefill_dsv3"]
    assert "tpu_custom_call" in pallas["custom_calls"], pallas["custom_calls"]
    assert xla["ragged_dot"] and not pallas["ragged_dot"]
    assert pallas["memory"]["peak_temp"] <= xla["memory"]["peak_temp"], (pallas["memory"],
                                                                        xla["memory"])
    assert "ragged_all_to_all" not in {c["op"] for c in pallas["collectives"]}
    assert "ragged_all_to_all" in {c["op"] for c in xla["collectives"]}
    assert pallas["send_gathers"] == 0 < xla["send_gathers"]
    assert pallas["memory"]["temp"] <= xla["memory"]["temp"], (pallas["memory"], xla["memory"])
    # the returned rows are relaid in bf16 and widened inside the weighted sum, never widened
    # in the DMA row layout first (two f32 buffers per choice: 5.3 MiB more at the peak,
    # DeepSeek-V3's T=128)
    assert pallas["f32_row_layout"] == r["pallas_decode"]["f32_row_layout"] == 0, (
        pallas["f32_row_layout"], r["pallas_decode"]["f32_row_layout"])


def test_remote_decode_needs_no_collective():
    """The Pallas decode form, counts after the data: Mosaic compiles it for 64 chips and the
    program has no XLA collective at all, where the Pallas prefill form all-gathers the
    counts (an all-reduce in XLA:TPU's program) before any row moves, and the XLA decode
    schedule exchanges them with all-to-alls."""
    r = reports()
    decode, prefill = r["pallas_decode"], r["pallas"]
    assert decode["resolved_schedule"] == "decode" and prefill["resolved_schedule"] == "prefill"
    assert "tpu_custom_call" in decode["custom_calls"], decode["custom_calls"]
    assert decode["collectives"] == [] and prefill["collectives"], prefill["collectives"]
    assert "all_to_all" in r["decode"]["hlo_ops"], r["decode"]["hlo_ops"]


def test_remote_writes_compile_on_a_2d_mesh():
    """data=4 x ep=16 on 64 chips: each data replica's 16 chips are one expert-parallel group
    (the kernels address a peer by its coordinates on both axes); Mosaic compiles it."""
    r = reports()["pallas_mesh2d"]
    assert r.get("oom") is None and "tpu_custom_call" in r["custom_calls"]
    assert r["mesh"] == {"data": 4, "ep": 16}


def test_remote_writes_take_327680_copies_per_chip():
    """T*k = 327,680 copies per chip (T=40960, k=8): the per-copy table (one int32 each, 1.25
    MiB) stays in HBM and is streamed through SMEM in chunks. Scalar-prefetched whole into the
    1 MiB of SMEM, it bounded a chip to about 262,144 copies (two tables ran out at 131,072)."""
    r = reports()["pallas_copies"]
    assert r.get("oom") is None and r["memory"]["temp"] > 0, r.get("oom")
