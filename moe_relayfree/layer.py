"""Flax NNX MoE layer: router + relay-free routed experts + optional shared experts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from moe_relayfree.api import DEFAULT_CAPACITY_FACTOR, expert_parallel_moe
from moe_relayfree.selection import Schedule
from moe_relayfree.experts import swiglu
from moe_relayfree.routing import RouterConfig, route


class RouterBias(nnx.Variable):
    """Selection-only expert bias (DeepSeek-V3 ``e_score_correction_bias``): not a gradient param."""


def normal_init(rngs: nnx.Rngs, shape, std: float, dtype) -> jax.Array:
    """``N(0, std^2)`` parameters drawn in float32, stored in ``dtype``."""
    return (jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype)


class SwiGLUMLP(nnx.Module):
    """A dense SwiGLU MLP every token goes through (shared experts, dense layers), optionally
    scaled by ``sigmoid(x @ gate)`` (Qwen2-MoE's ``shared_expert_gate``)."""

    def __init__(self, d_model: int, d_ff: int, *, gated: bool = False, param_dtype, rngs: nnx.Rngs):
        self.w_gate = nnx.Param(normal_init(rngs, (d_model, d_ff), d_model**-0.5, param_dtype))
        self.w_up = nnx.Param(normal_init(rngs, (d_model, d_ff), d_model**-0.5, param_dtype))
        self.w_down = nnx.Param(normal_init(rngs, (d_ff, d_model), d_ff**-0.5, param_dtype))
        self.gate = (
            nnx.Param(normal_init(rngs, (d_model, 1), d_model**-0.5, param_dtype)) if gated else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[..., d]`` -> ``[..., d]``."""
        flat = x.reshape(-1, x.shape[-1])
        y = swiglu(flat, self.w_gate[...].astype(x.dtype), self.w_up[...].astype(x.dtype),
                   self.w_down[...].astype(x.dtype))
        if self.gate is not None:
            g = jax.nn.sigmoid(jnp.dot(flat, self.gate[...].astype(x.dtype),
                                       preferred_element_type=jnp.float32))
            y = (g * y.astype(jnp.float32)).astype(x.dtype)
        return y.reshape(x.shape)


class MoELayer(nnx.Module):
    """Mixture-of-Experts feed-forward block with relay-free expert parallelism.

    Parameters (``E`` experts, ``d`` model size, ``f`` expert size):
      router ``[d, E]`` (replicated); router_bias ``[E]`` if ``router.score_bias``;
      w_gate, w_up ``[E, d, f]`` and w_down ``[E, f, d]``, created sharded on E over ``axis``;
      shared experts (``shared_d_ff`` > 0) replicated.

    Call: x ``[..., d]`` -> ``[..., d]`` (x.dtype). Any token count works: the flattened tokens
    are padded to a multiple of the axis size with zero-weight rows, which are dropped after.
    ``schedule``, ``capacity_factor`` and ``implementation`` are passed to
    :func:`moe_relayfree.expert_parallel_moe` ("relayfree", or a baseline for comparison).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        k: int,
        *,
        mesh: Mesh,
        axis: str = "ep",
        router: RouterConfig = RouterConfig(),
        shared_d_ff: int = 0,
        shared_gate: bool = False,
        schedule: Schedule = "auto",
        capacity_factor: float | None = DEFAULT_CAPACITY_FACTOR,
        implementation: str = "relayfree",
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if axis not in mesh.axis_names:
            raise ValueError(f"mesh has no axis {axis!r} (axes: {mesh.axis_names})")
        if num_experts % mesh.shape[axis]:
            raise ValueError(
                f"num_experts={num_experts} is not divisible by the {mesh.shape[axis]} ranks of {axis!r}"
            )
        if not 1 <= k <= num_experts:
            raise ValueError(f"k={k} must be in [1, num_experts={num_experts}]")
        self.mesh, self.axis, self.k, self.num_experts = mesh, axis, k, num_experts
        self.router_config, self.schedule, self.capacity_factor = router, schedule, capacity_factor
        self.implementation = implementation
        self.router = nnx.Param(normal_init(rngs, (d_model, num_experts), d_model**-0.5, param_dtype))
        self.router_bias = (
            RouterBias(jnp.zeros((num_experts,), jnp.float32)) if router.score_bias else None
        )
        ep = dict(out_sharding=(axis, None, None), mesh=mesh)
        shape_in, shape_out = (num_experts, d_model, d_ff), (num_experts, d_ff, d_model)
        self.w_gate = nnx.Param(normal_init(rngs, shape_in, d_model**-0.5, param_dtype), **ep)
        self.w_up = nnx.Param(normal_init(rngs, shape_in, d_model**-0.5, param_dtype), **ep)
        self.w_down = nnx.Param(normal_init(rngs, shape_out, d_ff**-0.5, param_dtype), **ep)
        self.shared = (
            SwiGLUMLP(d_model, shared_d_ff, gated=shared_gate, param_dtype=param_dtype, rngs=rngs)
            if shared_d_ff
            else None
        )

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x ``[N, d]`` -> (topk_ids ``[N, k] int32``, topk_weights ``[N, k] float32``)."""
        logits = jnp.dot(x, self.router[...].astype(x.dtype), preferred_element_type=jnp.float32)
        bias = None if self.router_bias is None else self.router_bias[...]
        return route(logits, self.k, self.router_config, bias)

    def __call__(self, x: jax.Array) -> jax.Array:
        lead, d = x.shape[:-1], x.shape[-1]
        tokens = x.reshape(-1, d)
        n = tokens.shape[0]
        ids, weights = self.route(tokens)
        pad = -n % self.mesh.shape[self.axis]
        if pad:
            tokens = jnp.pad(tokens, ((0, pad), (0, 0)))
            # Padding rows spread over experts with weight 0: they add no result and no hot spot.
            fill = (jnp.arange(pad * self.k, dtype=jnp.int32) % self.num_experts).reshape(pad, self.k)
            ids = jnp.concatenate([ids, fill])
            weights = jnp.concatenate([weights, jnp.zeros((pad, self.k), weights.dtype)])
        dtype = x.dtype
        y = expert_parallel_moe(
            tokens, ids, weights,
            self.w_gate[...].astype(dtype), self.w_up[...].astype(dtype),
            self.w_down[...].astype(dtype),
            mesh=self.mesh, axis=self.axis, schedule=self.schedule,
            capacity_factor=self.capacity_factor, implementation=self.implementation,
        )[:n]
        if self.shared is not None:
            y = y + self.shared(tokens[:n])
        return y.reshape(*lead, d)
