"""ONNX OneHot (opsets 9 and 11) as Relax, replacing TVM 0.27's converter.

TVM's converter passes a depth given as a one-element vector (ONNX allows a scalar or a
rank-1 tensor of one element; tf2onnx writes the latter) to `relax.op.one_hot` as a list, which
fails, and makes the output float64 whatever the type of `values`. This one reads depth of either
form and of any numeric type, gives the output the type of `values` ([off_value, on_value]),
casts non-integer indices to int64 as ONNX says, maps negative indices to index + depth, and
leaves indices outside [-depth, depth - 1] all off_value, as onnxruntime does; `axis` may be
negative. Depth must be a constant: it is the size of the output's new axis. Verified against
onnxruntime by tests/codegen/test_dynamic_shapes.py.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from graphopt.ir.errors import CodegenError

if TYPE_CHECKING:
    from tvm import relax


def one_hot(bb: relax.BlockBuilder, inputs: Sequence, attrs: dict[str, Any]) -> relax.Expr:
    """OneHot(indices, depth, values) -> output of values' type with a new axis of size depth."""
    import tvm
    from tvm import relax

    indices, depth, values = inputs[0], inputs[1], inputs[2]
    if not isinstance(depth, tvm.ir.GenericConst) or not isinstance(values, tvm.ir.GenericConst):
        raise CodegenError("OneHot's depth and values must be constants (initializers): the depth is "
                           "the size of the output's new axis, which graphopt fixes at compile time")
    size = depth.value.numpy().reshape(-1)
    if size.size != 1:
        raise CodegenError(f"OneHot's depth must hold one element, not {size.size}")
    size = int(size[0])
    off, on = values.value.numpy().reshape(-1)
    dtype = str(values.value.numpy().dtype)
    kind = str(indices.ty.dtype)
    if not kind.startswith(("int", "uint")):
        indices, kind = bb.normalize(relax.op.astype(indices, "int64")), "int64"
    if kind.startswith("int"):
        negative = relax.op.less(indices, relax.const(0, kind))
        indices = bb.normalize(relax.op.where(negative, relax.op.add(indices, relax.const(size, kind)), indices))
    return relax.op.one_hot(indices, relax.prim_value(on.item(), dtype), relax.prim_value(off.item(), dtype),
                            size, int(attrs.get("axis", -1)))


CONVERTERS: dict[str, Callable] = {"OneHot": one_hot}
