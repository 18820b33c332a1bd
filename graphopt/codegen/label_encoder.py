"""ai.onnx.ml LabelEncoder on numbers (int64, float or double keys and values) as Relax.

A LabelEncoder that reads strings runs on the host (`host_encoders`); one that reads numbers and
yields numbers is compiled: the table's keys are sorted at import, each input element's position
among them is found by binary search (`relax.op.bucketize`, log2 of the table's size in
comparisons), and the value there is taken where the key equals the element, the default
elsewhere. A NaN key (opset 4 matches NaN inputs to it, as onnxruntime does) is applied by
`isnan`, since NaN has no place in a sorted order. The table is `label_tables.table`'s: opsets
2-4, the first value of a repeated key, ONNX's defaults. A table whose values are strings is
refused (TVM holds no strings). Verified against onnxruntime by tests/codegen/test_host_encoders.py.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from graphopt.codegen import label_tables
from graphopt.ir.errors import CodegenError

if TYPE_CHECKING:
    from tvm import relax


def label_encoder(bb: relax.BlockBuilder, inputs: Sequence, attrs: dict[str, Any]) -> relax.Expr:
    """LabelEncoder(X) of numbers: the values of X's keys, the default for any other element."""
    from tvm import relax

    x = inputs[0]
    dtype = str(x.ty.dtype)
    table = label_tables.table("LabelEncoder", attrs, strings_in=False)
    if table.value_dtype == label_tables.STRING_KIND:
        raise CodegenError("LabelEncoder maps numbers to strings, which TVM cannot hold; graphopt compiles "
                           "lookups into numbers, and runs string lookups only at a model's inputs, on the host")
    keys = table.keys.astype(dtype)
    values = table.values
    default = _const(np.asarray(table.default, values.dtype))
    nan = np.isnan(keys) if keys.dtype.kind == "f" else np.zeros(len(keys), bool)
    out = _sorted_lookup(bb, x, keys[~nan], values[~nan], default)
    if nan.any():
        nan_value = _const(np.asarray(values[nan][0], values.dtype))
        out = bb.normalize(relax.op.where(relax.op.isnan(x), nan_value, out))
    return out


def _sorted_lookup(bb, x, keys: np.ndarray, values: np.ndarray, default):
    """values[i] where x == keys[i], else default; keys are distinct."""
    from tvm import relax

    if len(keys) == 0:
        return bb.normalize(relax.op.broadcast_to(default, x.ty.shape))
    order = np.argsort(keys, kind="stable")
    keys, values = _const(keys[order]), _const(values[order])
    # bucketize: the first position whose key is >= x, len(keys) past the end; clipped to the last.
    position = bb.normalize(relax.op.bucketize(x, keys))
    position = bb.normalize(relax.op.minimum(position, relax.const(len(order) - 1, "int64")))
    found = relax.op.equal(relax.op.take(keys, position, axis=0), x)
    return bb.normalize(relax.op.where(found, relax.op.take(values, position, axis=0), default))


def _const(array: np.ndarray):
    from tvm import relax

    # With its dtype named: relax.const makes float64 arrays float32 otherwise.
    return relax.const(array, str(array.dtype))


CONVERTERS: dict[str, Callable] = {"LabelEncoder": label_encoder}
