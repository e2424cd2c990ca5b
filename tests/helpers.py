"""Shared fixtures-as-functions for the tests."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import moe_relayfree as mr
from moe_relayfree.tools import selfcheck
from moe_relayfree.distributed import DEVICE_COUNT_FLAG


def computed_once(tmp_path_factory, name: str, compute):
    """``compute()``'s JSON-able result, computed by one pytest-xdist worker of the run and
    read by the others (a lock file beside the workers' shared temp dir): reference outputs
    that cost tens of seconds of compiles are not made once per worker."""
    import fcntl
    import json

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = shared / f"{name}.json"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            path.write_text(json.dumps(compute()))
        return json.loads(path.read_text())


def script_env(device_count: int | None = None) -> dict:
    """The environment for a script a test starts: the tests' XLA flags (tests/conftest.py)
    without their device count, and ``device_count`` emulated CPU devices if given (else the
    script sets its own)."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if DEVICE_COUNT_FLAG not in f]
    if device_count is not None:
        flags.append(f"--{DEVICE_COUNT_FLAG}={device_count}")
    return dict(os.environ, XLA_FLAGS=" ".join(flags))


# A model's forward, compiled (tokens, pad, cache, position -> logits, cache): op by op, every
# call re-dispatches each layer's shard_map, which took longer than compiling it.
forward = nnx.jit(lambda model, *args: model(*args))


def make_mesh(num_ranks: int, axis: str = "ep"):
    return jax.make_mesh((num_ranks,), (axis,), devices=jax.devices()[:num_ranks])


def moe_inputs(n, d, f, e, k, *, seed=0, dtype=jnp.float32, ids=None):
    """Random tokens, distinct top-k ids per token, positive weights, expert weights."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    if ids is None:
        ids = np.stack([rng.choice(e, size=k, replace=False) for _ in range(n)]).astype(np.int32)
    w = rng.uniform(0.1, 1.0, size=(n, k)).astype(np.float32)
    wg = (rng.standard_normal((e, d, f)) / np.sqrt(d)).astype(np.float32)
    wu = (rng.standard_normal((e, d, f)) / np.sqrt(d)).astype(np.float32)
    wd = (rng.standard_normal((e, f, d)) / np.sqrt(f)).astype(np.float32)
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    return cast(x), jnp.asarray(ids), jnp.asarray(w), cast(wg), cast(wu), cast(wd)


def skewed_ids(kind, n, k, num_experts, num_ranks):
    """Adversarial routing (``one_expert``, ``one_rank``, ``empty_experts``): the patterns of
    the platform self-check, :func:`moe_relayfree.tools.selfcheck.routing_ids`."""
    return selfcheck.routing_ids(kind, n, k, num_experts, num_ranks)


# --- MoELayer as plain arrays and dense math -------------------------------------------


def host(v):
    return jnp.asarray(np.asarray(v[...]))


@functools.partial(jax.jit, static_argnums=(2, 3))
def dense_layer(params, x, k, cfg):
    """The layer's math on one device from plain arrays."""
    t = x.reshape(-1, x.shape[-1])
    logits = jnp.dot(t, params["router"], preferred_element_type=jnp.float32)
    ids, w = mr.route(logits, k, cfg, params.get("bias"))
    y = mr.dense_moe_reference(t, ids, w, params["wg"], params["wu"], params["wd"])
    if "s_wg" in params:
        s = mr.swiglu(t, params["s_wg"], params["s_wu"], params["s_wd"])
        if "s_gate" in params:
            s = jax.nn.sigmoid(t @ params["s_gate"]) * s
        y = y + s
    return y.reshape(x.shape)


def layer_params(layer):
    """Plain arrays from a MoELayer, or from the nnx.State of its gradients."""
    p = {"router": host(layer.router), "wg": host(layer.w_gate), "wu": host(layer.w_up),
         "wd": host(layer.w_down)}
    if getattr(layer, "router_bias", None) is not None:
        p["bias"] = host(layer.router_bias)
    shared = getattr(layer, "shared", None)
    if shared is not None:
        p.update(s_wg=host(shared.w_gate), s_wu=host(shared.w_up), s_wd=host(shared.w_down))
        if getattr(shared, "gate", None) is not None:
            p["s_gate"] = host(shared.gate)
    return p
