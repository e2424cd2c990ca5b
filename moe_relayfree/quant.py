"""Block-quantized expert weights: FP8 values with one float32 scale per block, kept so on the
devices and dequantized where the expert compute reads them.

The format of DeepSeek-V3's and Qwen3's official FP8 checkpoints: ``W = values * scale`` block by
block, ``values`` in ``float8_e4m3fn``, blocks of ``(rows, cols)`` over the last two dims (edge
blocks partial). An expert stack ``[E, d, f]`` in FP8 is half its bf16 bytes (plus
``4 / (rows * cols)`` bytes per weight of scales: 1/4096 at 128 x 128).

Where the dequantization happens (:mod:`moe_relayfree.experts`): the CPU kernel dequantizes one
expert's matrices inside its loop over the experts that received rows (an empty expert's weights
are not read, as in bf16); ``ragged_dot`` (GPU, TPU) and registered kernels get the rank's local
stack dequantized to the activations' dtype once per layer call, a temporary of one layer's
local experts. Inference only: no gradient flows into quantized weights.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0  # e4m3's largest finite value


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockQuantized:
    """A block-quantized weight (stack).

    values ``[..., r, c] float8_e4m3fn``; scale ``[..., ceil(r / br), ceil(c / bc)] float32``;
    block ``(br, bc)`` (static). The weight it stands for is ``values * scale`` per block, its
    shape ``values.shape``. A pytree: jit, shard_map and device_put take it (a sharding spec
    given for it applies to both arrays, which have the same rank).
    """

    values: jax.Array
    scale: jax.Array
    block: tuple[int, int] = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def ndim(self) -> int:
        return len(self.values.shape)

    def __getitem__(self, index) -> BlockQuantized:
        """An index into the leading (stack) dims only: ``w[e]`` is expert ``e``'s matrix."""
        return BlockQuantized(self.values[index], self.scale[index], self.block)

    def dequantize(self, dtype) -> jax.Array:
        """``values * scale`` per block, multiplied in float32 and rounded once to ``dtype``
        (the checkpoint loader's rule)."""
        return dequantize_blocks(self.values, self.scale, self.block, dtype)


