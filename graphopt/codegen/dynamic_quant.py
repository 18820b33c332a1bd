"""Dynamic quantization as onnxruntime computes it: the DynamicQuantizeLinear converter, and the
float x int8 product with the float operand quantized at run time that onnxruntime's dynamically
quantized operators (DynamicQuantizeLSTM, `dynamic_quant_lstm`) are made of.

onnxruntime (GetQuantizationParameter, then MlasQuantizeLinear) quantizes a float32 tensor to
uint8 over the range [min(x, 0), max(x, 0)], in float32:

    scale      = (max - min) / 255, or 1 where max == min (an all-zero tensor)
    zero_point = round(clip(0 - min / scale, 0, 255))
    q          = clip(round(x / scale) + zero_point, 0, 255)

rounding half to even, and dividing by the scale (not multiplying by its inverse). TVM's own
DynamicQuantizeLinear divides by a zero scale on an all-zero tensor, which onnxruntime does not,
hence this converter. One TE kernel computes the three outputs, the range first. It is opaque to
fusion, as is the rescaling kernel of `quantized_matmul`: a recurrence that quantizes its state at
every step then calls the same two kernels at every step (the BlockBuilder keeps one copy of
structurally equal kernels), and the build compiles each once whatever the sequence length.

`quantized_matmul` is onnxruntime's ComputeGemm for int8 weights: the int32 product of the
quantized data and the centred weights (`int8_import.integer_matmul`: the dot-product kernel
where the target has one), less the data zero point's share, times x_scale * w_scale[column]
(that product first, in float32).

Verified by tests/codegen/test_dynamic_quant.py against onnxruntime: DynamicQuantizeLinear bit for
bit (random, one-signed and all-zero tensors, rounding ties), quantize_dynamic's MatMul models to
float32 rounding.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from graphopt.codegen import int8_import
from graphopt.codegen.int8_kernels import OPAQUE
from graphopt.ir.errors import CodegenError

if TYPE_CHECKING:
    from tvm import relax



def dynamic_quantize_linear(bb: relax.BlockBuilder, inputs: Sequence, attrs: dict[str, Any]) -> relax.Expr:
    """DynamicQuantizeLinear(x) -> (y uint8, y_scale, y_zero_point)."""
    from tvm import relax

    return relax.Tuple(list(quantize(bb, inputs[0])))


CONVERTERS: dict[str, Callable] = {"DynamicQuantizeLinear": dynamic_quantize_linear}


def quantize(bb: relax.BlockBuilder, x: relax.Expr) -> tuple[relax.Expr, relax.Expr, relax.Expr]:
    """x (float32) quantized to uint8 over its whole range, as onnxruntime does:
    (q in x's shape, scale float32 [], zero point uint8 [])."""
    from tvm import relax

    if str(x.ty.dtype) != "float32":
        raise CodegenError(f"quantizing at run time takes float32 data, not {x.ty.dtype}")
    shape = _shape(x)
    size = int(np.prod(shape))
    flat = bb.emit(relax.op.reshape(x, [size]))
    outputs = [relax.TensorType([size], "uint8"), relax.TensorType([], "float32"), relax.TensorType([], "uint8")]
    gvar = bb.add_func(_quantize_kernel(size), "dynamic_quantize")
    out = bb.emit(relax.call_tir(gvar, [flat], outputs))
    q, scale, zero_point = (bb.emit(relax.TupleGetItem(out, k)) for k in range(3))
    return bb.emit(relax.op.reshape(q, shape)), scale, zero_point


def quantized_matmul(bb: relax.BlockBuilder, quantized: tuple[relax.Expr, relax.Expr, relax.Expr],
                     weights: np.ndarray, weight_scale: np.ndarray, bias: relax.Expr | None = None) -> relax.Expr:
    """The float32 product [..., N] of data quantized by `quantize` ([..., K]) and int8 weights:
    `weights` constant integers [K, N] with their zero point subtracted, `weight_scale` float32
    [N]; `bias` (float32 [N]) added last when given."""
    from tvm import relax

    q, scale, zero_point = quantized
    raw = bb.emit(int8_import.integer_matmul(bb, q, weights))
    shape = _shape(raw)
    sums = weights.astype(np.int64).sum(axis=0)
    if np.abs(sums).max(initial=0) * 255 >= 2**31:
        raise CodegenError("int8 weights: their column sums times 255 do not fit int32")
    args = [raw, scale, zero_point, relax.const(sums.astype(np.int32)),
            relax.const(np.ascontiguousarray(weight_scale, np.float32))]
    if bias is not None:
        args.append(bias)
    gvar = bb.add_func(_rescale_kernel(shape, bias is not None), "dequantize_product")
    return bb.emit(relax.call_tir(gvar, args, relax.TensorType(shape, "float32")))


def _quantize_kernel(size: int):
    """The PrimFunc (x [size] float32) -> (q [size] uint8, scale [], zero point [] uint8)."""
    from tvm import te, tirx

    data = te.placeholder((size,), "float32", "x")
    low, high = _reduce(data, te.min, "low"), _reduce(data, te.max, "high")
    zero, top = tirx.const(0.0, "float32"), tirx.const(255.0, "float32")

    def clip(v):
        return tirx.max(tirx.min(v, top), zero)

    def scale_of():
        lo, hi = tirx.min(low(), zero), tirx.max(high(), zero)
        return tirx.Select(hi == lo, tirx.const(1.0, "float32"), (hi - lo) / top)

    scale = te.compute((), scale_of, "scale")
    point = te.compute((), lambda: tirx.nearbyint(clip(zero - tirx.min(low(), zero) / scale())), "point")
    q = te.compute((size,), lambda i: clip(tirx.nearbyint(data[i] / scale()) + point()).astype("uint8"), "q")
    zero_point = te.compute((), lambda: point().astype("uint8"), "zero_point")
    return _opaque(te.create_prim_func([data, q, scale, zero_point]))


def _rescale_kernel(shape: list[int], with_bias: bool):
    """The PrimFunc (raw int32 [..., N], scale [], zero point [], sums int32 [N], w_scale [N],
    [bias [N]]) -> float32 [..., N]: (raw - zero point * sums) * (scale * w_scale), + bias."""
    from tvm import te

    n = shape[-1]
    raw = te.placeholder(shape, "int32", "raw")
    scale, zero_point = te.placeholder((), "float32", "scale"), te.placeholder((), "uint8", "zero_point")
    sums, w_scale = te.placeholder((n,), "int32", "sums"), te.placeholder((n,), "float32", "w_scale")
    bias = te.placeholder((n,), "float32", "bias") if with_bias else None

    def element(*index):
        column = index[-1]
        acc = raw(*index) - zero_point().astype("int32") * sums[column]
        value = acc.astype("float32") * (scale() * w_scale[column])
        return value if bias is None else value + bias[column]

    out = te.compute(shape, element, "dequantized")
    return _opaque(te.create_prim_func([raw, scale, zero_point, sums, w_scale, *([bias] if with_bias else []), out]))


def _reduce(data, reducer, name: str):
    from tvm import te

    k = te.reduce_axis((0, data.shape[0]), f"{name}_k")
    return te.compute((), lambda: reducer(data[k], axis=[k]), name)


def _opaque(func):
    # Without "global_symbol": the module names the kernel where it is added.
    return func.without_attr("global_symbol").with_attr("op_pattern", OPAQUE)


def _shape(expr) -> list[int]:
    return [int(d) for d in expr.ty.shape.values]
