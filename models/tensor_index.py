"""The tensors of a checkpoint folder, read piecewise through the ``safetensors`` package.

Names, shapes and dtypes come from the file headers (``safe_open``; nothing is read for them),
the file of each tensor from ``model.safetensors.index.json`` when the checkpoint is sharded.
:meth:`TensorIndex.read` reads one tensor or a slice of it (``get_slice``: only those bytes) and
counts the bytes, so a loader can prove it read only its share. bf16 comes through the package's
numpy reader once ``ml_dtypes`` is imported (it registers the dtype with numpy); FP8, which that
reader does not know, is read from a memory map of the file (only the touched pages).

A block-quantized FP8 checkpoint (``quant``, :mod:`models.quant`) reads each quantized weight
dequantized: the values and the scales of the blocks under the slice, multiplied, in
``dequant_dtype``.
"""

from __future__ import annotations

import glob
import json
import os
import struct

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for the safetensors reader)
import numpy as np

from moe_relayfree_models import quant as fp8

INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    pass


class TensorIndex:
    """name -> (file, shape, dtype) of every tensor under ``folder``; slices read on demand."""

    def __init__(self, folder: str, quant: fp8.BlockFp8 | None = None, dequant_dtype=np.float32):
        try:
            from safetensors import SafetensorError, safe_open
        except ImportError:
            raise ImportError("reading checkpoints needs the 'safetensors' package: "
                              "pip install safetensors") from None
        self._safe_open, self._error = safe_open, SafetensorError
        self.folder = folder
        index_path = os.path.join(folder, INDEX_FILE)
        listed: dict[str, str] | None = None
        if os.path.exists(index_path):
            with open(index_path) as fh:
                listed = json.load(fh).get("weight_map")
            if not isinstance(listed, dict):
                raise CheckpointError(f"{index_path} has no weight_map")
            files = sorted(set(listed.values()))
            for name in files:
                if not os.path.exists(os.path.join(folder, name)):
                    raise CheckpointError(f"{INDEX_FILE} lists {name}, which is not in {folder}")
        else:
            files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*.safetensors")))
        if not files:
            raise CheckpointError(f"no *.safetensors files in {folder}")
        self._handles: dict[str, object] = {}
        self._raw: dict[str, tuple[str, int]] = {}  # FP8 tensors: (file, byte offset)
        self.file: dict[str, str] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        self.dtype: dict[str, np.dtype] = {}
        for name in files:
            handle = self._open(name)
            for key in handle.keys():
                if key in self.file:
                    raise CheckpointError(f"tensor {key!r} appears in both {self.file[key]} and {name}")
                piece = handle.get_slice(key)
                self.file[key] = name
                self.shape[key] = tuple(piece.get_shape())
                self.dtype[key] = _numpy_dtype(piece.get_dtype(), key, name)
            if any(self.dtype[k] in fp8.FP8_DTYPES for k in handle.keys()):
                self._raw.update(_data_offsets(os.path.join(folder, name)))
        if listed is not None:
            wrong = sorted(k for k, f in listed.items() if self.file.get(k) != f)
            if wrong:
                raise CheckpointError(f"{INDEX_FILE} places {len(wrong)} tensors in files that do not "
                                      f"hold them: {', '.join(wrong[:4])}")
        self.bytes_read = 0
        self.quant, self.dequant_dtype = quant, np.dtype(dequant_dtype)
        if quant is None:
            stray = sorted(k for k in self.file if self.dtype[k] in fp8.FP8_DTYPES)
            if stray:
                raise CheckpointError(f"{len(stray)} float8 tensors (e.g. {stray[0]!r}) but config.json "
                                      "has no quantization_config")
        else:
            self._check_scales()

    def _check_scales(self) -> None:
        for name in self.file:
            if self.dtype[name] not in fp8.FP8_DTYPES:
                continue
            scale = name + fp8.SCALE_SUFFIX
            if scale not in self.file:
                raise CheckpointError(f"float8 tensor {name!r} has no {scale!r}")
            want = fp8.scale_shape(self.shape[name], self.quant)
            if self.shape[scale] != want:
                raise CheckpointError(
                    f"{scale!r} has shape {self.shape[scale]}, expected {want} for {name!r} "
                    f"{self.shape[name]} in blocks of {list(self.quant.block)}")

    def quantized(self, name: str) -> bool:
        """Whether ``name`` is stored in FP8 with block scales (read dequantized)."""
        return self.quant is not None and self.dtype.get(name) in fp8.FP8_DTYPES

    def companions(self, name: str) -> tuple[str, ...]:
        """The tensors stored for ``name`` besides itself: its block scales, if quantized."""
        return (name + fp8.SCALE_SUFFIX,) if self.quantized(name) else ()

    def _open(self, name: str):
        if name not in self._handles:
            path = os.path.join(self.folder, name)
            try:
                self._handles[name] = self._safe_open(path, framework="numpy")
            except (self._error, OSError) as e:
                raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
        return self._handles[name]

    def __contains__(self, name: str) -> bool:
        return name in self.file

    def nbytes(self, name: str) -> int:
        return int(np.prod(self.shape[name], dtype=np.int64)) * self.dtype[name].itemsize

    def read(self, name: str, index: tuple = ()) -> np.ndarray:
        """Tensor ``name``, or the slice ``index`` of it (basic slices), as numpy; a quantized
        weight dequantized to ``dequant_dtype``."""
        if self.quantized(name):
            return fp8.dequantize(lambda i: self._read(name, i),
                                  lambda i: self._read(name + fp8.SCALE_SUFFIX, i),
                                  self.shape[name], index, self.quant, self.dequant_dtype)
        return self._read(name, index)

    def _read(self, name: str, index: tuple) -> np.ndarray:
        if name in self._raw:
            file, offset = self._raw[name]
            data = np.memmap(os.path.join(self.folder, file), dtype=self.dtype[name], mode="r",
                             offset=offset, shape=self.shape[name])
            value = np.array(data[index] if index else data)
            self.bytes_read += value.nbytes
            return value
        piece = self._open(self.file[name]).get_slice(name)
        try:
            value = piece[index] if index else piece[:]
        except self._error as e:
            raise CheckpointError(f"{os.path.join(self.folder, self.file[name])}: cannot read "
                                  f"{name!r} ({e})") from None
        self.bytes_read += value.nbytes
        return value


def _data_offsets(path: str) -> dict[str, tuple[str, int]]:
    """name -> (file name, absolute byte offset) of the tensors of one safetensors file, from
    its header: 8 bytes of header length, the JSON header, then the data."""
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    base, file = 8 + length, os.path.basename(path)
    return {k: (file, base + v["data_offsets"][0]) for k, v in header.items() if k != "__metadata__"}


def _numpy_dtype(name: str, key: str, file: str) -> np.dtype:
    table = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
             "F8_E4M3": ml_dtypes.float8_e4m3fn,
             "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
             "BOOL": np.bool_}
    if name not in table:
        raise CheckpointError(f"{file}: tensor {key!r} has unsupported dtype {name}")
    return np.dtype(table[name])
