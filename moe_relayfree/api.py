"""Public entry point: expert-parallel MoE on a mesh, schedule chosen by tokens per device."""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moe_relayfree import registry
from moe_relayfree.collectives import vary_like
from moe_relayfree.config import DEFAULT_CAPACITY_FACTOR, DispatchConfig, dispatch_config
from moe_relayfree.layout import MeshLayout
from moe_relayfree.paths import PATHS, Call, DispatchPath, ExpertWeights, Resolved, resolve
from moe_relayfree.quant import BlockQuantized, check_split, is_quantized, shape_of
from moe_relayfree.routing import RouterConfig, check_choice_ids, route

__all__ = ["DEFAULT_CAPACITY_FACTOR", "expert_parallel_moe", "replicates_tokens", "route_tokens",
           "run_resolved"]


def _validate(x, topk_ids, topk_weights, w_gate, w_up, w_down, lay: MeshLayout,
              small_batch_ok: bool = False):
    shape = shape_of

    if len(shape(x)) != 2:
        raise ValueError(f"x must be [N, d], got shape {shape(x)}")
    n, d = shape(x)
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"x must be a floating-point array, got {jnp.result_type(x)}")
    if len(shape(topk_ids)) != 2 or shape(topk_ids)[0] != n:
        raise ValueError(f"topk_ids must be [N={n}, k], got shape {shape(topk_ids)}")
    k = shape(topk_ids)[1]
    if k < 1:
        raise ValueError(f"topk_ids must have at least one choice per token, got k={k}")
    if shape(topk_weights) != (n, k):
        raise ValueError(f"topk_weights must be [N, k]={(n, k)}, got shape {shape(topk_weights)}")
    if not jnp.issubdtype(jnp.result_type(topk_ids), jnp.integer):
        raise ValueError(f"topk_ids must be an integer array, got {jnp.result_type(topk_ids)}")
    if len(shape(w_gate)) != 3 or shape(w_gate)[1] != d:
        raise ValueError(f"w_gate must be [E, d={d}, f], got shape {shape(w_gate)}")
    e, _, f = shape(w_gate)
    if shape(w_up) != (e, d, f):
        raise ValueError(f"w_up must be {(e, d, f)} like w_gate, got shape {shape(w_up)}")
    if shape(w_down) != (e, f, d):
        raise ValueError(f"w_down must be [E, f, d]={(e, f, d)}, got shape {shape(w_down)}")
    shards = lay.num_token_shards
    if n % shards and not (small_batch_ok and n < shards):
        raise ValueError(
            f"N={n} tokens is not divisible by the {shards} devices of batch axes "
            f"{lay.batch_axes}; pad the batch (MoELayer does this for you)"
        )
    lay.check_experts(e, f)
    tensor = lay.tensor_size
    for name, w, f_dim in (("w_gate", w_gate, 2), ("w_up", w_up, 2), ("w_down", w_down, 1)):
        if is_quantized(w):
            check_split(name, w.shape, w.block, f_dim, tensor)
    if k > e:
        raise ValueError(f"k={k} exceeds the number of experts E={e}")
    if not isinstance(topk_ids, jax.core.Tracer):
        _check_id_range(topk_ids, e)
    return n, k, e


def _check_id_range(topk_ids, num_experts: int) -> None:
    """Raises on ids outside ``[-1, E)`` (``-1``: no expert). Multi-process arrays are checked
    on this process's shards (every process checks its own, so a bad id anywhere raises
    somewhere)."""
    if isinstance(topk_ids, jax.Array) and not topk_ids.is_fully_addressable:
        for s in topk_ids.addressable_shards:
            check_choice_ids(s.data, num_experts, s.index[0].start or 0)
    else:
        check_choice_ids(topk_ids, num_experts)


def _per_rank(x, topk_ids, topk_weights, w_gate, w_up, w_down, *, path: DispatchPath,
              call: Call, tensor_axis: str | None):
    # Every input varies over every axis any of them does (weights over the batch axes, tokens
    # over the tensor axis) before the schedules' branches: otherwise the backward pass sums a
    # replicated input's gradient inside a branch that only the ranks of one expert-parallel
    # group agree on, and ranks of different groups meet different collectives (a deadlock).
    # Here the sums happen once, after the whole layer's backward pass.
    args = (x, topk_ids, topk_weights, w_gate, w_up, w_down)
    leaves = jax.tree.leaves(args)
    x, topk_ids, topk_weights, *weights = [jax.tree.map(lambda a: vary_like(a, *leaves), a)
                                           for a in args]
    y = path.layer(x, topk_ids, topk_weights, ExpertWeights(*weights), call)
    if tensor_axis is not None:
        # Each tensor rank computed its slice of f: combine is linear in the expert outputs, so
        # one sum of [T, d] here replaces a sum of every window row after the down projection.
        y = lax.psum(y, tensor_axis)
    return y


