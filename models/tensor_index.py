"""The tensors of a checkpoint folder (safetensors files), read piecewise.

Names, shapes, dtypes and byte offsets come from the file headers (8 bytes of length, then
JSON; nothing else is read for them), the file of each tensor from
``model.safetensors.index.json`` when the checkpoint is sharded. :meth:`TensorIndex.read` reads
one tensor or a slice of it and counts the bytes copied, so a loader can prove it read only its
share. The bytes come from a memory map opened per read and dropped after the copy: only the
touched pages are read, and none stay mapped (the ``safetensors`` package's reader kept every
file mapped, and the pages it had read counted in the process's memory until the end of the
load: 2x the model at peak). Dtypes from ``ml_dtypes`` (bf16, FP8).

A block-quantized FP8 checkpoint (``quant``, :mod:`models.quant`) reads each quantized weight
dequantized: the values and the scales of the blocks under the slice, multiplied, in
``dequant_dtype``.
"""

from __future__ import annotations

import glob
import json
import os
import struct

import ml_dtypes
import numpy as np

from moe_relayfree_models import quant as fp8

INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    pass


class TensorIndex:
    """name -> (file, shape, dtype) of every tensor under ``folder``; slices read on demand."""

    def __init__(self, folder: str, quant: fp8.BlockFp8 | None = None, dequant_dtype=np.float32):
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
        self._offset: dict[str, int] = {}  # tensor: byte offset of its data in its file
        self.file: dict[str, str] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        self.dtype: dict[str, np.dtype] = {}
        for name in files:
            for key, (dtype, shape, offset) in _header(os.path.join(folder, name)).items():
                if key in self.file:
                    raise CheckpointError(f"tensor {key!r} appears in both {self.file[key]} and {name}")
                self.file[key] = name
                self.shape[key] = shape
                self.dtype[key] = _numpy_dtype(dtype, key, name)
                self._offset[key] = offset
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

    def read_stored(self, name: str, index: tuple = ()) -> np.ndarray:
        """Tensor ``name`` (or a slice) as stored: an FP8 weight's values, not dequantized."""
        return self._read(name, index)

    def _read(self, name: str, index: tuple) -> np.ndarray:
        path, offset = os.path.join(self.folder, self.file[name]), self._offset[name]
        if self.nbytes(name) == 0:  # mmap cannot map zero bytes
            value = np.zeros(self.shape[name], self.dtype[name])[index]
            return value
        try:
            data = np.memmap(path, dtype=self.dtype[name], mode="r", offset=offset,
                             shape=self.shape[name])
            value = np.array(data[index] if index else data)
        except (ValueError, IndexError, TypeError) as e:
            raise CheckpointError(f"{path}: cannot read {name!r} ({e})") from None
        del data  # unmapped now, not at the end of the load
        self.bytes_read += value.nbytes
        return value


def _header(path: str) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """name -> (safetensors dtype name, shape, absolute byte offset of its data) of one file,
    from its header: 8 bytes of header length, the JSON header, then the data."""
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if not 0 < length <= os.path.getsize(path) - 8:
                raise ValueError(f"header length {length}")
            header = json.loads(fh.read(length))
        base, size = 8 + length, os.path.getsize(path)
        out = {}
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            if not 0 <= begin <= end <= size - base:
                raise ValueError(f"tensor {key!r} lies past the end of the file")
            out[key] = (entry["dtype"], tuple(int(n) for n in entry["shape"]), base + begin)
        return out
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None


def _numpy_dtype(name: str, key: str, file: str) -> np.dtype:
    table = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
             "F8_E4M3": ml_dtypes.float8_e4m3fn,
             "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
             "BOOL": np.bool_}
    if name not in table:
        raise CheckpointError(f"{file}: tensor {key!r} has unsupported dtype {name}")
    return np.dtype(table[name])
