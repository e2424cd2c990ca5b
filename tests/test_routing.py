"""Routers against hand-computed cases."""

import numpy as np
import pytest

from moe_relayfree.routing import RouterConfig, route, sigmoid_grouped_topk, softmax_topk, topk_softmax

LOGITS = np.array([[1.0, 2.0, 3.0, 0.0], [0.5, -1.0, 0.0, 2.0]], np.float32)


def test_softmax_topk_plain_and_renormalized():
    p = np.exp(LOGITS) / np.exp(LOGITS).sum(1, keepdims=True)
    ids, w = softmax_topk(LOGITS, 2, renormalize=False)
    np.testing.assert_array_equal(ids, [[2, 1], [3, 0]])
    np.testing.assert_allclose(w, [[p[0, 2], p[0, 1]], [p[1, 3], p[1, 0]]], rtol=1e-6)
    ids, w = softmax_topk(LOGITS, 2, renormalize=True)
    e = np.exp(1.0)
    np.testing.assert_allclose(w[0], [e / (e + 1), 1 / (e + 1)], rtol=1e-6)
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-6)


def test_topk_softmax():
    ids, w = topk_softmax(LOGITS, 2)
    np.testing.assert_array_equal(ids, [[2, 1], [3, 0]])
    d = 2.0 - 0.5
    np.testing.assert_allclose(w[1], [1 / (1 + np.exp(-d)), np.exp(-d) / (1 + np.exp(-d))], rtol=1e-6)


def _logit(s):
    s = np.asarray(s, np.float32)
    return np.log(s / (1 - s))[None]


SCORES = [0.9, 0.1, 0.2, 0.3, 0.8, 0.7, 0.15, 0.05]


def test_sigmoid_grouped_topk_picks_groups_by_top2_sum():
    # groups of 2: sums 1.0, 0.5, 1.5, 0.2 -> groups 2 and 0 survive -> experts 0 (0.9), 4 (0.8)
    ids, w = sigmoid_grouped_topk(
        _logit(SCORES), 2, n_group=4, topk_group=2, renormalize=True, routed_scaling_factor=2.5
    )
    np.testing.assert_array_equal(ids, [[0, 4]])
    np.testing.assert_allclose(w, [[2.5 * 0.9 / 1.7, 2.5 * 0.8 / 1.7]], rtol=1e-5)


def test_sigmoid_bias_selects_but_does_not_weight():
    # the bias lifts group 3 (0.15 + 0.05 + 0.9) to 1.1: groups 2 and 3 survive; expert 7 wins
    # on its biased score but is weighted by its raw score 0.05.
    bias = np.array([0, 0, 0, 0, 0, 0, 0, 0.9], np.float32)
    ids, w = sigmoid_grouped_topk(
        _logit(SCORES), 2, bias=bias, n_group=4, topk_group=2, renormalize=True
    )
    np.testing.assert_array_equal(ids, [[7, 4]])
    np.testing.assert_allclose(w, [[0.05 / 0.85, 0.8 / 0.85]], rtol=1e-5)
    _, raw = sigmoid_grouped_topk(_logit(SCORES), 2, bias=bias, renormalize=False)
    np.testing.assert_allclose(raw, [[0.05, 0.9]], rtol=1e-5)


def test_route_dispatches_on_config_and_rejects_bad_config():
    ids, _ = route(LOGITS, 1, RouterConfig(method="topk_softmax"))
    np.testing.assert_array_equal(ids, [[2], [3]])
    assert ids.dtype == np.int32
    with pytest.raises(ValueError, match="unknown routing method"):
        RouterConfig(method="nope")
    with pytest.raises(ValueError, match="k=5"):
        route(LOGITS, 5, RouterConfig())
    with pytest.raises(ValueError, match="n_group"):
        sigmoid_grouped_topk(_logit(SCORES), 2, n_group=3)