def replicates_tokens(num_tokens: int, config: DispatchConfig) -> bool:
    """Whether :func:`expert_parallel_moe` runs ``num_tokens`` replicated: a relay-free
    decode batch smaller than the token shards (``0 < N < num_token_shards``) cannot be
    split over the devices, so every device takes all ``N`` tokens and gets all ``N`` outputs
    (the decode schedule's "replicated" transport: one ``psum``, no dispatch collective).
    Otherwise tokens are split over the batch axes, ``N`` a multiple of their size.
    (:func:`moe_relayfree.paths.resolve`'s ``replicated``.)"""
    return resolve(config, num_tokens, 1).replicated


@functools.lru_cache(maxsize=256)
def _sharded_fn(lay: MeshLayout, path: str, call: Call, replicated: bool, kernels: int):
    """The shard_map program of one resolved call; ``kernels``: the registries' generation it
    was traced under (a registration re-makes the program)."""
    del kernels  # a cache key only
    body = functools.partial(_per_rank, path=PATHS[path], call=call,
                             tensor_axis=lay.tensor_axis)
    tok = P() if replicated else lay.tokens
    return jax.shard_map(
        body, mesh=lay.mesh, in_specs=(tok, tok, tok, lay.w_in, lay.w_in, lay.w_out),
        out_specs=tok,
    )


def _explicit(mesh: Mesh) -> bool:
    return any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)


def _place(a, mesh: Mesh, spec: P):
    if is_quantized(a):  # both arrays split alike (the scale's blocks follow the values)
        return BlockQuantized(_place(a.values, mesh, spec), _place(a.scale, mesh, spec), a.block)
    sharding = NamedSharding(mesh, spec)
    if isinstance(a, jax.core.Tracer):
        if _explicit(mesh):
            return jax.sharding.reshard(a, sharding)
        return a  # under jit, shard_map reshards Auto-axis inputs itself
    if getattr(a, "sharding", None) == sharding:
        return a
    return jax.device_put(a, sharding)


def expert_parallel_moe(
    x: jax.Array,
    topk_ids: jax.Array,
    topk_weights: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    config: DispatchConfig | None = None,
    **settings,
) -> jax.Array:
    """Relay-free expert-parallel MoE (routed experts only).

    Args:
      x: ``[N, d]`` float tokens; split over the batch axes (N divisible by their total
        size), or, relay-free decode with ``N`` smaller than that size, the same on every
        device (:func:`replicates_tokens`; the output is then replicated too).
      topk_ids: ``[N, k]`` int global expert ids in ``[0, E)``, or ``-1`` for "no expert"
        (the choice adds nothing: DeepEP's and MaxText's padding), split like x. A token may
        repeat an expert: its choices of one expert add up.
      topk_weights: ``[N, k]`` routing weights, split like x.
      w_gate, w_up: ``[E, d, f]``; w_down: ``[E, f, d]``: split on E over the expert axis (and
        on f over the tensor axis if any), replicated over the other axes. Each may be a
        :class:`~moe_relayfree.quant.BlockQuantized` weight (FP8 values and block scales, split
        alike; a tensor axis must leave whole blocks on each rank): it stays quantized in
        memory and is dequantized to x's dtype where the experts read it (inference only).
      config: a :class:`~moe_relayfree.DispatchConfig` (mesh, axis roles, schedule,
        implementation, capacity factor, decode settings).
      **settings: its fields given directly (``mesh=..., schedule="decode"``), or changes to
        ``config``.

    Returns:
      ``[N, d]`` in x.dtype. Eager calls: with x's sharding when x is committed to devices,
      else split over the batch axes of the mesh (replicated on a mesh with Explicit axes, as
      under jit). Under jit: split over the batch axes (Explicit axes: resharded like x).
      A replicated small batch (:func:`replicates_tokens`) comes back replicated.
      Concrete ids outside ``[-1, E)`` raise ``ValueError``; traced ones (inside jit) turn
      their token's output row into NaN (no other token's row changes). ``N = 0`` gives ``[0, d]``.
    """
    config = dispatch_config(config, **settings)
    n = np.shape(x)[0] if np.ndim(x) == 2 and np.ndim(topk_ids) == 2 else 0
    k = np.shape(topk_ids)[1] if np.ndim(topk_ids) == 2 else 1
    return run_resolved(resolve(config, n, k), config, x, topk_ids, topk_weights,
                        w_gate, w_up, w_down)


def _refuse_vmap(*args) -> None:
    """``jax.vmap`` over the layer is refused with what to do: under jit it ended in a JAX
    internal error (``ragged_dot`` batching), and there is nothing to batch: every token is
    routed on its own, so a batch of token sets is one set of all their tokens."""
    from jax._src.interpreters.batching import BatchTracer

    if any(isinstance(leaf, BatchTracer) for leaf in jax.tree.leaves(args)):
        raise ValueError(
            "expert_parallel_moe / MoELayer do not take jax.vmap: routing is per token, so "
            "flatten the batch instead (x.reshape(-1, d), ids and weights .reshape(-1, k)) and "
            "reshape the output back; MoELayer already takes x [..., d] of any leading shape")