def dequantize_blocks(values: jax.Array, scale: jax.Array, block: tuple[int, int], dtype) -> jax.Array:
    """values ``[..., r, c]``, scale ``[..., ceil(r/br), ceil(c/bc)]`` -> ``[..., r, c]`` dtype."""
    *lead, r, c = values.shape
    br, bc = block
    v = values.astype(jnp.float32)
    # The scales are widened along the columns only (a small [..., r/br, c] array); the rows
    # take them by broadcasting over a [r/br, br, c] view of the values, whose merge back to
    # [r, c] keeps the minor dim (no relayout). Broadcasting a [r/br, br, c/bc, bc] view
    # instead made XLA:TPU write the scales out at the weights' full size in f32 (56 MiB per
    # DeepSeek-V3 expert matrix) where the dequantization fuses into the dot.
    columns = jnp.repeat(scale, bc, axis=-1)[..., :c]
    if r % br == 0:
        rows = v.reshape(*lead, r // br, br, c) * columns[..., :, None, :]
        return rows.reshape(v.shape).astype(dtype)
    return (v * jnp.repeat(columns, br, axis=-2)[..., :r, :]).astype(dtype)


def block_scaled_dot(x: jax.Array, w: BlockQuantized) -> jax.Array:
    """``x [n, r] @ W [r, c]`` -> ``[n, c] float32`` for a block-quantized ``W``, without
    dequantizing it: one dot per block of ``br`` contraction rows, over the FP8 values widened
    to x's dtype (exact), each block's partial sums scaled by its row of scales in float32 and
    summed (the way block-FP8 GEMMs promote per block; the scales never take the weights'
    shape). Rounds less than dequantizing to x's dtype first: the scaled weights are never
    rounded to it.
    """
    n, r = x.shape
    br, bc = w.block
    c = w.shape[-1]
    values = w.values.astype(x.dtype)
    if r % br:  # a partial last block: zero rows of x and W complete it
        x = jnp.pad(x, ((0, 0), (0, -r % br)))
        values = jnp.pad(values, ((0, -r % br), (0, 0)))
    blocks = values.shape[0] // br
    partial = jnp.einsum("nbk,bkc->bnc", x.reshape(n, blocks, br), values.reshape(blocks, br, c),
                         preferred_element_type=jnp.float32)
    columns = jnp.repeat(w.scale, bc, axis=-1)[:, :c]  # [blocks, c]: small
    return jnp.sum(partial * columns[:, None, :], axis=0)


def quantize(weight: jax.Array, block: tuple[int, int] = (128, 128)) -> BlockQuantized:
    """``weight [..., r, c]`` -> :class:`BlockQuantized`: each block scaled so its largest
    magnitude is e4m3's largest finite value (an all-zero block gets scale 1). For random
    initialisation, tests and benchmarks; checkpoints come quantized. No reshape of ``weight``
    (an array on a mesh with Explicit axes could not be reshaped without naming a sharding)."""
    br, bc = block
    w = jnp.asarray(weight, jnp.float32)
    *lead, r, c = w.shape
    ones = (1,) * len(lead)
    amax = lax.reduce_window(jnp.abs(w), -jnp.inf, lax.max, ones + (br, bc), ones + (br, bc),
                             [(0, 0)] * len(lead) + [(0, -r % br), (0, -c % bc)])
    scale = jnp.where(amax > 0, amax / FP8_MAX, 1.0).astype(jnp.float32)
    full = jnp.take(jnp.take(scale, jnp.arange(r) // br, axis=-2), jnp.arange(c) // bc, axis=-1)
    return BlockQuantized((w / full).astype(FP8), scale, (br, bc))


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """The scale's shape for a weight of ``shape`` in blocks of ``block``."""
    return tuple(shape[:-2]) + (-(-shape[-2] // block[0]), -(-shape[-1] // block[1]))


def is_quantized(w) -> bool:
    return isinstance(w, BlockQuantized)


INFERENCE_ONLY = ("FP8 experts (BlockQuantized weights) are inference only: no gradient flows "
                  "through them. Train with float expert weights (MoELayer without "
                  "expert_block) and quantize afterwards (MoELayer.quantize_experts).")


def _refuse(_, cotangent):
    raise ValueError(INFERENCE_ONLY)


def inference_only_call(fn, *args):
    """``fn(*args)``, with reverse-mode differentiation refused (:data:`INFERENCE_ONLY`): the
    FP8 kernels' loops have no derivative, and inside a custom VJP they are never
    differentiated (a gradient used to fail there with a message about while loops)."""
    call = jax.custom_vjp(fn)
    call.defvjp(lambda *a: (fn(*a), None), _refuse)
    return call(*args)


def as_dtype(w, dtype) -> jax.Array:
    """A weight in ``dtype``: a :class:`BlockQuantized` one dequantized (inference only), an
    array cast."""
    if is_quantized(w):
        return inference_only_call(lambda q: q.dequantize(dtype), w)
    return w.astype(dtype)


def shape_of(w) -> tuple[int, ...]:
    """The shape of an array, an abstract value or a :class:`BlockQuantized` weight."""
    return w.shape if is_quantized(w) else tuple(np.shape(w))


def check_split(name: str, shape: tuple[int, ...], block: tuple[int, int], dim: int,
                parts: int) -> None:
    """``ValueError`` unless splitting dim ``dim`` of a weight of ``shape`` in blocks of
    ``block`` into ``parts`` equal pieces keeps whole blocks on each piece (its scale can then
    be split the same way)."""
    size, width = shape[dim], block[dim - len(shape) + 2]
    if parts > 1 and (size % parts or (size // parts) % width):
        raise ValueError(f"{name}: dim {dim} of size {size} split over {parts} devices must give "
                         f"each a whole number of its {width}-wide blocks")


__all__ = ["BlockQuantized", "FP8", "as_dtype", "block_scaled_dot", "check_split", "dequantize_blocks", "is_quantized",
           "quantize", "scale_shape", "shape_of"]
