"""The tensors of a checkpoint folder, read piecewise through the ``safetensors`` package.

Names, shapes and dtypes come from the file headers (``safe_open``; nothing is read for them),
the file of each tensor from ``model.safetensors.index.json`` when the checkpoint is sharded.
:meth:`TensorIndex.read` reads one tensor or a slice of it (``get_slice``: only those bytes) and
counts the bytes, so a loader can prove it read only its share. bf16 comes through the package's
numpy reader once ``ml_dtypes`` is imported (it registers the dtype with numpy).
"""

from __future__ import annotations

import glob
import json
import os

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for the safetensors reader)
import numpy as np

INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    pass


class TensorIndex:
    """name -> (file, shape, dtype) of every tensor under ``folder``; slices read on demand."""

    def __init__(self, folder: str):
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
        if listed is not None:
            wrong = sorted(k for k, f in listed.items() if self.file.get(k) != f)
            if wrong:
                raise CheckpointError(f"{INDEX_FILE} places {len(wrong)} tensors in files that do not "
                                      f"hold them: {', '.join(wrong[:4])}")
        self.bytes_read = 0

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
        """Tensor ``name``, or the slice ``index`` of it (basic slices), as numpy."""
        piece = self._open(self.file[name]).get_slice(name)
        try:
            value = piece[index] if index else piece[:]
        except self._error as e:
            raise CheckpointError(f"{os.path.join(self.folder, self.file[name])}: cannot read "
                                  f"{name!r} ({e})") from None
        self.bytes_read += value.nbytes
        return value


def _numpy_dtype(name: str, key: str, file: str) -> np.dtype:
    table = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
             "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
             "BOOL": np.bool_}
    if name not in table:
        raise CheckpointError(f"{file}: tensor {key!r} has unsupported dtype {name}")
    return np.dtype(table[name])
