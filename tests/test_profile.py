"""moe_relayfree.tools.bench.profile and moe_relayfree_models.tools.bench.profile_step (scripts/profile_layer.py): self times from a trace's
nested events, summed by op class and thread kind; and real profiles of a tiny decode layer and of a model's decode step parse."""

import os

import pytest

from moe_relayfree.tools.bench import profile as profile_layer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _x(name, ts, dur, tid):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid}


def test_summary_counts_self_time_per_class_and_thread_kind():
    threads = {1: "tf_XLAPjRtCpuClient/7", 2: "tf_XLAEigen/3", 3: "python"}
    events = [{"ph": "M", "name": "thread_name", "pid": 1, "tid": t, "args": {"name": n}}
              for t, n in threads.items()]
    events += [
        _x("ThunkExecutor::Execute", 0, 100, 1),  # executor bookkeeping: not counted
        _x("while.1", 10, 80, 1),
        _x("ynn_fusion", 20, 30, 1),
        _x("SlinkyThreadPool::Await", 30, 15, 1),  # nested in the dot: not dot time
        _x("dynamic-slice_bitcast_fusion", 55, 5, 1),
        _x("all_gather.3", 60, 20, 1),
        _x("Rendezvous", 61, 18, 1),
        _x("ynn_fusion.1", 0, 10, 2),
        _x("ThunkExecutor::Execute (wait for completion)", 10, 40, 2),
        _x("$api.py:1 block_until_ready", 0, 500, 3),  # not an XLA thread
    ]
    s = profile_layer.summarize({"traceEvents": events}, calls=2)["thread_ms_per_call"]
    ms = lambda us: us / 1e3 / 2  # noqa: E731
    assert s["dot"] == pytest.approx({"client": ms(15), "pool": ms(10)})
    assert s["intra_op_wait"] == pytest.approx({"client": ms(15), "pool": 0.0})
    assert s["weight_slice"] == pytest.approx({"client": ms(5), "pool": 0.0})
    assert s["collective"] == pytest.approx({"client": ms(20), "pool": 0.0})
    assert s["program_wait"] == pytest.approx({"client": 0.0, "pool": ms(40)})
    assert s["other"] == pytest.approx({"client": ms(80 - 30 - 5 - 20), "pool": 0.0})


def test_op_classes_of_xla_cpu_thunk_names():
    expected = {"ynn_fusion.2": "dot", "dot.7": "dot", "reduce_scatter.7": "collective",
                "all-to-all.3": "collective", "sort.54": "other",
                "dynamic-slice_bitcast_fusion.1": "weight_slice"}
    assert {n: profile_layer.op_class(n) for n in expected} == expected


_HLO = """
%fused_computation.57 (param_0.82: bf16[8,256,256], param_2.35: s32[]) -> bf16[256,256] {
  %param_0.82 = bf16[8,256,256]{2,1,0} parameter(0)
  %convert.747 = f32[8,256,256]{2,1,0} convert(%param_0.82)
  %dynamic_slice.216 = f32[1,256,256]{2,1,0} dynamic-slice(%convert.747, %p, %c, %c), dynamic_slice_sizes={1,256,256}
  ROOT %bitcast.436 = bf16[256,256]{1,0} bitcast(%dynamic_slice.216)
}

%fused_computation.58 (param_0: f32[64,128], param_1: s32[]) -> f32[4,128] {
  ROOT %dynamic_slice.3 = f32[4,128]{1,0} dynamic-slice(%param_0, %param_1, %c), dynamic_slice_sizes={4,128}
}

%body (p: (s32[], bf16[8,256,256])) -> (s32[], bf16[8,256,256]) {
  %convert_bitcast_fusion = bf16[256,256]{1,0} fusion(%gte.1, %gte.2), kind=kLoop, calls=%fused_computation.57, backend_config={"outer_dimension_partitions":["2"]}
  %dynamic-slice_fusion.2 = f32[4,128]{1,0} fusion(%gte.3, %gte.1), kind=kLoop, calls=%fused_computation.58
  %dynamic-slice.9 = f32[1,32,16]{2,1,0} dynamic-slice(%gte.4, %gte.1, %c, %c), dynamic_slice_sizes={1,32,16}
}
"""


def test_weight_slices_are_found_by_what_they_compute():
    ops = profile_layer.weight_slice_ops(_HLO)
    # a matrix of a stack, fused (and named after its conversion) or not; a row tile is not one
    assert {"convert_bitcast_fusion", "dynamic-slice.9"} <= ops
    assert "dynamic-slice_fusion.2" not in ops
    assert profile_layer.op_class("convert_bitcast_fusion", ops) == "weight_slice"
    assert profile_layer.op_class("convert_bitcast_fusion") == "other"
    assert profile_layer.op_class("dynamic-slice_fusion.2", ops) == "other"
    # a program without weight slices has none, whatever its ops are named
    assert profile_layer.op_class("dynamic-slice_fusion.2", set()) == "other"


def test_profile_of_a_tiny_layer_finds_its_kernels():
    out = profile_layer.run(dict(E=16, f=16, T=4, k=2, d=32), ["decode"], rounds=1, calls=2)
    per = out["decode"]["thread_ms_per_call"]
    assert out["decode"]["ms"] > 0
    assert sum(per["dot"].values()) > 0, out["decode"]["top_ops"]
    assert sum(per["collective"].values()) > 0, out["decode"]["top_ops"]
    # two experts per rank: the CPU kernel copies each one's matrices out of the stacks
    assert sum(per["weight_slice"].values()) > 0, out["decode"]["top_ops"]


def test_profile_of_a_model_decode_step_finds_the_moe_collectives():
    from moe_relayfree_models.tools.bench.profile_step import run_step

    out = run_step(os.path.join(ROOT, "models", "default"), 8, ["relayfree"],
                                 rounds=1, calls=2)
    per = out["relayfree"]["thread_ms_per_call"]
    assert out["relayfree"]["ms"] > 0
    # the step's MoE layers gather and reduce-scatter over the 8 devices, and their experts dot
    assert sum(per["collective"].values()) > 0, out["relayfree"]["top_ops"]
    assert sum(per["dot"].values()) > 0, out["relayfree"]["top_ops"]
