"""Cheap, explicit checks of the common ops' attributes and shapes, run when a model is loaded.

onnx.checker validates the file's structure but not what a node's attributes and inputs mean
together; onnxruntime finds those faults later, in a message of C++ text. These checks run first
and say `FILE: node 'N' (Op): what is wrong` (ModelError, exit 2): opsets newer than onnxruntime
implements, a declared input type the op does not accept, Conv/ConvTranspose/Pool attributes
(kernel_shape, strides, dilations > 0, pads of 2 x spatial non-negative entries, weight rank ==
input rank), Reshape to a constant shape (one -1 at most, element count kept when the input's
shape is static), Gemm/MatMul ranks and inner dims where known. Unknown shapes pass: the check is
only as strong as what the file declares, and onnxruntime's own message stays the fallback.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from graphopt.ir.errors import ModelError

# Constant shape operands larger than this are not read (a Reshape target has a handful of dims).
MAX_SHAPE_CONSTANT = 64
_DEFAULT = ("", "ai.onnx")
# Declared types checked against the op's schema; newer ones (float8, float6, int4, ...) are left to
# onnxruntime, whose support for them runs ahead of and behind the schemas.
_CHECKED_TYPES = frozenset(getattr(onnx.TensorProto, n) for n in (
    "FLOAT", "DOUBLE", "FLOAT16", "BFLOAT16", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32",
    "UINT64", "BOOL", "STRING"))


@functools.lru_cache(maxsize=1)
def runtime_opsets() -> dict[str, int]:
    """The newest opset onnxruntime implements per domain ('' for ai.onnx), from its schemas."""
    from onnxruntime.capi import _pybind_state

    latest: dict[str, int] = {}
    for schema in _pybind_state.get_all_operator_schema():
        domain = "" if schema.domain == "ai.onnx" else schema.domain
        latest[domain] = max(latest.get(domain, 0), schema.since_version)
    return latest


def check(path: Path, model: onnx.ModelProto) -> None:
    """ModelError for the first node fault found; see the module docstring."""
    _check_opsets(path, model)
    version = next((o.version for o in model.opset_import if o.domain in _DEFAULT), None)
    _check_graph(path, model.graph, version, {})


def _check_opsets(path: Path, model: onnx.ModelProto) -> None:
    import onnxruntime

    latest = runtime_opsets()
    for o in model.opset_import:
        domain = "" if o.domain == "ai.onnx" else o.domain
        name = o.domain or "ai.onnx"
        if o.version < 1 and domain in ("", "ai.onnx.ml"):
            raise ModelError(path, f"opset {o.version} of domain '{name}' is not a valid version")
        if domain in latest and o.version > latest[domain]:
            raise ModelError(path, f"opset {o.version} of domain '{name}' is newer than onnxruntime "
                             f"{onnxruntime.__version__} supports (max {latest[domain]})")


class _Scope:
    """What the file declares about one graph's tensors: shapes (dims as int or None), element
    types, and the values of small integer constants."""

    def __init__(self, graph: onnx.GraphProto, outer: _Scope | None):
        self.shapes: dict[str, tuple | None] = dict(outer.shapes) if outer else {}
        self.types: dict[str, int] = dict(outer.types) if outer else {}
        self.values: dict[str, np.ndarray] = dict(outer.values) if outer else {}
        for vi in list(graph.input) + list(graph.value_info):
            t = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
            if t is None:
                continue
            if t.elem_type:
                self.types[vi.name] = t.elem_type
            if t.HasField("shape"):
                self.shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
        for init in graph.initializer:
            self.shapes[init.name] = tuple(init.dims)
            self.types[init.name] = init.data_type
            self._keep_value(init.name, init)
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in _DEFAULT and node.output:
                for a in node.attribute:
                    if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                        self.shapes[node.output[0]] = tuple(a.t.dims)
                        self._keep_value(node.output[0], a.t)

    def _keep_value(self, name: str, t: onnx.TensorProto) -> None:
        if (t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) and math.prod(t.dims) <= MAX_SHAPE_CONSTANT
                and t.data_location != onnx.TensorProto.EXTERNAL):
            try:
                self.values[name] = numpy_helper.to_array(t)
            except (ValueError, TypeError):
                pass  # a malformed tensor was refused already, or onnxruntime will say

    def shape(self, name: str) -> tuple | None:
        return self.shapes.get(name) if name else None


def _check_graph(path: Path, graph: onnx.GraphProto, version: int | None, outer_scope: dict) -> None:
    scope = _Scope(graph, outer_scope.get("scope"))
    for node in graph.node:
        if node.domain in _DEFAULT:
            fault = _fault(node, scope, version)
            if fault:
                raise ModelError(path, fault, node.name or node.op_type, op=node.op_type)
        for a in node.attribute:
            subgraphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for g in subgraphs:
                _check_graph(path, g, version, {"scope": scope})


def _fault(node: onnx.NodeProto, scope: _Scope, version: int | None) -> str | None:
    fault = _input_types(node, scope, version)
    if fault:
        return fault
    check = _CHECKS.get(node.op_type)
    return check(node, scope) if check else None


def _input_types(node: onnx.NodeProto, scope: _Scope, version: int | None) -> str | None:
    """A graph input or initializer whose declared element type the op's schema does not allow."""
    if version is None:
        return None
    try:
        schema = onnx.defs.get_schema(node.op_type, version, "")
    except onnx.defs.SchemaError:
        return None  # not an op of this opset: onnx.checker or onnxruntime says so
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    formal = list(schema.inputs)
    for i, name in enumerate(node.input):
        if not name or scope.types.get(name) not in _CHECKED_TYPES or not formal:
            continue
        param = formal[min(i, len(formal) - 1)]
        if i >= len(formal) and param.option != onnx.defs.OpSchema.FormalParameterOption.Variadic:
            continue
        types = allowed.get(param.type_str, {param.type_str})
        have = f"tensor({_type_name(scope.types[name])})"
        if have not in types and not any(t.startswith(("seq", "optional")) for t in types):
            accepted = ", ".join(sorted(t.removeprefix("tensor(").removesuffix(")") for t in types))
            return f"input '{name}' is declared {have[7:-1]}, which {node.op_type} does not take (takes {accepted})"
    return None


