"""ONNX Clip (opsets 1-13), Max and Min as Relax maximum and minimum, replacing TVM 0.27's
converters.

TVM's Clip converter emits TOPI kernels (`emit_te`) with scalar bounds, and its Max and Min stack
their broadcast inputs and reduce over the stack; ConvertLayout and `transpose_sinking` see
through neither. In channels-last builds every ReLU6 (MobileNet's Clip(0, 6); `lower-int8`
writes it as Max and Min) then becomes a kernel of its own between two transposes back to NCHW
instead of the convolution's epilogue: 11.8 of an int8 MobileNetV2's 20.7 ms. These emit
Relax's maximum and minimum, constant operands reshaped to the data's rank so that their layout
converts with it. As in onnxruntime, a missing or NaN Clip bound is no bound (a NaN constant is
dropped; a bound computed at run time is replaced by -inf/+inf where it is NaN). Verified against
onnxruntime by tests/codegen/test_cpu_schedules.py.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from tvm import relax


def clip(bb: relax.BlockBuilder, inputs: Sequence, attrs: dict[str, Any]) -> relax.Expr:
    """Clip(x, [min], [max]) (opset 11+), or Clip(x) with min and max attributes (before 11)."""
    from tvm import relax

    x = inputs[0]
    bounds = list(inputs[1:3]) + [None] * (3 - len(inputs))
    for i, name in ((0, "min"), (1, "max")):
        if bounds[i] is None and name in attrs:
            bounds[i] = relax.const(np.float32(attrs[name]), str(x.ty.dtype))
    for bound, op, unbounded in ((bounds[0], relax.op.maximum, "-inf"), (bounds[1], relax.op.minimum, "inf")):
        bound = _bound(bb, bound, len(x.ty.shape.values), unbounded)
        if bound is not None:
            x = bb.normalize(op(x, bound))
    return x


def _bound(bb, bound, rank: int, unbounded: str):
    """The bound ready to broadcast against data of `rank`; None when there is none."""
    import tvm
    from tvm import relax

    if bound is None:
        return None
    dtype = str(bound.ty.dtype)
    if isinstance(bound, tvm.ir.GenericConst):
        return None if np.isnan(bound.value.numpy()).any() else ranked_constant(bound, rank)
    if not dtype.startswith("float"):
        return bound
    return bb.normalize(relax.op.where(relax.op.isnan(bound), relax.const(float(unbounded), dtype), bound))


def _fold(name: str) -> Callable:
    """The converter of Max or Min (`name`: relax.op.maximum or minimum) of one or more
    broadcasting inputs (opset 8+)."""

    def convert(bb: relax.BlockBuilder, inputs: Sequence, attrs: dict[str, Any]) -> relax.Expr:
        from tvm import relax

        rank = max(len(x.ty.shape.values) for x in inputs)
        result, *others = [ranked_constant(x, rank) for x in inputs]
        for other in others:
            result = bb.normalize(getattr(relax.op, name)(result, other))
        return result

    return convert


def ranked_constant(expr, rank: int):
    """A constant of lower rank reshaped to `rank` (numpy broadcasting adds leading ones)."""
    import tvm
    from tvm import relax

    if not isinstance(expr, tvm.ir.GenericConst) or len(expr.ty.shape.values) == rank:
        return expr
    value = expr.value.numpy()
    return relax.const(value.reshape([1] * (rank - value.ndim) + list(value.shape)), str(value.dtype))


CONVERTERS: dict[str, Callable] = {"Clip": clip, "Max": _fold("maximum"), "Min": _fold("minimum")}
