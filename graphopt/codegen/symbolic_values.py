"""The values of small integer tensors as symbolic expressions, for shapes computed at run time.

An exporter computes a Reshape's new shape, a Tile's repeats or a ConstantOfShape's shape with
tensor ops: `Concat(Slice(Shape(x)), ReduceProd(...), [2])`, `Concat([1], max_count, [1])`. Where the
tensor it reads has a shape only known at run time (after NonZero, or a Range whose length is
an input's value), TVM's frontend carries these as tensors, and the op that takes them as a shape
gets a shape of fresh unknowns: a dimension that is 2 in every run is then symbolic, and the
broadcasts and Squeezes after it cannot be checked at import.

`values` reads back through the Relax expressions that computed such a tensor (constants,
`shape_to_tensor` of a tensor's shape, casts between integer types, concat, 1-D slices and
takes, reshapes, products, sums, extrema and elementwise integer arithmetic) and returns each
element as a `PrimExpr` where the computation determines it, `None` where only the run does (a
value read from the data). `as_shape` turns the tensor into a `relax.ShapeExpr` of those values
and of fresh variables for the unknown ones, bound by a `match_cast` that the VM checks at run
time: the known elements are asserted, never assumed. Verified against onnxruntime by
tests/codegen/test_dynamic_shapes.py.
"""
from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tvm import relax

# Tensors longer than this are not shapes; they are not traced.
MAX_ELEMENTS = 16

Values = list  # list[tirx.PrimExpr | None]


def values(bb: relax.BlockBuilder, expr: relax.Expr) -> Values | None:
    """The elements of the integer tensor (scalar or 1-D) `expr` in row-major order, each a
    `PrimExpr` (int64) where its computation determines it and None where it does not; None
    when `expr` is not such a tensor or its length is not static."""
    from tvm import sym

    found = _trace(bb, expr)
    if found is None:
        return None
    analyzer = sym.Analyzer()
    return [None if e is None else analyzer.simplify(e) for e in found]


def as_shape(bb: relax.BlockBuilder, tensor: relax.Expr, prefix: str) -> relax.ShapeExpr:
    """The 1-D integer tensor `tensor` (of static length) as a shape: its known elements as
    computed, the others as fresh variables named after `prefix`, checked at run time."""
    from tvm import relax

    elements = values(bb, tensor)
    if elements is None:
        raise ValueError(f"a shape must be a 1-D integer tensor of static length, not {tensor.ty}")
    if all(e is not None for e in elements):
        return relax.ShapeExpr(elements)
    return relax.ShapeExpr(bind(bb, tensor, elements, prefix))


def bind(bb: relax.BlockBuilder, tensor: relax.Expr, elements: Values, prefix: str) -> list:
    """`elements` with a fresh variable for each None, all bound to the run-time values of the
    1-D integer `tensor` by a `match_cast`: the VM defines the variables and checks the rest."""
    from tvm import relax, tirx

    dims = [tirx.Var(f"{prefix}_{i}", "int64") if e is None else e for i, e in enumerate(elements)]
    if str(tensor.ty.dtype) != "int64":
        tensor = bb.normalize(relax.op.astype(tensor, "int64"))
    shape = bb.emit(relax.op.tensor_to_shape(tensor))
    bb.match_cast(shape, relax.ShapeType(dims))
    return dims


def _length(expr) -> int | None:
    from tvm import relax, tirx

    ty = getattr(expr, "ty", None)
    if not isinstance(ty, relax.TensorType) or not str(ty.dtype).startswith(("int", "uint")):
        return None
    if ty.ndim == 0:
        return 1
    if ty.ndim != 1 or not isinstance(ty.shape, relax.ShapeExpr):
        return None
    n = ty.shape.values[0]
    return int(n) if isinstance(n, tirx.IntImm) and int(n) <= MAX_ELEMENTS else None


def _trace(bb, expr) -> Values | None:
    """`expr`'s elements, None for each one its computation does not determine; None when
    `expr` is not a vector (or scalar) of static length. Only those are traced: an axis of a
    matrix is not an element order."""
    length = _length(expr)
    if length is None:
        return None
    found = _derive(bb, expr)
    return found if found is not None and len(found) == length else [None] * length


def _derive(bb, expr) -> Values | None:
    import tvm
    from tvm import relax

    if isinstance(expr, relax.Var):
        bound = _binding(bb, expr)
        return None if bound is None else _trace(bb, bound)
    if isinstance(expr, tvm.ir.GenericConst):
        return _constant(expr)
    if not isinstance(expr, relax.Call) or not hasattr(expr.op, "name"):
        return None
    rule = _RULES.get(expr.op.name)
    return rule(bb, expr) if rule is not None else None


