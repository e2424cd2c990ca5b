"""Schedule selection and calibration."""

import pytest

import moe_relayfree as mr
from moe_relayfree import selection
from helpers import make_mesh
from moe_relayfree.tools.calibration import calibrate_decode_threshold, crossover


def test_crossover_picks_the_fastest_step():
    tokens = [1, 2, 4, 8, 16]
    assert crossover(tokens, [1, 1, 1, 3, 9], [2, 2, 2, 2, 2]) == 4
    assert crossover(tokens, [5, 5, 5, 5, 5], [1, 1, 1, 1, 1]) == 0
    assert crossover(tokens, [1, 1, 1, 1, 1], [5, 5, 5, 5, 5]) == 16
    # one noisy point at the start does not throw the threshold to 0
    assert crossover(tokens, [2.2, 1, 1, 3, 9], [2, 2, 2, 2, 2]) == 4


def test_thresholds_per_platform_and_overrides():
    cpu = mr.DEFAULT_DECODE_THRESHOLDS["cpu"]
    assert mr.decode_threshold() == cpu  # the tests run on CPU
    assert mr.select_schedule(cpu, platform="cpu") == "decode"
    assert mr.select_schedule(cpu + 1, platform="cpu") == "prefill"
    gpu = mr.DEFAULT_DECODE_THRESHOLDS["cuda"]
    assert mr.DEFAULT_DECODE_THRESHOLDS["gpu"] == gpu  # Device.platform's name for it
    assert mr.select_schedule(gpu, platform="gpu") == "decode"
    assert mr.select_schedule(gpu + 1, platform="gpu") == "prefill"
    assert mr.decode_threshold("ascend") == selection.FALLBACK_DECODE_THRESHOLD
    assert mr.select_schedule(10**6, threshold=10**6) == "decode"
    try:
        mr.set_decode_threshold(3, platform="cpu")
        assert mr.decode_threshold("cpu") == 3 and mr.decode_threshold("gpu") == gpu
        mr.set_decode_threshold(7)  # every platform; a platform's own override still wins
        assert mr.decode_threshold("gpu") == 7 and mr.decode_threshold("cpu") == 3
        mr.set_decode_threshold(None, platform="cpu")
        assert mr.decode_threshold("cpu") == 7
    finally:
        mr.set_decode_threshold(None)
    assert mr.decode_threshold("cpu") == cpu and mr.decode_threshold("gpu") == gpu


def test_select_schedule_rejects_unknown():
    with pytest.raises(ValueError, match="schedule must be"):
        mr.select_schedule(4, "fastest")
    with pytest.raises(ValueError):
        mr.set_decode_threshold(-1)


def test_calibration_measures_both_and_applies():
    mesh = make_mesh(2)
    try:
        r = calibrate_decode_threshold(
            mesh, d_model=8, d_ff=16, num_experts=4, k=2, tokens_per_rank=(1, 4), repeats=1,
            apply=True,
        )
        assert r["tokens_per_rank"] == [1, 4]
        assert all(t > 0 for t in r["decode_s"] + r["prefill_s"])
        assert r["threshold"] == crossover(r["tokens_per_rank"], r["decode_s"], r["prefill_s"])
        assert mr.decode_threshold() == r["threshold"]
    finally:
        mr.set_decode_threshold(None)
    assert mr.decode_threshold() == mr.DEFAULT_DECODE_THRESHOLDS["cpu"]
