"""DispatchConfig: validated once, carried unchanged from the loader to every MoE layer, and the
key of the compiled programs."""

import os

import jax
import numpy as np
import pytest

import moe_relayfree as mr
from helpers import moe_inputs
from moe_relayfree import api

DEFAULT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models",
                       "default")


@pytest.mark.parametrize("change,message", [
    (dict(schedule="fast"), "schedule must be one of"),
    (dict(implementation="dense"), "implementation must be one of"),
    (dict(decode_overflow="drop"), "decode_overflow must be one of"),
    (dict(capacity_factor=0.0), "capacity_factor must be a positive finite number"),
    (dict(capacity_factor=float("inf")), "capacity_factor must be a positive finite number"),
    (dict(decode_threshold=-1), "decode_threshold must be an int >= 0"),
    (dict(decode_threshold="8"), "decode_threshold must be an int >= 0"),
    (dict(decode_threshold=8.5), "decode_threshold must be an int >= 0"),
    (dict(axis="experts"), "mesh has no axis 'experts'"),
])
def test_bad_settings_are_refused_when_the_config_is_made(change, message):
    with pytest.raises(ValueError, match=message):
        mr.DispatchConfig(mr.make_ep_mesh(8), **change)
    with pytest.raises(ValueError, match=message):  # and when a layer is given them directly
        mr.MoELayer(8, 12, 8, 2, mesh=mr.make_ep_mesh(8), rngs=jax.random.key(0), **change)


def test_unknown_settings_name_themselves():
    with pytest.raises(TypeError, match="unknown dispatch settings \\['schedul'\\]"):
        mr.expert_parallel_moe(*moe_inputs(8, 8, 12, 8, 2), mesh=mr.make_ep_mesh(8),
                               schedul="decode")


def test_config_and_keywords_are_one_program():
    """The config form and the keyword form give the same result from the same compiled
    program (equal configs hash alike), and a changed setting is a different program."""
    mesh = mr.make_ep_mesh(8)
    inputs = moe_inputs(16, 8, 12, 8, 2, seed=2)
    config = mr.DispatchConfig(mesh, schedule="decode")
    assert config == mr.DispatchConfig(mesh, schedule="decode", batch_axes=("ep",))
    assert hash(config) == hash(mr.DispatchConfig(mesh, schedule="decode"))
    before = api._sharded_fn.cache_info().currsize
    a = mr.expert_parallel_moe(*inputs, config)
    b = mr.expert_parallel_moe(*inputs, mesh=mesh, schedule="decode")
    np.testing.assert_array_equal(a, b)
    assert api._sharded_fn.cache_info().currsize <= before + 1
    c = mr.expert_parallel_moe(*inputs, config, schedule="prefill")  # keywords change the config
    np.testing.assert_allclose(c, a, rtol=2e-5, atol=2e-5)
    assert api._sharded_fn.cache_info().currsize >= 2


def test_the_loader_carries_one_config_to_every_moe_layer():
    """Settings a model could not be given before (capacity factor, decode threshold and
    overflow) reach every MoE layer through the one config."""
    from moe_relayfree_models import checkpoint

    config = mr.DispatchConfig(mr.make_ep_mesh(8), capacity_factor=1.5, decode_threshold=4,
                               decode_overflow="one_pass")
    model = checkpoint.load_model(DEFAULT, config)
    moe = [layer.mlp for layer in model.layers if isinstance(layer.mlp, mr.MoELayer)]
    assert moe and all(m.dispatch == config for m in moe)
    assert model.dispatch == config