def _binding(bb, var):
    try:
        return bb.lookup_binding(var)
    except Exception:  # noqa: BLE001 - a function parameter or a var of another scope has none
        return None


def _constant(const) -> Values | None:
    from tvm import tirx

    array = const.value.numpy()
    if array.dtype.kind not in "iu" or array.size > MAX_ELEMENTS:
        return None
    return [tirx.IntImm("int64", int(v)) for v in array.reshape(-1)]


def _shape_elements(shape) -> Values | None:
    """The elements of a shape value: a ShapeExpr, or anything whose type records them."""
    from tvm import relax

    if isinstance(shape, relax.ShapeExpr):
        return list(shape.values)
    ty = getattr(shape, "ty", None)
    if isinstance(ty, relax.ShapeType) and ty.values is not None:
        return list(ty.values)
    if isinstance(shape, relax.Call) and getattr(shape.op, "name", "") == "relax.shape_of":
        arg_ty = shape.args[0].ty
        if isinstance(arg_ty, relax.TensorType) and isinstance(arg_ty.shape, relax.ShapeExpr):
            return list(arg_ty.shape.values)
    return None


def _same_values(bb, call) -> Values | None:
    return _trace(bb, call.args[0])


def _integer_cast(bb, call) -> Values | None:
    # Shape values fit every integer type exporters cast them to (int32 in tf2onnx's graphs).
    return _trace(bb, call.args[0]) if str(call.attrs.dtype).startswith(("int", "uint")) else None


def _concat(bb, call) -> Values | None:
    parts = [_trace(bb, f) for f in call.args[0].fields]
    if any(p is None for p in parts):
        return None
    return [e for p in parts for e in p]


def _slice(bb, call) -> Values | None:
    found = _trace(bb, call.args[0])
    axes, begin, end, strides = ([int(v) for v in t.fields] for t in call.args[1:5])
    # Python's slice clamps as ONNX does for positive steps (not for negative ones' ends).
    if found is None or axes != [0] or strides[0] < 1:
        return None
    return found[slice(begin[0], end[0], strides[0])]


def _take(bb, call) -> Values | None:
    import tvm

    found, indices = _trace(bb, call.args[0]), call.args[1]
    if found is None or not isinstance(indices, tvm.ir.GenericConst):
        return None
    n = len(found)
    return [found[int(i) % n] for i in indices.value.numpy().reshape(-1)]


def _reduction(combine: Callable) -> Callable:
    def rule(bb, call) -> Values | None:
        found = _trace(bb, call.args[0])
        if not found or any(e is None for e in found):
            return None
        return [functools.reduce(combine, found)]

    return rule


def _elementwise(combine: Callable) -> Callable:
    def rule(bb, call) -> Values | None:
        a, b = _trace(bb, call.args[0]), _trace(bb, call.args[1])
        if a is None or b is None or (len(a) != len(b) and 1 not in (len(a), len(b))):
            return None
        n = max(len(a), len(b))
        a, b = (a * n if len(a) == 1 else a), (b * n if len(b) == 1 else b)
        return [None if x is None or y is None else combine(x, y) for x, y in zip(a, b)]

    return rule


def _shape_to_tensor(bb, call) -> Values | None:
    return _shape_elements(call.args[0])


def _min(a, b):
    from tvm import tirx

    return tirx.min(a, b)


def _max(a, b):
    from tvm import tirx

    return tirx.max(a, b)


def _floordiv(a, b):
    from tvm import tirx

    return tirx.floordiv(a, b)


_RULES: dict[str, Callable] = {
    "relax.astype": _integer_cast,
    "relax.shape_to_tensor": _shape_to_tensor,
    "relax.concat": _concat,
    "relax.strided_slice": _slice,
    "relax.take": _take,
    "relax.reshape": _same_values,
    "relax.expand_dims": _same_values,
    "relax.squeeze": _same_values,
    "relax.flatten": _same_values,
    "relax.prod": _reduction(operator.mul),
    "relax.sum": _reduction(operator.add),
    "relax.max": _reduction(_max),
    "relax.min": _reduction(_min),
    "relax.add": _elementwise(operator.add),
    "relax.subtract": _elementwise(operator.sub),
    "relax.multiply": _elementwise(operator.mul),
    "relax.floor_divide": _elementwise(_floordiv),
    "relax.maximum": _elementwise(_max),
    "relax.minimum": _elementwise(_min),
}
