"""External data: where a tensor's bytes live beside its model, checked before anything is read,
and read as memory-mapped views rather than copies.

A 3 GB model saved the standard way keeps its weights in a file beside the `.onnx`. Reading them
into the ModelProto and then into numpy held every weight two or three times over; a view of a
copy-on-write mapping costs only the pages a pass actually reads, which the kernel can drop again,
and a pass that writes into a weight gets private pages while the file stays as it was.
"""
from __future__ import annotations

import math
import mmap
import os
from pathlib import Path

import numpy as np
import onnx

from graphopt.ir.errors import ModelError


def info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def check(path: Path, t: onnx.TensorProto, label: str, nbytes: int) -> None:
    """Refuse external data outside the model's folder, behind a link, missing, or of the wrong
    size; `path` is the model file, `nbytes` the size the tensor's type and dims declare."""
    fields = info(t)
    if any(isinstance(x, bytes) for x in (*fields, *fields.values())):
        raise ModelError(path, f"{label} has external data fields that are not valid UTF-8")
    location = fields.get("location", "")
    target = _external_file(path, label, location)
    size = target.stat().st_size
    offset = _external_int(path, label, fields, "offset", 0)
    # onnx reads to the end of the file when no length is given.
    length = _external_int(path, label, fields, "length", max(size - offset, 0))
    if length != nbytes:
        raise ModelError(path, f"{label} declares {nbytes} bytes but its external data in "
                         f"'{location}' is {length} bytes")
    if offset + length > size:
        raise ModelError(path, f"{label} reads bytes {offset}..{offset + length} of '{location}', "
                         f"past its end at {size}")


def _external_file(path: Path, label: str, location: str) -> Path:
    if not location:
        raise ModelError(path, f"{label} has external data with no location")
    root = path.parent.resolve()
    try:
        # resolve() follows symlinks, so a link pointing outside the folder is refused too.
        target = (root / location).resolve()
    except (OSError, ValueError, RuntimeError):
        raise ModelError(path, f"{label} has an invalid external data location {location!r}") from None
    if os.path.isabs(location) or not target.is_relative_to(root):
        raise ModelError(path, f"{label} has external data at '{location}', outside the model's folder")
    if (root / location).is_symlink():
        # onnx refuses to read through a link even when it stays inside the folder.
        raise ModelError(path, f"{label} has external data at '{location}', which is a symbolic link")
    if not target.exists():
        raise ModelError(path, f"{label} has external data file '{location}' which does not exist")
    if not target.is_file():
        raise ModelError(path, f"{label} has external data at '{location}', which is not a file")
    return target


def _external_int(path: Path, label: str, fields: dict[str, str], key: str, default: int) -> int:
    if key not in fields:
        return default
    try:
        value = int(fields[key])
    except ValueError:
        value = -1
    if value < 0:
        raise ModelError(path, f"{label} has an invalid external data {key} {fields[key]!r}")
    return value


class Mapped:
    """Numpy views of the external data of a model's tensors, one mapping per data file.

    Only for tensors `check` accepted and whose type numpy holds natively. The views keep their
    mapping alive; nothing needs closing."""

    def __init__(self, model_path: Path):
        self.root = model_path.parent.resolve()
        self.files: dict[str, mmap.mmap] = {}

    def array(self, t: onnx.TensorProto) -> np.ndarray:
        fields = info(t)
        # ONNX stores tensors little-endian whatever the machine.
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).newbyteorder("<")
        shape = tuple(t.dims)
        count = math.prod(shape)
        if count == 0:
            return np.zeros(shape, dtype)
        offset = int(fields.get("offset", 0))
        view = np.frombuffer(self._file(fields["location"]), dtype, count, offset).reshape(shape)
        # A misaligned view would be slow for numpy and unsafe for onnxruntime's kernels.
        return view.copy() if offset % dtype.itemsize else view

    def _file(self, location: str) -> mmap.mmap:
        if location not in self.files:
            with open(self.root / location, "rb") as f:
                # ACCESS_COPY: writes go to private pages, never back to the user's file.
                self.files[location] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self.files[location]
