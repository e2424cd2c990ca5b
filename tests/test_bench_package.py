"""moe_relayfree.tools.bench: the shared parts every benchmark command uses."""

import numpy as np
import pytest

from moe_relayfree.tools.bench import env, report, timing, variants
from moe_relayfree.tools.bench.inputs import layer_inputs


def test_rounds_rotate_so_no_program_always_goes_first():
    assert list(timing.rotations("abc", 4)) == [list("abc"), list("bca"), list("cab"), list("abc")]
    calls = []
    fns = {n: (lambda n=n: calls.append(n) or np.zeros(())) for n in "ab"}
    times = timing.interleaved(fns, min_rounds=3, warm_each=False)
    assert calls == list("abbaab") and all(len(t) == 3 for t in times.values())
    calls.clear()
    timing.interleaved(fns, min_rounds=2)  # warm: an untimed call right before each timed one
    assert calls == list("aabbbbaa")
    calls.clear()
    # a time budget adds rounds, max_rounds caps them
    times = timing.interleaved(fns, min_rounds=1, seconds=10.0, max_rounds=5, warm_each=False)
    assert all(len(t) == 5 for t in times.values())


def test_self_timed_calls_keep_their_seconds_and_last_output():
    count = {"x": 0, "y": 0}

    def call(n):
        count[n] += 1
        return count[n], 0.5 * count[n]

    times, outs = timing.interleaved_calls({n: (lambda n=n: call(n)) for n in "xy"}, 3)
    assert outs == {"x": 3, "y": 3} and times["x"].tolist() == [0.5, 1.0, 1.5]


def test_median_interval_brackets_the_median():
    ratios = np.random.default_rng(1).normal(1.0, 0.05, 200)
    lo, hi = timing.median_ci(ratios)
    assert lo < np.median(ratios) < hi and hi - lo < 0.05
    s = timing.ratio_summary(ratios)
    assert s["quartiles"][0] < s["median"] < s["quartiles"][1]


def test_command_line_and_device_flag(monkeypatch, devices):  # devices: backends started
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_cpu_foo=1")
    assert env.command("bench.py", ["--quick"]) == 'XLA_FLAGS="--xla_cpu_foo=1" python scripts/bench.py --quick'
    env.emulate_cpu_devices(4)  # the caller's count stands
    assert "count=8" in __import__("os").environ["XLA_FLAGS"]
    monkeypatch.setenv("XLA_FLAGS", "")
    with pytest.raises(RuntimeError, match="backends already started"):
        env.emulate_cpu_devices(4)  # this process's devices exist: the flag would be ignored


def test_inputs_variants_and_report(tmp_path, devices):
    """Every named layer program computes the dense reference's output on the inputs."""
    from moe_relayfree import dense_moe_reference, make_ep_mesh

    mesh = make_ep_mesh(4)
    args = layer_inputs(mesh, 2, 8, 2, 16, 8)
    x, ids = np.asarray(args[0]), np.asarray(args[1])
    assert x.shape == (8, 16) and ids.shape == (8, 2)
    assert all(len(set(row)) == 2 for row in ids.tolist())  # distinct experts per token
    want = np.asarray(dense_moe_reference(*args))
    for name in variants.LAYERS + ("decode_gather",):
        got = np.asarray(variants.layer_program(mesh, name)(*args))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
    with pytest.raises(ValueError, match="unknown layer program 'nope'"):
        variants.layer_program(mesh, "nope")
    paths = report.write(str(tmp_path), "r", {"a": np.float32(1.5)}, "\n".join(report.table(["x"], [[1]])))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["r.json", "r.md"]
    assert (tmp_path / "r.md").read_text() == "| x |\n|---|\n| 1 |\n"
