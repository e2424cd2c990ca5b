"""MLA attention over the latent cache: the chunked online softmax of the absorbed form against
the one-pass softmax, and the compiled decode step's temporaries against the context length."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_relayfree_models import mla
from moe_relayfree_models.layers import attention_mask


@pytest.mark.parametrize("length,chunk,start", [(37, 8, 36), (64, 16, 60), (40, 40, 39)])
def test_chunked_latent_attention_equals_one_pass(length, chunk, start):
    """Cache rows in chunks (the last one shifted back to end at the cache's end, its overlap
    counted once), left padding, and a padding query that sees no key at all: the same output
    as one softmax over every row."""
    rng = np.random.default_rng(length)
    b, s, h, c, r = 3, 2, 4, 16, 4
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    q_lat, q_rope, lat, kr = f(b, s, h, c), f(b, s, h, r), f(b, length, c), f(b, length, r)
    key_valid = jnp.arange(length)[None, :] >= jnp.asarray([0, 5, length])[:, None]  # row 2: none
    mask = attention_mask(start - s + 1, s, key_valid)[:, None]
    want = mla.latent_attention(q_lat, q_rope, lat, kr, mask, 0.3, chunk=length)
    got = mla.latent_attention(q_lat, q_rope, lat, kr, mask, 0.3, chunk=chunk)
    assert got.shape == (b, s, h, c)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_absorbed_decode_step_does_not_expand_the_cache():
    """The CPU-compiled decode step of a DeepSeek-V3-style model (32 heads, latent 64): from a
    cache of 1024 rows to 4096 its temporaries grow by less than a tenth of what the expanded
    form's grow by ([B, L, h, nope + v] keys and values every step). On XLA:TPU at full size:
    docs/benchmarks.md, "At scale" (67.7 -> 73.1 MiB, where the expanded form took 1 -> 8 GiB)."""
    import dataclasses

    from flax import nnx

    import moe_relayfree as mr
    from moe_relayfree_models import init_cache
    from moe_relayfree_models.checkpoint import read_config
    from moe_relayfree_models.generation import GREEDY, step_program
    from moe_relayfree_models.transformer import MoETransformer

    cfg = dataclasses.replace(read_config(os.path.join(os.path.dirname(__file__), "fixtures", "hf", "deepseek_v3-large")), n_heads=32,
                              n_kv_heads=32, kv_lora_rank=64, max_position=1 << 16)
    model = MoETransformer(cfg, mesh=mr.make_ep_mesh(1), rngs=nnx.Rngs(0))

    def temp(length):
        graphdef, state = nnx.split(model)
        cache = init_cache(cfg, 4, length, jnp.float32)
        compiled = step_program.lower(graphdef, GREEDY, state, jnp.zeros((4,), jnp.int32),
                                      jnp.zeros((4,), jnp.int32), cache, jnp.int32(3),
                                      jax.random.key(0)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    growth = {}
    for form in ("absorbed", "expanded"):
        # no cache clearing between the forms: the form is in the model's config, so in the
        # step program's cache key (a module global patched here once kept the old program)
        model.set_mla_form(form)
        growth[form] = temp(4096) - temp(1024)
    assert growth["absorbed"] < 0.1 * growth["expanded"], growth
