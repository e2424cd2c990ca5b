"""Flax NNX MoE layer: router + relay-free routed experts + optional shared experts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_relayfree.api import route_tokens, run_resolved
from moe_relayfree.balance import (
    expert_load,
    load_balancing_loss,
    router_probabilities,
    router_z_loss,
    update_score_bias,
)
from moe_relayfree.config import DispatchConfig, Lowering, dispatch_config
from moe_relayfree.ffn import dense_dot
from moe_relayfree.layout import auto_mesh
from moe_relayfree.paths import Resolved, resolve
from moe_relayfree.quant import BlockQuantized, check_split, quantize
from moe_relayfree.routing import RouterConfig, route


class RouterBias(nnx.Variable):
    """Selection-only expert bias (DeepSeek-V3 ``e_score_correction_bias``): not a gradient param."""


class BlockScale(nnx.Variable):
    """The float32 block scales of a block-quantized expert stack: not a gradient param."""


def quantize_stack(w: jax.Array, block: tuple[int, int], mesh, spec) -> BlockQuantized:
    """:func:`~moe_relayfree.quant.quantize` of a stack split by ``spec``, shard by shard (each
    shard holds whole blocks, :func:`~moe_relayfree.quant.check_split`), under jit (under
    ``nnx.eval_shape``: the abstract shapes)."""
    local = jax.shard_map(lambda a: quantize(a, block), mesh=mesh, in_specs=spec, out_specs=spec)
    return jax.jit(local)(w)


def replicated_param(value: jax.Array, mesh=None, kind=nnx.Param):
    """A ``kind`` variable holding ``value``, replicated on every device of ``mesh`` (where the
    jitted forward wants it: a parameter left on one device came back from the first call
    placed on the mesh, and the second call compiled again)."""
    # Only on an all-Auto mesh: on an Explicit one a replicated value carries an explicit
    # sharding type, which a user's own unplaced arrays then fail to combine with
    # (layer.router_bias[...] = ...); there they start where JAX puts them, as before.
    if mesh is None or auto_mesh(mesh) is not mesh:
        return kind(value)
    return kind(value, out_sharding=(None,) * value.ndim, mesh=mesh)


def normal_init(rngs: nnx.Rngs, shape, std: float, dtype) -> jax.Array:
    """``N(0, std^2)`` parameters drawn in float32, stored in ``dtype``."""
    return (jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype)


class SwiGLUMLP(nnx.Module):
    """A dense SwiGLU MLP every token goes through (shared experts, dense layers), optionally
    scaled by ``sigmoid(x @ gate)`` (Qwen2-MoE's ``shared_expert_gate``)."""

    def __init__(self, d_model: int, d_ff: int, *, gated: bool = False, param_dtype,
                 rngs: nnx.Rngs, lowering: Lowering = Lowering(), mesh=None):
        """``mesh``: the parameters start replicated on it (else on the default device)."""
        self.min_rows = lowering.dense_min_rows

        def param(shape, std):
            return replicated_param(normal_init(rngs, shape, std, param_dtype), mesh)

        self.w_gate = param((d_model, d_ff), d_model**-0.5)
        self.w_up = param((d_model, d_ff), d_model**-0.5)
        self.w_down = param((d_ff, d_model), d_ff**-0.5)
        self.gate = param((d_model, 1), d_model**-0.5) if gated else None

    def __call__(self, x: jax.Array, *, rows_per_device: int | None = None) -> jax.Array:
        """x ``[..., d]`` -> ``[..., d]``; rows_per_device as in
        :func:`~moe_relayfree.ffn.dense_dot` (for ``[N, d]`` tokens split over devices).
        Numerics of :func:`~moe_relayfree.ffn.swiglu`."""
        def dot(a, w):
            return dense_dot(a, w[...].astype(x.dtype), rows_per_device=rows_per_device,
                             min_rows=self.min_rows)

        h = (jax.nn.silu(dot(x, self.w_gate)) * dot(x, self.w_up)).astype(x.dtype)
        y = dot(h, self.w_down).astype(x.dtype)
        if self.gate is not None:
            y = (jax.nn.sigmoid(dot(x, self.gate)) * y.astype(jnp.float32)).astype(x.dtype)
        return y


class MoELayer(nnx.Module):
    """Mixture-of-Experts feed-forward block with relay-free expert parallelism.

    Parameters (``E`` experts, ``d`` model size, ``f`` expert size):
      router ``[d, E]`` (replicated); router_bias ``[E]`` if ``router.score_bias``;
      w_gate, w_up ``[E, d, f]`` and w_down ``[E, f, d]``, created sharded on E over ``axis``
      (and on f over ``tensor_axis``); shared experts (``shared_d_ff`` > 0) replicated.

    FP8 experts (``expert_block=(br, bc)``, or :meth:`quantize_experts` later): the three
    stacks are stored as ``float8_e4m3fn`` with float32 :class:`BlockScale` variables
    ``w_gate_scale`` / ``w_up_scale`` ``[E, ceil(d/br), ceil(f/bc)]`` and ``w_down_scale``
    ``[E, ceil(f/br), ceil(d/bc)]``, split like their stacks: half the bytes of bf16. They are
    dequantized to the activations' dtype where the experts run
    (:mod:`moe_relayfree.quant`); inference only.

    Dispatch: a :class:`~moe_relayfree.DispatchConfig` (``dispatch=``), or its fields as
    keywords (``mesh=..., schedule=...``), or both (the keywords change the config). Tokens
    are split over its batch axes, experts over its expert axis (see
    :mod:`moe_relayfree.layout`); each call resolves its path once (:meth:`resolve`) and runs
    it as :func:`moe_relayfree.expert_parallel_moe` would.

    Call: x ``[..., d]`` -> ``[..., d]`` (x.dtype). Any token count works: the flattened tokens
    are padded to a multiple of the token shards with zero-weight rows, dropped after.

    Training (opt-in, sown as ``nnx.Intermediate`` under ``nnx.capture(model, nnx.Intermediate)``,
    which returns them with the output, and not computed outside it; see
    :mod:`moe_relayfree.balance`):
    ``router_stats=True`` sows ``router_load [E]`` (share of token copies per expert) and
    ``router_prob_mean [E]``; ``load_balancing_weight`` / ``z_loss_weight`` > 0 sow the
    weighted ``load_balancing_loss`` / ``router_z_loss`` scalars, which
    :func:`moe_relayfree.balance.total_aux_loss` adds up. Padding rows are not counted.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        k: int,
        *,
        dispatch: DispatchConfig | None = None,
        router: RouterConfig = RouterConfig(),
        shared_d_ff: int = 0,
        shared_gate: bool = False,
        router_stats: bool = False,
        load_balancing_weight: float = 0.0,
        z_loss_weight: float = 0.0,
        param_dtype=jnp.float32,
        expert_block: tuple[int, int] | None = None,
        rngs: nnx.Rngs,
        **dispatch_settings,
    ):
        config = dispatch_config(dispatch, **dispatch_settings)
        lay = config.layout
        lay.check_experts(num_experts, d_ff)
        if not 1 <= k <= num_experts:
            raise ValueError(f"k={k} must be in [1, num_experts={num_experts}]")
        if load_balancing_weight < 0 or z_loss_weight < 0:
            raise ValueError("load_balancing_weight and z_loss_weight must be >= 0")
        mesh = config.mesh
        self.dispatch = config
        self.mesh, self.axis, self.k, self.num_experts = mesh, config.axis, k, num_experts
        self.layout = lay
        self.router_config = router
        self.router_stats = router_stats
        self.load_balancing_weight, self.z_loss_weight = load_balancing_weight, z_loss_weight
        # replicated on the mesh from the start: otherwise a jitted call returns them placed
        # there, and the next call (arguments on other devices) compiles again
        self.router = replicated_param(
            normal_init(rngs, (d_model, num_experts), d_model**-0.5, param_dtype), mesh)
        self.router_bias = (
            replicated_param(jnp.zeros((num_experts,), jnp.float32), mesh, RouterBias)
            if router.score_bias else None
        )
        shape_in, shape_out = (num_experts, d_model, d_ff), (num_experts, d_ff, d_model)
        self.w_gate = nnx.Param(normal_init(rngs, shape_in, d_model**-0.5, param_dtype),
                                out_sharding=tuple(lay.w_in), mesh=mesh)
        self.w_up = nnx.Param(normal_init(rngs, shape_in, d_model**-0.5, param_dtype),
                              out_sharding=tuple(lay.w_in), mesh=mesh)
        self.w_down = nnx.Param(normal_init(rngs, shape_out, d_ff**-0.5, param_dtype),
                                out_sharding=tuple(lay.w_out), mesh=mesh)
        self.shared = (
            SwiGLUMLP(d_model, shared_d_ff, gated=shared_gate, param_dtype=param_dtype, rngs=rngs,
                      lowering=config.lowering, mesh=mesh)
            if shared_d_ff
            else None
        )
        self.expert_block = None  # (rows, cols) once quantized, with w_*_scale variables
        if expert_block is not None:
            self.quantize_experts(expert_block)

    def quantize_experts(self, block: tuple[int, int] = (128, 128)) -> None:
        """Stores the routed experts in FP8 with one float32 scale per ``block`` (rows, cols) of
        each matrix (:func:`moe_relayfree.quant.quantize`: every block's largest magnitude maps
        to 448), in place, split as before. A tensor axis must leave whole blocks on each rank."""
        if self.expert_block is not None:
            raise ValueError(f"the experts are already quantized (blocks {self.expert_block})")
        block = tuple(int(b) for b in block)
        if len(block) != 2 or min(block) < 1:
            raise ValueError(f"block must be two positive ints (rows, cols), got {block}")
        lay, mesh = self.layout, self.mesh
        for name, spec, f_dim in (("w_gate", lay.w_in, 2), ("w_up", lay.w_in, 2),
                                  ("w_down", lay.w_out, 1)):
            var = getattr(self, name)
            check_split(name, var.shape, block, f_dim, lay.tensor_size)
            q = quantize_stack(var[...], block, mesh, spec)
            setattr(self, name, nnx.Param(q.values, out_sharding=tuple(spec), mesh=mesh))
            setattr(self, f"{name}_scale", BlockScale(q.scale, out_sharding=tuple(spec), mesh=mesh))
        self.expert_block = block

    def _expert_weights(self, dtype) -> tuple:
        """The three stacks as :func:`expert_parallel_moe` takes them: in ``dtype``, or
        :class:`~moe_relayfree.quant.BlockQuantized` (dequantized where the experts run)."""
        names = ("w_gate", "w_up", "w_down")
        if self.expert_block is None:
            return tuple(getattr(self, n)[...].astype(dtype) for n in names)
        return tuple(BlockQuantized(getattr(self, n)[...], getattr(self, f"{n}_scale")[...],
                                    self.expert_block) for n in names)

    def resolve(self, num_tokens: int) -> Resolved:
        """What a call with ``num_tokens`` tokens runs: its dispatch path, schedule, transport,
        whether the batch stays on every device, receive rows
        (:func:`moe_relayfree.paths.resolve`, the one place the schedule is chosen)."""
        return resolve(self.dispatch, num_tokens, self.k)

    def rows_per_device(self, num_tokens: int, resolved: Resolved | None = None) -> int:
        """Token rows each device holds when this layer gets ``num_tokens``: all of them when
        the batch stays on every device (``resolved.replicated``), else the batch padded to
        and split over the token shards."""
        resolved = resolved or self.resolve(num_tokens)
        if resolved.replicated:
            return num_tokens
        return -(-num_tokens // self.layout.num_token_shards)

    def logits(self, x: jax.Array, *, rows_per_device: int | None = None) -> jax.Array:
        """x ``[N, d]`` -> router logits ``[N, E] float32`` (rows_per_device: see
        :func:`~moe_relayfree.ffn.dense_dot`)."""
        return dense_dot(x, self.router[...].astype(x.dtype), rows_per_device=rows_per_device,
                         min_rows=self.dispatch.lowering.dense_min_rows)

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x ``[N, d]`` -> (topk_ids ``[N, k] int32``, topk_weights ``[N, k] float32``)."""
        return self._route(self.logits(x))

    def _route(self, logits: jax.Array) -> tuple[jax.Array, jax.Array]:
        bias = None if self.router_bias is None else self.router_bias[...]
        return route(logits, self.k, self.router_config, bias)

    def update_router_bias(self, load: jax.Array, rate: float = 1e-3) -> None:
        """DeepSeek-V3 balancing: ``bias += rate * sign(mean(load) - load)``.

        load ``[E]``: measured load over the last step(s), e.g. the sown ``router_load``
        (summed over calls). Needs ``RouterConfig(score_bias=True)``.
        """
        if self.router_bias is None:
            raise ValueError("this layer has no router bias (RouterConfig(score_bias=True))")
        if jnp.shape(load) != (self.num_experts,):
            raise ValueError(f"load must be [E={self.num_experts}], got shape {jnp.shape(load)}")
        self.router_bias[...] = update_score_bias(self.router_bias[...], load, rate)

    def _sow_router_terms(self, logits: jax.Array, ids: jax.Array) -> None:
        # Only under nnx.capture: outside it a sow appends to a module attribute on every call
        # (a serving loop's nnx.jit forward grew a tuple of them, 3 -> 6 -> 9 leaves).
        if not hasattr(self, "__captures__"):
            return
        wants_probs = self.router_stats or self.load_balancing_weight
        probs = router_probabilities(logits, self.router_config.method) if wants_probs else None
        if self.router_stats:
            self.sow(nnx.Intermediate, "router_load", expert_load(ids, self.num_experts))
            self.sow(nnx.Intermediate, "router_prob_mean", probs.mean(axis=0))
        if self.load_balancing_weight:
            self.sow(nnx.Intermediate, "load_balancing_loss",
                     self.load_balancing_weight * load_balancing_loss(probs, ids))
        if self.z_loss_weight:
            self.sow(nnx.Intermediate, "router_z_loss", self.z_loss_weight * router_z_loss(logits))

    def __call__(self, x: jax.Array) -> jax.Array:
        lead, d = x.shape[:-1], x.shape[-1]
        if d != self.router.shape[0]:
            raise ValueError(f"x's last axis must be d_model={self.router.shape[0]}, got shape "
                             f"{tuple(x.shape)}")
        tokens = x.reshape(-1, d)
        n = tokens.shape[0]
        # A relay-free decode batch smaller than the token shards stays on every device (one
        # psum per layer, resolved.replicated); a larger one is padded to a multiple of them.
        resolved = self.resolve(n)
        pad = 0 if resolved.replicated else -n % self.layout.num_token_shards
        if pad:
            tokens = jnp.pad(tokens, ((0, pad), (0, 0)))
        rows = self.rows_per_device(n, resolved)
        logits = self.logits(tokens, rows_per_device=rows)
        # Each device routes its own tokens (see route_tokens: top_k in the global view
        # all-gathers the logits of the whole batch onto every device).
        bias = None if self.router_bias is None else self.router_bias[...]
        ids, weights = route_tokens(logits, self.k, self.router_config, bias, self.dispatch)
        if n:
            self._sow_router_terms(logits[:n], ids[:n])
        if pad:
            # Padding rows spread over experts with weight 0: they add no result and no hot spot.
            row = jnp.arange(n + pad, dtype=jnp.int32)[:, None]
            fill = ((row - n) * self.k + jnp.arange(self.k, dtype=jnp.int32)) % self.num_experts
            ids = jnp.where(row < n, ids, fill)
            weights = jnp.where(row < n, weights, 0.0)
        y = run_resolved(resolved, self.dispatch, tokens, ids, weights,
                         *self._expert_weights(x.dtype))[:n]
        if self.shared is not None:
            y = y + self.shared(tokens[:n], rows_per_device=rows)
        return y.reshape(*lead, d)
