"""Shapes that only the run knows (NonZero, a Range as long as an input's value), carried through
import so that TVM can compile the ops after them.

TVM 0.27 legalizes an op only when every tensor it reads has a shape of (possibly symbolic)
dimensions; its frontend leaves some results with a rank and no dimensions, refuses to broadcast
two symbolic dimensions it cannot prove equal, and reshapes or tiles by a computed tensor into
fresh unknowns. graphopt's importer calls two hooks around every op it converts:

- `broadcast_operands` (before): where an elementwise op with ONNX multidirectional broadcasting
  reads symbolic dimensions that import cannot prove equal or 1, each operand is broadcast to
  the dimension that is not 1 (what ONNX's rule yields for valid inputs) by a kernel that
  reads index 0 of a dimension that is 1 at run time; a `match_cast` checks at run time that each
  such dimension is 1 or that one, as onnxruntime rejects other inputs. Models whose shapes
  import proves (every static model) are untouched.
- `settle` (after): a result with a rank and no dimensions gets fresh symbolic ones, bound from
  the run by a `match_cast`; a shape value (the frontend's form of a Shape's result) that an op
  the frontend takes none for reads (ReduceProd of a sliced Shape) becomes the int64 tensor ONNX
  says it is.

`CONVERTERS` adds Reshape, Tile and ConstantOfShape for a shape or repeats computed at run
time: the tensor's values are read back symbolically (`symbolic_values`), so that a dimension
computed from constants and shapes stays known (`Reshape(x, Concat(ReduceProd(Shape(x)[:2]),
[2]))` keeps its 2) and only values read from data are fresh variables. Constant shapes and repeats convert as
TVM converts them. Verified against onnxruntime by tests/codegen/test_dynamic_shapes.py.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any

import onnx

from graphopt.codegen import symbolic_values

if TYPE_CHECKING:
    from tvm import relax

# ONNX's elementwise ops with multidirectional broadcasting of all their tensor inputs.
BROADCASTING = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Sum", "Mean", "Equal", "Less", "Greater",
    "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Where", "BitShift", "BitwiseAnd", "BitwiseOr",
    "BitwiseXor", "PRelu",
})
# The ops TVM 0.27's frontend hands a shape value (Shape's result) to; any other refuses one.
SHAPE_READERS = frozenset({"Reshape", "Resize", "ConstantOfShape", "Gather", "Slice", "Shape", "Expand", "Concat",
                           "Equal", "Where", "Cast", "CastLike", "Squeeze"})
# TVM's converters take no params here: graphopt imports weights as constants.
_NO_PARAMS = ({}, {})


def broadcast_operands(bb: relax.BlockBuilder, op_type: str, inputs: list) -> list:
    """`inputs`, with the tensors of a broadcasting op whose symbolic dimensions import cannot
    relate broadcast to their common shape (see the module docstring); else `inputs` itself."""
    if op_type not in BROADCASTING:
        return inputs
    tensors = [i for i, x in enumerate(inputs) if _dims(x) is not None]
    if len(tensors) < 2:
        return inputs
    target = _common_shape([_dims(inputs[i]) for i in tensors])
    if target is None:
        return inputs
    _check_broadcastable(bb, [_dims(inputs[i]) for i in tensors], target)
    out = list(inputs)
    for i in tensors:
        out[i] = _broadcast(bb, inputs[i], target)
    return type(inputs)(out)  # the frontend's list type, which reads absent inputs as None


def settle(bb: relax.BlockBuilder, expr, readers: Collection[str]):
    """`expr` in the form the ops of types `readers` that read it can take: a tensor with a rank
    and no dimensions bound to fresh ones, a shape value read by an op the frontend takes no
    shape value for (ReduceProd of a sliced Shape) as the tensor ONNX says it is."""
    from tvm import relax, tirx

    ty = getattr(expr, "ty", None)
    if isinstance(ty, relax.ShapeType) and not set(readers) <= SHAPE_READERS:
        return bb.normalize(relax.op.shape_to_tensor(expr))
    if not isinstance(ty, relax.TensorType) or isinstance(ty.shape, relax.ShapeExpr) or ty.ndim < 0:
        return expr
    dims = [tirx.Var(f"dim{i}", "int64") for i in range(ty.ndim)]
    return bb.match_cast(expr, relax.TensorType(dims, ty.dtype))


def readers(graph: onnx.GraphProto) -> dict[str, set[str]]:
    """Each tensor name of `graph` -> the op types of the nodes that read it."""
    out: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, set()).add(node.op_type)
    return out


def reshape(bb: relax.BlockBuilder, inputs: Sequence, attrs: dict[str, Any]) -> relax.Expr:
    """ONNX Reshape; a new shape computed at run time keeps the elements import can derive."""
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend

    data, shape = inputs[0], inputs[1]
    if not _runtime_tensor(shape) or _dims(data) is None:
        return onnx_frontend.Reshape._impl_v13(bb, inputs, attrs, _NO_PARAMS)
    elements = symbolic_values.values(bb, shape)
    if elements is None:  # not a vector of static length: TVM's converter says why
        return onnx_frontend.Reshape._impl_v13(bb, inputs, attrs, _NO_PARAMS)
    copy_zeros = not int(attrs.get("allowzero", 0))
    dims = _resolved(elements, _dims(data), copy_zeros)
    if any(d is None for d in dims):
        dims = symbolic_values.bind(bb, _reshape_tensor(bb, data, shape, copy_zeros), dims, "reshape")
    return relax.op.reshape(data, relax.ShapeExpr(dims))


def tile(bb: relax.BlockBuilder, inputs: Sequence, attrs: dict[str, Any]) -> relax.Expr:
    """ONNX Tile; repeats computed at run time keep the elements import can derive."""
    from tvm import te, tirx
    from tvm.relax.frontend.onnx import onnx_frontend

    data, repeats = inputs[0], inputs[1]
    dims = _dims(data)
    if not _runtime_tensor(repeats) or dims is None:
        return onnx_frontend.Tile._impl_v13(bb, inputs, attrs, _NO_PARAMS)
    reps = symbolic_values.as_shape(bb, repeats, "tile").values
    if len(reps) != len(dims):
        raise ValueError(f"Tile repeats has {len(reps)} elements for an input of rank {len(dims)}")

    def compute(x):
        out = [d * r for d, r in zip(x.shape, reps)]
        return te.compute(out, lambda *i: x[tuple(tirx.floormod(j, d) for j, d in zip(i, x.shape))], name="tile")

    return bb.emit_te(compute, data)


def constant_of_shape(bb: relax.BlockBuilder, inputs: Sequence, attrs: dict[str, Any]) -> relax.Expr:
    """ONNX ConstantOfShape; a shape computed at run time keeps the elements import can derive."""
    from tvm.relax.frontend.onnx import onnx_frontend

    shape = inputs[0]
    if _runtime_tensor(shape) and symbolic_values.values(bb, shape) is not None:
        shape = symbolic_values.as_shape(bb, shape, "shape")
    return onnx_frontend.ConstantOfShape._impl_v9(bb, [shape], attrs, _NO_PARAMS)


CONVERTERS: dict[str, Callable] = {"Reshape": reshape, "Tile": tile, "ConstantOfShape": constant_of_shape}


def _dims(x) -> list | None:
    from tvm import relax

    ty = getattr(x, "ty", None)
    if isinstance(x, relax.ShapeExpr) or not isinstance(ty, relax.TensorType):
        return None
    return list(ty.shape.values) if isinstance(ty.shape, relax.ShapeExpr) else None


def _runtime_tensor(x) -> bool:
    import tvm
    from tvm import relax

    return (x is not None and not isinstance(x, tvm.ir.GenericConst | relax.ShapeExpr)
            and isinstance(getattr(x, "ty", None), relax.TensorType))


# -- broadcasting ------------------------------------------------------------------------------
def _common_shape(shapes: list[list]) -> list | None:
    """The broadcast shape of `shapes` when some aligned dimensions are symbolic and cannot be
    related at import (`_broadcast_dim` there); None when import can broadcast them itself."""
    from tvm import sym, tirx

    analyzer = sym.Analyzer()
    rank = max(len(s) for s in shapes)
    target, unrelated = [], False
    for k in range(rank):
        column = [s[k - rank + len(s)] for s in shapes if k - rank + len(s) >= 0]
        others = [d for d in column if not _is_one(d)]
        distinct = []
        for d in others:
            if not any(analyzer.can_prove_equal(d, e) for e in distinct):
                distinct.append(d)
        if len(distinct) > 1 and not all(isinstance(d, tirx.IntImm) for d in distinct):
            unrelated = True
        target.append(_broadcast_dim(distinct) if distinct else tirx.IntImm("int64", 1))
    return target if unrelated else None


def _check_broadcastable(bb, shapes: list[list], target: list) -> None:
    """A run-time check that each dimension is 1 or the target's, as ONNX requires."""
    from tvm import relax, sym, tirx

    analyzer = sym.Analyzer()
    one, zero = tirx.IntImm("int64", 1), tirx.IntImm("int64", 0)
    checks = []
    for shape in shapes:
        for d, t in zip(shape, target[len(target) - len(shape):]):
            ok = analyzer.simplify(tirx.Select(tirx.Or(tirx.EQ(d, one), tirx.EQ(d, t)), one, zero))
            if isinstance(ok, tirx.IntImm) and int(ok) == 0:
                raise ValueError(f"cannot broadcast shapes {shapes}: dimension {d} is neither 1 nor {t}")
            if not isinstance(ok, tirx.IntImm):
                checks.append(ok)
    if checks:
        # The VM computes a shape value it binds before it checks it: emitted, then matched.
        flags = bb.emit(relax.ShapeExpr(checks))
        bb.match_cast(flags, relax.ShapeType([one] * len(checks)))


