"""The platform self-check: it passes on the emulated CPU devices, catches a wrong variant, and
reports what the compiled programs contain."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_relayfree as mr
from moe_relayfree.tools import selfcheck

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))

SHAPES = selfcheck.Shapes(tokens=3, local=2, k=2, d=16, f=24)


def _drops_last_token(mesh, num_experts):
    """A schedule that silently drops a token: the failure the check exists to catch."""
    decode = selfcheck.variant_fn(mesh, "decode", num_experts)
    return lambda *a: decode(*a).at[-1].set(0)


def _nan_output(mesh, num_experts):
    decode = selfcheck.variant_fn(mesh, "decode", num_experts)
    return lambda *a: decode(*a) * jnp.nan


def _does_not_compile(mesh, num_experts):
    def fn(x, *rest):
        raise NotImplementedError("no kernel for this platform")
    return fn


@pytest.fixture(scope="module")
def results():
    mesh = mr.make_ep_mesh(8)
    return selfcheck.run_checks(
        mesh, shapes=SHAPES, dtypes=(jnp.float32,),
        variants=("decode_windows", "prefill_rounds"),  # each variant: tests/test_decode.py etc.
        grad_variants=("decode",),
        extra={"drops_last_token": _drops_last_token, "nan_output": _nan_output,
               "does_not_compile": _does_not_compile})


def test_every_variant_and_routing_matches_the_reference(results):
    ok = [r for r in results if r.variant in ("decode", "decode_windows", "prefill_rounds")]
    assert {(r.variant, r.routing) for r in ok if r.check == "output"} == {
        (v, r) for v in ("decode_windows", "prefill_rounds") for r in selfcheck.ROUTINGS}
    assert {r.check for r in ok} == {"output", "grad x", "grad weights", "grad w_gate",
                                     "grad w_up", "grad w_down"}
    assert all(r.ok for r in ok), [r for r in ok if not r.ok]


def test_a_wrong_variant_fails_and_the_rest_still_run(results):
    by = {(r.variant, r.routing): r for r in results if r.check == "output"}
    for routing in selfcheck.ROUTINGS:
        dropped = by[("drops_last_token", routing)]
        assert not dropped.ok and dropped.error > 10 * dropped.tolerance
        assert by[("nan_output", routing)].error == float("inf")
        broken = by[("does_not_compile", routing)]
        assert not broken.ok and "NotImplementedError: no kernel" in broken.note


def test_one_device():
    """A single GPU: every routing pattern still picks distinct experts (k lowered to E/2),
    and the schedules run with trivial collectives."""
    assert selfcheck.fit_shapes(selfcheck.Shapes(), 1).k == 2
    assert selfcheck.fit_shapes(selfcheck.Shapes(), 8).k == 4
    results = selfcheck.run_checks(mr.make_ep_mesh(1), shapes=selfcheck.Shapes(d=16, f=24),
                                   variants=("decode", "prefill"), dtypes=(jnp.float32,),
                                   grad_variants=())
    assert len(results) == 2 * len(selfcheck.ROUTINGS) and all(r.ok for r in results), results


def test_routing_patterns():
    n, k, e, p = 12, 3, 16, 4
    for kind in selfcheck.ROUTINGS:
        ids = selfcheck.routing_ids(kind, n, k, e, p)
        assert ids.shape == (n, k) and ids.dtype == np.int32
        distinct = [len(set(row)) == k for row in ids.tolist()]
        assert all(distinct) if kind != "repeated" else not any(distinct)
    assert (selfcheck.routing_ids("one_expert", n, k, e, p)[:, 0] == 0).all()
    assert (selfcheck.routing_ids("one_rank", n, k, e, p) // (e // p) == p - 1).all()
    assert (selfcheck.routing_ids("empty_experts", n, k, e, p) % 2 == 0).all()
    repeated = selfcheck.routing_ids("repeated", n, 4, e, p)
    assert (repeated[::2] == 0).all()  # every choice on one expert
    odd = repeated[1::2]
    assert (odd[:, 0] == odd[:, 1]).all() and (odd[:, 0] // (e // p) != odd[:, 2] // (e // p)).all()
    with pytest.raises(ValueError, match="one_rank needs k <= experts per rank"):
        selfcheck.routing_ids("one_rank", n, 5, e, p)


def test_compiled_ops_reads_an_hlo_module():
    text = """
%fused (p0: bf16[4,8], p1: bf16[3,8,16]) -> f32[3,4,16] {
  ROOT %d = f32[3,4,16]{2,1,0} dot(%b, %p1), lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={1}
}
ENTRY %main (a: f32[8,16]) -> (f32[8,16], s32[]) {
  %ag = f32[64,16]{1,0} all-gather(%a), channel_id=1, dimensions={0}
  %r = (f32[8,16]{1,0}, s32[8]{0}) ragged-all-to-all(%ag, %o, %i, %s, %t, %u), channel_id=2
  %c = f32[8,16]{1,0} custom-call(%a), custom_call_target="__cublas$gemm"
  %w = (s32[], f32[8,16]{1,0}) while(%t0), condition=%cond, body=%body
  ROOT %t = (f32[8,16]{1,0}, s32[]) tuple(%c, %x)
}"""
    ops = selfcheck.compiled_ops(text)
    assert ops["all-gather"] == 1 and ops["ragged-all-to-all"] == 1 and ops["while"] == 1
    assert ops["dot"] == 1 and ops["batched_dots"] == 1 and ops["custom-call"] == 1
    assert ops["custom_call_targets"] == ["__cublas$gemm"]
    assert "tuple" not in ops and "sort" not in ops


def test_program_facts_on_cpu():
    """CPU has no ragged all-to-all (the project's emulation runs instead) and the grouped GEMM
    is the tiled loop of dots; the decode schedule's gather transport is one all-gather and one
    reduce-scatter; the replicated batch one all-reduce."""
    mesh = mr.make_ep_mesh(8)
    facts = selfcheck.program_facts(mesh, shapes=SHAPES,
                                    variants=("decode", "prefill", "decode_replicated"))
    assert not any(f["native_ragged_all_to_all"] for f in facts.values())
    assert {f["grouped_gemm"] for f in facts.values()} == {"dot loop"}
    assert facts["decode"]["ops"].get("all-gather") == 1
    assert facts["decode"]["ops"].get("reduce-scatter") == 1
    assert facts["decode_replicated"]["ops"].get("all-reduce") == 1
    assert "all-gather" not in facts["decode_replicated"]["ops"]
    assert facts["prefill"]["ops"].get("all-to-all", 0) > 0  # the emulated ragged exchange


def test_script_writes_a_report_and_times(tmp_path):
    import check_platform

    rc = check_platform.main(["--quick", "--variants", "decode", "--time", "1",
                              "--local", "2", "--k", "2", "--d-model", "16", "--d-ff", "16",
                              "--rounds", "2", "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["failed"] == 0 and report["devices"] == len(jax.devices())
    assert {c["variant"] for c in report["checks"]} == {"decode"}
    assert {c["check"] for c in report["checks"]} >= {"output", "grad x", "grad w_down"}
    assert set(report["programs"]) == {"decode"}
    row = report["timing"][0]
    assert row["tokens"] == 1 and row["decode"] > 0
    assert "checks failed" in (tmp_path / "check.md").read_text()