def _type_name(elem_type: int) -> str:
    try:
        return onnx.helper.tensor_dtype_to_string(elem_type).removeprefix("TensorProto.").lower()
    except (ValueError, KeyError):
        return f"type {elem_type}"


def _ints(node: onnx.NodeProto, name: str) -> list[int] | None:
    for a in node.attribute:
        if a.name == name:
            return list(a.ints)
    return None


def _int(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return a.i
    return default


def _spatial_attrs(node: onnx.NodeProto, spatial: int | None) -> str | None:
    """kernel_shape, strides and dilations: positive, one per spatial dim; pads: 2 per spatial dim,
    not negative."""
    for name in ("kernel_shape", "strides", "dilations"):
        values = _ints(node, name)
        if values is None:
            continue
        if any(v <= 0 for v in values):
            return f"{name} {values} must be positive"
        if spatial is not None and len(values) != spatial:
            return f"{name} {values} has {len(values)} entries for {spatial} spatial dims"
    pads = _ints(node, "pads")
    if pads is not None:
        if any(p < 0 for p in pads):
            return f"pads {pads} must not be negative"
        if spatial is not None and len(pads) != 2 * spatial:
            return f"pads {pads} has {len(pads)} entries; {spatial} spatial dims need {2 * spatial}"
        if spatial is None and len(pads) % 2:
            return f"pads {pads} has an odd number of entries; it needs a begin and an end per spatial dim"
    return None


def _conv(node: onnx.NodeProto, scope: _Scope) -> str | None:
    x = scope.shape(node.input[0]) if node.input else None
    w = scope.shape(node.input[1]) if len(node.input) > 1 else None
    if x is not None and len(x) < 3:
        return f"input '{node.input[0]}' has rank {len(x)}; {node.op_type} needs [N, C, spatial...] (rank 3 or more)"
    if x is not None and w is not None and len(w) != len(x):
        return (f"weight '{node.input[1]}' has rank {len(w)} but input '{node.input[0]}' has rank {len(x)}: a "
                f"{len(x) - 2}-D convolution needs a rank-{len(x)} weight")
    spatial = len(x) - 2 if x is not None else (len(w) - 2 if w is not None and len(w) >= 3 else None)
    fault = _spatial_attrs(node, spatial)
    if fault:
        return fault
    group = _int(node, "group", 1)
    if group <= 0:
        return f"group {group} must be positive"
    kernel = _ints(node, "kernel_shape")
    if kernel is not None and w is not None and len(w) >= 3 and all(d is not None for d in w[2:]) \
            and list(w[2:]) != kernel:
        return f"kernel_shape {kernel} does not match weight '{node.input[1]}' of shape {list(w)}"
    if node.op_type == "Conv" and x is not None and w is not None and x[1] and w[1] is not None \
            and x[1] != w[1] * group:
        return (f"input '{node.input[0]}' has {x[1]} channels but weight '{node.input[1]}' {list(w)} with group "
                f"{group} takes {w[1] * group}")
    return None


def _pool(node: onnx.NodeProto, scope: _Scope) -> str | None:
    x = scope.shape(node.input[0]) if node.input else None
    if x is not None and len(x) < 3:
        return f"input '{node.input[0]}' has rank {len(x)}; {node.op_type} needs [N, C, spatial...] (rank 3 or more)"
    if _ints(node, "kernel_shape") is None:
        return "kernel_shape is required"
    return _spatial_attrs(node, len(x) - 2 if x is not None else len(_ints(node, "kernel_shape")))


def _reshape(node: onnx.NodeProto, scope: _Scope) -> str | None:
    if len(node.input) < 2 or node.input[1] not in scope.values:
        return None
    target = scope.values[node.input[1]]
    if target.ndim != 1:
        return f"shape '{node.input[1]}' is {target.ndim}-D; Reshape takes a 1-D shape"
    target = [int(v) for v in target]
    if target.count(-1) > 1:
        return f"shape {target} has more than one -1"
    if any(v < -1 for v in target):
        return f"shape {target} has a dim below -1"
    x = scope.shape(node.input[0])
    allowzero = _int(node, "allowzero", 0)
    if x is None or any(d is None for d in x):
        return None
    if allowzero and 0 in target and -1 in target:
        return f"shape {target} has both 0 and -1 with allowzero=1"
    dims = [x[i] if v == 0 and not allowzero and i < len(x) else v for i, v in enumerate(target)]
    if not allowzero and any(v == 0 and i >= len(x) for i, v in enumerate(target)):
        return f"shape {target}: a 0 copies a dim the input {list(x)} does not have"
    have = math.prod(x)
    known = math.prod(d for d in dims if d != -1)
    if -1 in dims:
        if (known == 0 and have != 0) or (known and have % known):
            return f"input '{node.input[0]}' of shape {list(x)} ({have} elements) cannot be reshaped to {target}"
    elif known != have:
        return f"input '{node.input[0]}' of shape {list(x)} ({have} elements) cannot be reshaped to {target} " \
               f"({known} elements)"
    return None


def _matmul(node: onnx.NodeProto, scope: _Scope) -> str | None:
    if len(node.input) < 2:
        return None
    a, b = scope.shape(node.input[0]), scope.shape(node.input[1])
    for name, s in ((node.input[0], a), (node.input[1], b)):
        if s is not None and len(s) == 0:
            return f"input '{name}' is a scalar; MatMul needs rank 1 or more"
    if a is None or b is None:
        return None
    k_a, k_b = a[-1], (b[-2] if len(b) >= 2 else b[0])
    if k_a is not None and k_b is not None and k_a != k_b:
        return f"inner dims differ: '{node.input[0]}' {list(a)} and '{node.input[1]}' {list(b)} ({k_a} != {k_b})"
    return None


def _gemm(node: onnx.NodeProto, scope: _Scope) -> str | None:
    if len(node.input) < 2:
        return None
    a, b = scope.shape(node.input[0]), scope.shape(node.input[1])
    for name, s in ((node.input[0], a), (node.input[1], b)):
        if s is not None and len(s) != 2:
            return f"input '{name}' has rank {len(s)}; Gemm takes 2-D A and B"
    if a is None or b is None:
        return None
    k_a = a[0] if _int(node, "transA", 0) else a[1]
    k_b = b[1] if _int(node, "transB", 0) else b[0]
    if k_a is not None and k_b is not None and k_a != k_b:
        return (f"inner dims differ: A '{node.input[0]}' {list(a)} and B '{node.input[1]}' {list(b)} with transA="
                f"{_int(node, 'transA', 0)}, transB={_int(node, 'transB', 0)} ({k_a} != {k_b})")
    return None


_CHECKS = {
    "Conv": _conv, "ConvTranspose": _conv,
    "MaxPool": _pool, "AveragePool": _pool, "LpPool": _pool,
    "Reshape": _reshape, "MatMul": _matmul, "Gemm": _gemm,
}
