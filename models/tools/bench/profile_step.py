"""A model's decode step per dispatch path, timed in interleaved rounds and reduced from
XLA:CPU's profile the way the core's layer profile is (:mod:`moe_relayfree.tools.bench.profile`
says how: self time per op class and thread kind). The command: ``scripts/profile_layer.py
--checkpoint DIR --batch N``.
"""

from __future__ import annotations

from moe_relayfree.tools.bench.profile import profile
from moe_relayfree.tools.bench.timing import interleaved


def run_step(checkpoint: str, batch: int, paths, *, rounds: int, calls: int,
             cache_len: int = 32) -> dict:
    """The model's decode step for ``batch`` sequences, per dispatch path: median ms over
    interleaved rounds and the profile. Tokens are random (the routing of real text, not one
    token repeated, which would send every copy to the same experts)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import moe_relayfree as mr
    from moe_relayfree_models import checkpoint as ckpt
    from moe_relayfree_models.cli import DISPATCH
    from moe_relayfree_models.generation import GREEDY, step_program
    from moe_relayfree_models.transformer import init_cache

    mesh = mr.make_ep_mesh(len(jax.devices()))
    key = jax.random.key(0)
    calls_of, hlo = {}, {}
    for name in paths:
        model = ckpt.load_model(checkpoint, mesh=mesh, implementation=DISPATCH[name])
        graphdef, state = nnx.split(model)
        rng = np.random.default_rng(batch)
        token = jnp.asarray(rng.integers(3, model.cfg.vocab_size, batch), jnp.int32)
        pad = jnp.zeros((batch,), jnp.int32)
        box = [init_cache(model.cfg, batch, cache_len, model.compute_dtype)]
        position = jnp.int32(cache_len // 2)
        compiled = step_program.lower(graphdef, GREEDY, state, token, pad, box[0], position,
                                      key).compile()

        def call(compiled=compiled, state=state, token=token, pad=pad, box=box, position=position):
            # the step donates its cache: thread it through the calls
            out, box[0] = compiled(state, token, pad, box[0], position, key)
            return out

        calls_of[name], hlo[name] = call, compiled.as_text()
        jax.block_until_ready(call())
    times = interleaved(calls_of, min_rounds=rounds, max_rounds=rounds)
    return {name: dict(ms=float(np.median(times[name]) * 1e3),
                       **profile(calls_of[name], None, calls, hlo[name])) for name in paths}
