"""One rule for choice ids on every entry point (moe_relayfree.routing.screen_choices): ``-1``
is "no expert" (the choice adds nothing, every other token untouched), any other id outside
``[0, E)`` raises when concrete and makes only its own token's row NaN under jit. Before, a
``-1`` in the verbs corrupted later tokens of its rank (max error 2.96), ids >= E were dropped
silently by the verbs, and the dense reference read expert E-1 for them."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import moe_relayfree as mr
from helpers import make_mesh, moe_inputs
from moe_relayfree import decode, prefill
from moe_relayfree.paths import PATHS, path_settings

N, D, F, E, K = 64, 16, 32, 16, 4
NO_EXPERT_AT = [(3, 1), (5, 0), (5, 2), (33, 3)]  # token 5: two of its choices
BAD_AT = {(20, 0): E, (40, 2): -7, (41, 1): E + 3}


@pytest.fixture(scope="module")
def case():
    x, ids, w, wg, wu, wd = moe_inputs(N, D, F, E, K, seed=11)
    ids = np.array(ids)
    for t, j in NO_EXPERT_AT:
        ids[t, j] = -1
    none = ids.copy()
    for (t, j), v in BAD_AT.items():
        ids[t, j] = v
    # what every token but the bad ones must get: the no-expert choices weighted 0
    w0 = np.array(w)
    for t, j in NO_EXPERT_AT:
        w0[t, j] = 0.0
        none[t, j] = 0
    want = np.asarray(mr.dense_moe_reference(x, none, w0, wg, wu, wd))
    bad_rows = sorted({t for t, _ in BAD_AT})
    return (x, ids, w, wg, wu, wd), want, bad_rows


def check_rows(y, want, bad_rows):
    y = np.asarray(y, np.float32)
    nan_rows = np.where(np.isnan(y).any(axis=1))[0].tolist()
    assert nan_rows == bad_rows, nan_rows
    assert np.isnan(y[bad_rows]).all()  # the whole row, not one element
    good = np.setdiff1d(np.arange(N), bad_rows)
    np.testing.assert_allclose(y[good], want[good], atol=2e-5, rtol=2e-5)


def test_reference_refuses_or_poisons(case):
    (x, ids, w, wg, wu, wd), want, bad_rows = case
    with pytest.raises(ValueError, match=r"topk_ids\[20, 0\] = 16"):
        mr.dense_moe_reference(x, ids, w, wg, wu, wd)
    check_rows(jax.jit(mr.dense_moe_reference)(x, ids, w, wg, wu, wd), want, bad_rows)


@pytest.mark.parametrize("name", list(PATHS))
def test_every_path_through_the_api(case, name):
    (x, ids, w, wg, wu, wd), want, bad_rows = case
    mesh = make_mesh(8)
    kw = dict(path_settings(name), **({"capacity_factor": None} if PATHS[name].drops else {}))
    with pytest.raises(ValueError, match="out of range"):
        mr.expert_parallel_moe(x, ids, w, wg, wu, wd, mesh=mesh, **kw)
    check_rows(jax.jit(lambda *a: mr.expert_parallel_moe(*a, mesh=mesh, **kw))(
        x, ids, w, wg, wu, wd), want, bad_rows)


def _sharded(body):
    """body under shard_map over 8 ranks, called on the case's arrays placed as it takes them."""
    mesh = make_mesh(8)
    specs = (P("ep"),) * 3 + (P("ep", None, None),) * 3
    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P("ep")))
    return lambda *a: fn(*(jax.device_put(np.asarray(v), NamedSharding(mesh, s))
                           for v, s in zip(a, specs)))


@pytest.mark.parametrize("schedule,transport", [
    ("prefill", "auto"), ("decode", "gather"), ("decode", "windows")])
def test_the_verbs(case, schedule, transport):
    args, want, bad_rows = case

    def body(x, ids, w, wg, wu, wd):
        recv, handle = mr.dispatch(x, ids, w, num_experts=E, axis_name="ep", schedule=schedule,
                                   transport=transport)
        return mr.combine(mr.windows_swiglu(recv, wg, wu, wd), handle)

    check_rows(_sharded(body)(*args), want, bad_rows)


@pytest.mark.parametrize("schedule", ["prefill", "decode"])
def test_the_schedules_called_directly(case, schedule):
    args, want, bad_rows = case

    def body(x, ids, w, wg, wu, wd):
        experts = lambda win: mr.windows_swiglu(win, wg, wu, wd)  # noqa: E731
        if schedule == "prefill":  # half the copies per round: several rounds
            return prefill.prefill_moe(x, ids, w, experts, num_experts=E, axis_name="ep",
                                       rows_per_round=16)
        return decode.decode_moe(x, ids, w, experts, num_experts=E, axis_name="ep",
                                 transport="windows")

    check_rows(_sharded(body)(*args), want, bad_rows)


def test_no_expert_only_is_accepted_eagerly(case):
    (x, ids, w, wg, wu, wd), want, _ = case
    ids = np.where(ids >= E, -1, np.maximum(ids, -1))
    y = np.asarray(mr.expert_parallel_moe(x, ids, w, wg, wu, wd, mesh=make_mesh(8)))
    keep = np.setdiff1d(np.arange(N), sorted({t for t, _ in BAD_AT}))
    np.testing.assert_allclose(y[keep], want[keep], atol=2e-5, rtol=2e-5)
    assert np.isfinite(y).all()