def _broadcast(bb, x, target: list):
    """`x` with each dimension that may differ from `target`'s expanded to it."""
    from tvm import te, tirx

    dims = _dims(x)
    own = target[len(target) - len(dims):]
    if all(_is_one(d) or d.same_as(t) for d, t in zip(dims, own)):
        return x

    def compute(t):
        zero = tirx.IntImm("int64", 0)
        return te.compute(own, lambda *i: t[tuple(
            j if d.same_as(e) else tirx.Select(d == 1, zero, j) for j, d, e in zip(i, t.shape, own))],
            name="broadcast")

    return bb.emit_te(compute, x)


def _is_one(d) -> bool:
    from tvm import tirx

    return isinstance(d, tirx.IntImm) and int(d) == 1


def _broadcast_dim(dims: list):
    """What ONNX broadcasting makes of `dims` when they are valid: the one that is not 1 (0
    included, which max would miss), else 1."""
    from tvm import tirx

    out = dims[0]
    for d in dims[1:]:
        out = tirx.Select(tirx.EQ(out, tirx.IntImm("int64", 1)), d, out)
    return out


# -- reshape -----------------------------------------------------------------------------------
def _resolved(elements: list, data_dims: list, copy_zeros: bool) -> list:
    """The new shape's elements with ONNX's 0 (copy the input's dimension, unless allowzero) and
    -1 (what the others leave) applied where import knows them; None elsewhere."""
    from tvm import sym, tirx

    out = []
    for i, e in enumerate(elements):
        if e is not None and isinstance(e, tirx.IntImm) and int(e) == 0 and copy_zeros:
            e = data_dims[i] if i < len(data_dims) else None
        out.append(e)
    inferred = [i for i, e in enumerate(out) if isinstance(e, tirx.IntImm) and int(e) == -1]
    if inferred:
        others = [e for i, e in enumerate(out) if i != inferred[0]]
        total = _product(data_dims)
        out[inferred[0]] = None if any(e is None for e in others) else sym.Analyzer().simplify(
            tirx.floordiv(total, _product(others)))
    return out


def _reshape_tensor(bb, data, shape, copy_zeros: bool):
    """The new shape with 0 and -1 applied at run time, an int64 tensor."""
    from tvm import relax

    s = bb.normalize(relax.op.astype(shape, "int64"))
    n, rank = int(s.ty.shape.values[0]), len(_dims(data))
    have = bb.normalize(relax.op.shape_to_tensor(relax.op.shape_of(data)))
    if copy_zeros:
        positions = relax.const([min(i, rank - 1) for i in range(n)], "int64")
        s = bb.normalize(relax.op.where(relax.op.equal(s, relax.const(0, "int64")),
                                        relax.op.take(have, positions, axis=0), s))
    infer = relax.op.equal(s, relax.const(-1, "int64"))
    known = relax.op.prod(relax.op.where(infer, relax.const(1, "int64"), s))
    return bb.normalize(relax.op.where(infer, relax.op.floor_divide(relax.op.prod(have), known), s))


def _product(dims: list):
    from tvm import tirx

    out = tirx.IntImm("int64", 1)
    for d in dims:
        out = out * d
    return out
