"""The lookup table of an ai.onnx.ml LabelEncoder or CategoryMapper node, in numpy.

Read from the node's attributes in either form graphopt meets them (onnx's, or TVM's frontend's
parsed dict, whose lists are tuples): LabelEncoder opset 1 (`classes_strings`: a string maps to
its index, an index to its string), opsets 2 and 3 (`keys_*` and `values_*` of int64, float or
string, one default per value type) and 4 (also `keys_tensor`, `values_tensor`,
`default_tensor`); CategoryMapper (`cats_strings` and `cats_int64s`, either way). Defaults are
ONNX's: -1, -0.0 and "_Unused". Where a key repeats, its first value is the one kept, as
onnxruntime keeps it. Strings are Python `str` (UTF-8 decoded). Verified against onnxruntime by
tests/codegen/test_host_encoders.py.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from graphopt.ir.errors import CodegenError

OPS = frozenset({"LabelEncoder", "CategoryMapper"})
DOMAIN = "ai.onnx.ml"
STRING_KIND = "string"  # Table.value_dtype of string values
_DEFAULT_NAMES = {"int64": "default_int64", "float32": "default_float", "string": "default_string"}
_ONNX_DEFAULTS = {"int64": -1, "float32": -0.0, "string": "_Unused"}


@dataclass(frozen=True)
class Table:
    """keys[i] maps to values[i]; any other input to default. Strings are object arrays of str."""
    keys: np.ndarray
    values: np.ndarray
    default: Any

    @property
    def value_dtype(self) -> str:
        """"string" or the numpy name of the values' type."""
        return STRING_KIND if self.values.dtype == object else str(self.values.dtype)


def node_attributes(node: onnx.NodeProto) -> dict[str, Any]:
    """`node`'s attributes by name, as values."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def table(op_type: str, attrs: Mapping[str, Any], strings_in: bool) -> Table:
    """The table of a LabelEncoder or CategoryMapper with attributes `attrs`, whose input holds
    strings when `strings_in` (else numbers). CodegenError when the attributes give no table."""
    if op_type == "CategoryMapper" or "classes_strings" in attrs:
        return _indexed(op_type, attrs, strings_in)
    keys = _first(attrs, ("keys_strings", "keys_int64s", "keys_floats", "keys_tensor"))
    values = _first(attrs, ("values_strings", "values_int64s", "values_floats", "values_tensor"))
    if keys is None or values is None:
        raise CodegenError(f"{op_type} has no keys_* or values_* attribute")
    keys, values = _array(*keys), _array(*values)
    if len(keys) != len(values):
        raise CodegenError(f"{op_type} has {len(keys)} keys and {len(values)} values")
    return _unique(keys, values, _default(attrs, values))


def _indexed(op_type: str, attrs: Mapping[str, Any], strings_in: bool) -> Table:
    """LabelEncoder opset 1 and CategoryMapper: strings and their int64 indices, either way."""
    if op_type == "CategoryMapper":
        strings = _strings(attrs.get("cats_strings", ()))
        numbers = np.asarray(attrs.get("cats_int64s", ()), np.int64)
    else:
        strings = _strings(attrs["classes_strings"])
        numbers = np.arange(len(strings), dtype=np.int64)
    if len(strings) != len(numbers):
        raise CodegenError(f"{op_type} has {len(strings)} strings and {len(numbers)} numbers")
    if strings_in:
        return _unique(strings, numbers, np.int64(attrs.get("default_int64", -1)))
    return _unique(numbers, strings, _text(attrs.get("default_string", "_Unused")))


def _first(attrs: Mapping[str, Any], names: tuple[str, ...]) -> tuple[str, Any] | None:
    return next(((n, attrs[n]) for n in names if n in attrs), None)


def _array(name: str, value) -> np.ndarray:
    if name.endswith("_tensor"):
        array = numpy_helper.to_array(value).reshape(-1)
        return _strings(array) if array.dtype == object else array
    if name.endswith("_strings"):
        return _strings(value)
    return np.asarray(value, np.int64 if name.endswith("_int64s") else np.float32)


def _default(attrs: Mapping[str, Any], values: np.ndarray):
    kind = "string" if values.dtype == object else str(values.dtype)
    if "default_tensor" in attrs:
        array = numpy_helper.to_array(attrs["default_tensor"]).reshape(-1)
        return _text(array[0]) if kind == "string" else values.dtype.type(array[0])
    if kind == "string":
        return _text(attrs.get("default_string", _ONNX_DEFAULTS["string"]))
    name = _DEFAULT_NAMES.get(kind)
    if name is None:  # values_tensor of another type: ONNX's default by kind
        return values.dtype.type(-1 if values.dtype.kind in "iu" else -0.0)
    return values.dtype.type(attrs.get(name, _ONNX_DEFAULTS[kind]))


def _unique(keys: np.ndarray, values: np.ndarray, default) -> Table:
    """Only the first value of a repeated key."""
    seen: dict = {}
    for i, k in enumerate(keys.tolist()):
        seen.setdefault(k, i)
    kept = np.asarray(sorted(seen.values()), np.int64)
    return Table(keys[kept], values[kept], default)


def _strings(values) -> np.ndarray:
    out = np.empty(len(values), dtype=object)  # not np.asarray: it would make a "<U" array
    out[:] = [_text(v) for v in values]
    return out


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
