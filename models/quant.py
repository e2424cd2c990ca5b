"""Block-quantized FP8 checkpoints (DeepSeek-V3's and Qwen3's official ones), dequantized while
they are read.

``config.json``: ``quantization_config = {"quant_method": "fp8", "fmt": "e4m3",
"activation_scheme": "dynamic", "weight_block_size": [bo, bi]}``. Each quantized linear weight
``W [..., out, in]`` is stored as ``float8_e4m3fn`` with a float32 companion
``<name>_scale_inv [..., ceil(out / bo), ceil(in / bi)]``, and ``W = fp8 * scale_inv`` block by
block (edge blocks partial). Embeddings, ``lm_head``, norms, the router and its score bias stay
unquantized (they have no companion). Only ``dynamic`` activation scaling is accepted: the
activations are not quantized here, and a ``static`` checkpoint's input scales would be
meaningless.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np

SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = (np.dtype(ml_dtypes.float8_e4m3fn),)
_F32_OF_BYTE = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class BlockFp8:
    """``weight_block_size`` of a block-quantized FP8 checkpoint: ``(bo, bi)`` rows x columns."""

    block: tuple[int, int]


def parse_quantization(config: dict | None) -> BlockFp8 | None:
    """``quantization_config`` -> :class:`BlockFp8`, or None when the checkpoint is not
    quantized; ``ValueError`` naming the field for anything this loader cannot read."""
    if config is None:
        return None
    if not isinstance(config, dict):
        raise ValueError(f"config.json quantization_config must be an object, got {config!r}")
    method = config.get("quant_method")
    if method != "fp8":
        raise ValueError(f"config.json quantization_config.quant_method={method!r} is not "
                         "supported (block-quantized 'fp8' checkpoints are)")
    fmt = config.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"config.json quantization_config.fmt={fmt!r} is not supported (e4m3 is)")
    scheme = config.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise ValueError(f"config.json quantization_config.activation_scheme={scheme!r} is not "
                         "supported (dynamic is: activations are not quantized here)")
    block = config.get("weight_block_size")
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and b > 0 for b in block)):
        raise ValueError(f"config.json quantization_config.weight_block_size must be two "
                         f"positive ints [rows, columns], got {block!r}")
    return BlockFp8(tuple(block))


def scale_shape(shape: tuple[int, ...], quant: BlockFp8) -> tuple[int, ...]:
    """The ``_scale_inv`` shape of a weight of ``shape`` (blocks over its last two dims)."""
    bo, bi = quant.block
    return tuple(shape[:-2]) + (-(-shape[-2] // bo), -(-shape[-1] // bi))


def _block_range(piece: slice, size: int, block: int) -> tuple[slice, int, int]:
    """The blocks an element slice touches: (block slice, first element's offset into its
    block, element count)."""
    start, stop, step = piece.indices(size)
    if step != 1:
        raise ValueError("quantized tensors are read with unit-step slices only")
    first = start // block
    return slice(first, -(-stop // block)), start - first * block, stop - start


def dequantize(read_fp8, read_scale, shape: tuple[int, ...], index: tuple, quant: BlockFp8,
               dtype) -> np.ndarray:
    """``W[index]`` in ``dtype`` from its FP8 values and block scales.

    read_fp8(index) / read_scale(index) read slices of the stored tensors; index: basic
    slices, one per leading dim at most (the rest whole). Only the blocks under the slice are
    read; a block's scale multiplies its values in float32, then one rounding to ``dtype``.
    """
    full = tuple(index) + (slice(None),) * (len(shape) - len(index))
    lead, (rows, cols) = full[:-2], full[-2:]
    row_blocks, row_off, n_rows = _block_range(rows, shape[-2], quant.block[0])
    col_blocks, col_off, n_cols = _block_range(cols, shape[-1], quant.block[1])
    raw = np.asarray(read_fp8(full))
    values = _F32_OF_BYTE[raw.view(np.uint8)]  # a 256-entry table: 2x ml_dtypes' cast
    scales = np.asarray(read_scale(lead + (row_blocks, col_blocks)), np.float32)
    bo, bi = quant.block
    if row_off == col_off == 0 and n_rows % bo == 0 and n_cols % bi == 0:
        # whole blocks (the usual read): one broadcast multiply, no expanded scales
        blocks = values.reshape(*values.shape[:-2], n_rows // bo, bo, n_cols // bi, bi)
        blocks *= scales[..., :, None, :, None]
        return blocks.reshape(values.shape).astype(dtype)
    scales = np.repeat(np.repeat(scales, bo, axis=-2), bi, axis=-1)
    scales = scales[..., row_off:row_off + n_rows, col_off:col_off + n_cols]
    return (values * scales).astype(dtype)


def quantizable(name: str) -> bool:
    """Whether a tensor of a Hugging Face MoE checkpoint is one the official FP8 checkpoints
    quantize: every ``*_proj`` linear (attention, dense and shared MLPs, routed experts, fused
    expert stacks); not embeddings, ``lm_head``, norms or the router."""
    return name.endswith("_proj.weight") or name.endswith(("experts.gate_up_proj", "experts.down_proj"))


def quantize(weight: np.ndarray, quant: BlockFp8) -> tuple[np.ndarray, np.ndarray]:
    """``weight [..., out, in]`` -> (``float8_e4m3fn`` values, float32 ``scale_inv`` per block):
    each block scaled so its largest magnitude is e4m3's largest finite value, 448. For test
    fixtures and benchmarks (the official checkpoints come quantized)."""
    bo, bi = quant.block
    w = np.asarray(weight, np.float32)
    *lead, rows, cols = w.shape
    pad = [(0, 0)] * len(lead) + [(0, -rows % bo), (0, -cols % bi)]
    blocks = np.pad(w, pad).reshape(*lead, -(-rows // bo), bo, -(-cols // bi), bi)
    scale = np.abs(blocks).max(axis=(-3, -1)) / 448.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    full = np.repeat(np.repeat(scale, bo, axis=-2), bi, axis=-1)[..., :rows, :cols]
    return (w / full).astype(ml_dtypes.float8_e4m3fn), scale


def quantize_checkpoint(src: str, dst: str, block: tuple[int, int] = (128, 128)) -> dict:
    """Writes ``dst``: the checkpoint folder ``src`` with every :func:`quantizable` tensor
    block-quantized to FP8 (:func:`quantize`), the others and the tokenizer files as they are,
    and ``quantization_config`` in its ``config.json``: the official FP8 checkpoints' format,
    for benchmarks and tests of a model whose FP8 release is not on this machine. Reads the
    whole model into memory (small models). Returns ``{"tensors", "quantized", "bytes"}``."""
    import json
    import os
    import shutil

    from safetensors.numpy import save_file

    from moe_relayfree_models.tensor_index import TensorIndex

    index = TensorIndex(src)
    q = BlockFp8(tuple(block))
    out, quantized = {}, 0
    for name in index.file:
        value = index.read(name)
        if quantizable(name) and value.ndim >= 2:
            out[name], out[name + SCALE_SUFFIX] = quantize(value, q)
            quantized += 1
        else:
            out[name] = value
    os.makedirs(dst, exist_ok=True)
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as fh:
        config = json.load(fh)
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                     "activation_scheme": "dynamic", "weight_block_size": list(block)}
    with open(os.path.join(dst, "config.json"), "w") as fh:
        json.dump(config, fh, indent=1)
    for extra in os.listdir(src):
        if extra.startswith("tokenizer") or extra == "generation_config.json":
            shutil.copy(os.path.join(src, extra), os.path.join(dst, extra))
    return {"tensors": len(out), "quantized": quantized, "bytes": sum(v.nbytes for v in out.values())}