def run_resolved(resolved: Resolved, config: DispatchConfig, x, topk_ids, topk_weights,
                 w_gate, w_up, w_down) -> jax.Array:
    """:func:`expert_parallel_moe` with its path already chosen (:func:`resolve` of this
    call's ``N`` and ``k``): what :class:`~moe_relayfree.MoELayer` calls, so a layer trace
    decides its schedule once."""
    _refuse_vmap(x, topk_ids, topk_weights, w_gate, w_up, w_down)
    lay, mesh = config.layout, config.mesh
    n, k, num_experts = _validate(x, topk_ids, topk_weights, w_gate, w_up, w_down, lay,
                                  small_batch_ok=resolved.replicated)
    if n == 0:
        y = jnp.zeros(np.shape(x), jnp.result_type(x))
        return y if isinstance(x, jax.core.Tracer) else jax.device_put(y, lay.sharding(lay.tokens))
    fn = _sharded_fn(lay, resolved.path, resolved.call(config, num_experts), resolved.replicated,
                     registry.generation())
    token_spec = P() if resolved.replicated else lay.tokens
    args = [_place(a, mesh, token_spec) for a in (x, topk_ids, topk_weights)]
    args += [_place(a, mesh, spec) for a, spec in
             ((w_gate, lay.w_in), (w_up, lay.w_in), (w_down, lay.w_out))]
    return _call_like(fn, args, x, mesh)


def _call_like(fn, args, x, mesh: Mesh):
    """Runs the shard_map ``fn`` and places each output where the caller expects x's kind.

    Under jit: split over the batch axes (Explicit axes: resharded like x). Eagerly: a
    committed x says where the caller keeps its arrays; an uncommitted one (a numpy array, a
    fresh jnp array) says nothing, and the mesh placement combines with the caller's other
    mesh arrays where device 0 would clash with them. Explicit axes: as under jit, the
    output's sharding type is x's, which for an uncommitted x is replicated.
    """
    if any(isinstance(a, jax.core.Tracer) for a in args):
        y = fn(*args)
        if isinstance(x, jax.core.Tracer) and _explicit(mesh):
            like = NamedSharding(mesh, jax.typeof(x).sharding.spec)
            y = jax.tree.map(lambda a: jax.sharding.reshard(a, like), y)
        return y
    y = _jitted(fn)(*args)
    if isinstance(x, jax.Array) and x.committed:
        return jax.tree.map(lambda a: a if x.sharding == a.sharding else jax.device_put(a, x.sharding), y)
    if _explicit(mesh):
        return jax.device_put(y, NamedSharding(mesh, P()))
    return y


@functools.lru_cache(maxsize=256)
def _routing_fn(lay: MeshLayout, k: int, config: RouterConfig, with_bias: bool):
    def body(logits, *bias):
        return route(logits, k, config, *bias)

    tok = lay.tokens
    in_specs = (tok, P()) if with_bias else (tok,)
    return jax.shard_map(body, mesh=lay.mesh, in_specs=in_specs, out_specs=(tok, tok))


def route_tokens(
    logits: jax.Array,
    k: int,
    router: RouterConfig,
    bias: jax.Array | None = None,
    dispatch: DispatchConfig | None = None,
    **settings,
) -> tuple[jax.Array, jax.Array]:
    """:func:`~moe_relayfree.routing.route` with each device routing its own tokens.

    logits ``[N, E]`` split over the batch axes of ``dispatch`` (or of the layout ``settings``:
    ``mesh=``, ``axis=``, ...) like :func:`expert_parallel_moe`'s x (``N`` divisible by their
    total size; otherwise routed in the global view); bias ``[E]``.
    Returns (topk_ids ``[N, k] int32``, topk_weights ``[N, k] float32``), split the same way.

    Why: routing is row-wise, but XLA's SPMD partitioner does not split ``top_k`` over rows;
    on batch-split logits it all-gathers them first, so every device moves ``[N, E]`` (which
    grows with the number of devices: 42 MB per device per layer at EP320, 128 tokens per
    device, E=256, f32) and routes every token of the batch. Under ``shard_map`` it is local.
    """
    lay = dispatch_config(dispatch, **settings).layout
    n = logits.shape[0]
    if n == 0 or n % lay.num_token_shards:
        return route(logits, k, router, bias)
    fn = _routing_fn(lay, k, router, bias is not None)
    args = [_place(logits, lay.mesh, lay.tokens)]
    if bias is not None:
        args.append(_place(bias, lay.mesh, P()))
    return _call_like(fn, args, logits, lay.mesh)


@functools.lru_cache(maxsize=256)
def _jitted(fn):
    return jax.jit(fn)
