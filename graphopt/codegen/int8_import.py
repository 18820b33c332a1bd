"""Converters for ONNX's integer operators, which TVM 0.27's ONNX frontend lacks: QLinearConv,
QLinearMatMul, ConvInteger and MatMulInteger.

All four are one computation: int32 sums of (x - x_zero_point) * (w - w_zero_point), plus an
int32 bias, then for the QLinear ops onnxruntime's requantization (float32 multiply by
x_scale * w_scale / y_scale, round half to even, add y_zero_point, saturate).

The kernel depends on the target, which reaches the converters as TVM's current target
(`build.to_relax` enters it, as TVM's own operator strategies read it):

- a CPU with a dot-product instruction (`int8_kernels.instruction_for`), constant weights, one
  group and weights that fit int8 once centred: the packed, tensorized kernel of `int8_kernels`
  (of `amx_kernels`, on AMX tiles, where `int8_kernels.kernel_for` says "amx"), on NHWC data.
  The kernel's NHWC output is returned transposed back to NCHW, and a consumer
  that is itself a packed convolution takes the NHWC tensor directly; where float operators
  lie between two of them, `transpose_sinking` (in the CPU pipeline) cancels the transposes;
- a depthwise convolution (group == C == OC) on a CPU, with constant weights and data zero
  point: the NHWC vector kernel of `int8_depthwise`, in and out as the packed kernel's;
- anything else (no target, CUDA, a CPU without VNNI or dotprod, grouped convolutions, a
  matmul whose b is computed; convolution weights must be constants):
  int32 Relax ops, `conv2d`/`matmul` with `out_dtype="int32"` on zero-point-centred int32
  operands (padding with 0 there is padding x with its zero point), then the requantization as
  one elementwise kernel. Correct everywhere, and only as fast as int32 arithmetic.

MatMulInteger and ConvInteger also take zero points computed at run time (DynamicQuantizeLinear's,
from onnxruntime's quantize_dynamic): a's per tensor or per row, b's per tensor or per column.
With constant weights, the kernel computes the product of the raw data, and the zero point's
share, a_zp * (column sums of the centred weights), a per-output constant times a run-time
scalar, is subtracted after it, so the dot-product kernel still runs (a convolution only without
padding, which would pad with 0 rather than the zero point). Otherwise both operands are centred
by run-time subtractions before the int32 op: the same sums, with no faster kernel to keep.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from graphopt.codegen import amx_kernels, int8_depthwise, int8_kernels
from graphopt.codegen.int8_kernels import ConvShape, DotInstruction, Requant
from graphopt.ir.errors import CodegenError

if TYPE_CHECKING:
    from tvm import relax

_NCHW_TO_NHWC, _NHWC_TO_NCHW = (0, 2, 3, 1), (0, 3, 1, 2)


def qlinear_conv(bb: relax.BlockBuilder, inputs: Sequence, attrs: dict[str, Any]) -> relax.Expr:
    """QLinearConv(x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, [B])."""
    w, y_zp = _constant(inputs[3], "QLinearConv", "w"), _constant(inputs[7], "QLinearConv", "y_zero_point")
    oc = w.shape[0]
    scale = _per_channel(_multiplier(inputs[1], inputs[4], inputs[6], "QLinearConv"), oc)
    bias = _bias(inputs[8], oc, "QLinearConv")
    return _conv(bb, inputs[0], _zero_point(inputs[2]), w, _zero_point(inputs[5], oc), bias, attrs,
                 (scale, Requant(str(y_zp.dtype), int(y_zp.reshape(-1)[0]))))


def conv_integer(bb: relax.BlockBuilder, inputs: Sequence, attrs: dict[str, Any]) -> relax.Expr:
    """ConvInteger(x, w, [x_zp], [w_zp]) -> int32; x_zp may be computed at run time."""
    w = _constant(inputs[1], "ConvInteger", "w")
    oc = w.shape[0]
    x_zp = _run_time_zero_point(inputs[2]) if _computed(inputs[2]) else _zero_point(inputs[2])
    return _conv(bb, inputs[0], x_zp, w, _zero_point(inputs[3], oc), np.zeros(oc, np.int64), attrs, None)


def qlinear_matmul(bb: relax.BlockBuilder, inputs: Sequence, attrs: dict[str, Any]) -> relax.Expr:
    """QLinearMatMul(a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp)."""
    y_zp = _constant(inputs[7], "QLinearMatMul", "y_zero_point")
    multiplier = _multiplier(inputs[1], inputs[4], inputs[6], "QLinearMatMul")
    return _matmul(bb, inputs[0], _zero_point(inputs[2]), inputs[3], inputs[5],
                   (multiplier, Requant(str(y_zp.dtype), int(y_zp.reshape(-1)[0]))))


def matmul_integer(bb: relax.BlockBuilder, inputs: Sequence, attrs: dict[str, Any]) -> relax.Expr:
    """MatMulInteger(a, b, [a_zp], [b_zp]) -> int32; the zero points may be computed at run time."""
    a, b, a_zp, b_zp = inputs[0], inputs[1], inputs[2], inputs[3]
    if _computed(a_zp) or _computed(b_zp):
        return _run_time_matmul(bb, a, a_zp, b, b_zp)
    return _matmul(bb, a, _zero_point(a_zp), b, b_zp, None)


def integer_matmul(bb: relax.BlockBuilder, a: relax.Expr, b: np.ndarray) -> relax.Expr:
    """a @ b in int32, zero points left to the caller: a uint8 or int8 [..., K], b constant
    integers [K, N]. The packed dot-product kernel where the target has one and b fits int8."""
    return _constant_b_matmul(bb, a, 0, b.astype(np.int32), None)


CONVERTERS: dict[str, Callable] = {"QLinearConv": qlinear_conv, "QLinearMatMul": qlinear_matmul,
                                   "ConvInteger": conv_integer, "MatMulInteger": matmul_integer}


# -- convolution -------------------------------------------------------------------------------
def _conv(bb, x, x_zp, w: np.ndarray, w_zp: np.ndarray, bias: np.ndarray, attrs: dict,
          requant: tuple[np.ndarray, Requant] | None):
    """x_zp: an int, or (ConvInteger) an int32 scalar computed at run time."""
    if w.ndim != 4:
        raise CodegenError(f"only 2-D integer convolutions are supported, not weights of shape {list(w.shape)}")
    n, c, h, width = _shape(x)
    shape = ConvShape(n, h, width, c, w.shape[0], w.shape[2], w.shape[3],
                      tuple(int(s) for s in attrs.get("strides", (1, 1))),
                      tuple(int(d) for d in attrs.get("dilations", (1, 1))))
    shape = dataclasses.replace(shape, pads=_pads(attrs, shape))
    centred = w.astype(np.int32) - w_zp.reshape(-1, 1, 1, 1)
    inst = _instruction()
    packs = inst is not None and int(attrs.get("group", 1)) == 1 and _fits_int8(centred)
    if packs and isinstance(x_zp, int):
        return _packed_conv(bb, x, x_zp, centred.astype(np.int8), bias, shape, inst, requant)
    if packs and not any(shape.pads):
        raw = bb.emit(_packed_conv(bb, x, 0, centred.astype(np.int8), bias, shape, inst, None))
        return _minus_zero_point_share(raw, x_zp, centred.sum(axis=(1, 2, 3)).reshape(1, -1, 1, 1))
    depthwise = int8_depthwise.vectors_for(shape, int(attrs.get("group", 1)), centred)
    if depthwise is not None and isinstance(x_zp, int):
        out = int8_depthwise.emit(bb, _nhwc(bb, x), x_zp, centred, bias, shape, depthwise, requant)
        return _relax().op.permute_dims(out, _NHWC_TO_NCHW)
    return _generic_conv(bb, x, x_zp, centred, bias, shape, int(attrs.get("group", 1)), requant)


def _packed_conv(bb, x, x_zp: int, w: np.ndarray, bias: np.ndarray, shape: ConvShape, inst: DotInstruction,
                 requant: tuple[np.ndarray, Requant] | None):
    return _relax().op.permute_dims(_packed(bb, _nhwc(bb, x), x_zp, w, bias, shape, inst, requant), _NHWC_TO_NCHW)


def _packed(bb, x_nhwc, x_zp: int, w: np.ndarray, bias: np.ndarray, shape: ConvShape, inst: DotInstruction,
            requant: tuple[np.ndarray, Requant] | None):
    """The packed kernel's NHWC output (a bound var), for NHWC data."""
    relax = _relax()
    dtype = _dtype(x_nhwc)
    kernels = _kernels()
    zp = int8_kernels.kernel_zero_point(x_zp, dtype, inst)
    ocp = -(-shape.oc // inst.lanes) * inst.lanes
    # Sum of (x - zp) * w = sum of x * w - zp * sum of w: the second term is a per-channel constant.
    total = bias - zp * w.astype(np.int64).sum(axis=(1, 2, 3))
    if np.abs(total).max(initial=0) >= 2**31:
        raise CodegenError("an integer convolution's bias does not fit int32 once zero points are folded in")
    args = [x_nhwc, relax.const(kernels.pack_weights(w, inst)), relax.const(_padded(total, ocp, np.int32))]
    if requant is not None:
        args.append(relax.const(_padded(requant[0], ocp, np.float32)))
    kernel = kernels.conv_kernel(shape, dtype, x_zp, inst, None if requant is None else requant[1])
    out_dtype = "int32" if requant is None else requant[1].dtype
    gvar = bb.add_func(kernel, "int8_conv")
    out_type = relax.TensorType([shape.n, *shape.out_hw, shape.oc], out_dtype)
    return bb.emit(relax.call_tir(gvar, args, out_type))


def _nhwc(bb, x):
    """x (NCHW) as NHWC: the NHWC tensor it was transposed from when it is one (the output of
    another packed kernel), else a transpose."""
    relax = _relax()
    if (isinstance(x, relax.Call) and getattr(x.op, "name", None) == "relax.permute_dims"
            and x.attrs.axes is not None and [int(a) for a in x.attrs.axes] == list(_NHWC_TO_NCHW)):
        return x.args[0]
    return bb.emit(relax.op.permute_dims(x, _NCHW_TO_NHWC))


def _generic_conv(bb, x, x_zp, w: np.ndarray, bias: np.ndarray, shape: ConvShape, groups: int,
                  requant: tuple[np.ndarray, Requant] | None):
    relax = _relax()
    top, left, bottom, right = shape.pads
    acc = relax.op.nn.conv2d(_centred(bb, x, x_zp), relax.const(w.astype(np.int32)), shape.strides,
                             (top, left, bottom, right), shape.dilations, groups, out_dtype="int32")
    return _finish(bb, bb.emit(acc), bias.reshape(1, -1, 1, 1), requant, axis=1)


def _pads(attrs: dict, shape: ConvShape) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) from `pads` or `auto_pad`."""
    auto = attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    if auto in ("NOTSET", "VALID"):
        pads = [int(p) for p in attrs.get("pads", (0, 0, 0, 0))] if auto == "NOTSET" else [0, 0, 0, 0]
        return pads[0], pads[1], pads[2], pads[3]
    totals = []
    for size, k, s, d in ((shape.h, shape.kh, shape.strides[0], shape.dilations[0]),
                          (shape.w, shape.kw, shape.strides[1], shape.dilations[1])):
        totals.append(max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0))
    first = [t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in totals]
    return first[0], first[1], totals[0] - first[0], totals[1] - first[1]


# -- matmul ------------------------------------------------------------------------------------
def _matmul(bb, a, a_zp: int, b, b_zp_input, requant: tuple[np.ndarray, Requant] | None):
    relax = _relax()
    if _constant_weights(a, b):
        b_value = b.value.numpy()
        centred = b_value.astype(np.int32) - _zero_point(b_zp_input, b_value.shape[1]).reshape(1, -1)
        return _constant_b_matmul(bb, a, a_zp, centred, requant)
    # Per tensor, or per column of b: [N] broadcasts along b's last axis.
    b_zp = np.zeros(1, np.int32) if b_zp_input is None else _constant(b_zp_input, "MatMul", "b_zero_point")
    b_zp = b_zp.astype(np.int32).reshape(-1)
    b_expr = _centred(bb, b, b_zp if b_zp.size > 1 else int(b_zp[0]))
    scale = None if requant is None else (np.asarray(requant[0], np.float32).reshape(-1), requant[1])
    acc = bb.emit(relax.op.matmul(_centred(bb, a, a_zp), b_expr, out_dtype="int32"))
    return _finish(bb, acc, None, scale, axis=-1)


def _constant_b_matmul(bb, a, a_zp: int, centred: np.ndarray, requant: tuple[np.ndarray, Requant] | None):
    """(a - a_zp) @ centred, requantized when asked, for constant centred weights [K, N]."""
    relax = _relax()
    a_shape = _shape(a)
    k, n = centred.shape
    scale = None if requant is None else (_per_channel(requant[0], n), requant[1])
    inst = _instruction()
    if inst is not None and _fits_int8(centred):
        # A matmul is the 1x1 convolution of a 1 x M image with K channels.
        rows = int(np.prod(a_shape[:-1]))
        image = bb.emit(relax.op.reshape(a, [1, 1, rows, k]))
        shape = ConvShape(1, 1, rows, k, n, 1, 1)
        weights = np.ascontiguousarray(centred.T.astype(np.int8)[:, :, None, None])
        out = _packed(bb, image, a_zp, weights, np.zeros(n, np.int64), shape, inst, scale)
        return relax.op.reshape(out, [*a_shape[:-1], n])
    acc = bb.emit(relax.op.matmul(_centred(bb, a, a_zp), relax.const(centred), out_dtype="int32"))
    return _finish(bb, acc, None, scale, axis=-1)


def _run_time_matmul(bb, a, a_zp, b, b_zp):
    """MatMulInteger with a zero point computed at run time."""
    relax = _relax()
    rows = _shape(a)[-2] if len(_shape(a)) >= 2 else 1
    a_zp = _run_time_zero_point(a_zp, "row of a", rows) if _computed(a_zp) else _zero_point(a_zp)
    if _constant_weights(a, b) and not _computed(b_zp):
        b_value = b.value.numpy()
        centred = b_value.astype(np.int32) - _zero_point(b_zp, b_value.shape[1]).reshape(1, -1)
        raw = bb.emit(_constant_b_matmul(bb, a, 0 if _computed(a_zp) else a_zp, centred, None))
        return _minus_zero_point_share(raw, a_zp, centred.sum(axis=0)) if _computed(a_zp) else raw
    columns = _shape(b)[-1]
    b_zp = _run_time_zero_point(b_zp, "column of b", columns) if _computed(b_zp) else _zero_point(b_zp, columns)
    return relax.op.matmul(_centred(bb, a, a_zp), _centred(bb, b, b_zp), out_dtype="int32")


# -- zero points computed at run time ----------------------------------------------------------
def _computed(zero_point) -> bool:
    return zero_point is not None and not _is_constant(zero_point)


def _run_time_zero_point(zero_point, per: str | None = None, count: int = 1):
    """A zero point computed at run time as int32, shaped to broadcast against the int32
    product: a scalar, or `count` values, one `per` "row of a" ([M, 1]) or "column of b" ([N])."""
    relax = _relax()
    shape = _shape(zero_point)
    wide = relax.op.astype(zero_point, "int32")
    if int(np.prod(shape)) == 1:
        return relax.op.reshape(wide, [])
    if per is None or shape != [count]:
        allowed = "a scalar" if per is None else f"a scalar or one value per {per} ({count})"
        raise CodegenError(f"a zero point computed at run time has shape {shape}: it must be {allowed}")
    return relax.op.reshape(wide, [count, 1]) if per.startswith("row") else wide


def _minus_zero_point_share(raw, zero_point, weight_sums: np.ndarray):
    """raw - zero_point * weight_sums: the product of the raw data corrected for the data's zero
    point, sum((x - zp) * w) = sum(x * w) - zp * sum(w)."""
    relax = _relax()
    if np.abs(weight_sums).max(initial=0) * 255 >= 2**31:
        raise CodegenError("an integer op's weight sums times its zero point do not fit int32")
    sums = relax.const(weight_sums.astype(np.int32))
    return relax.op.subtract(raw, relax.op.multiply(zero_point, sums))


# -- shared pieces -----------------------------------------------------------------------------
def _finish(bb, acc, bias: np.ndarray | None, requant: tuple[np.ndarray, Requant] | None, axis: int):
    """acc + bias, requantized when asked; per-channel constants broadcast along `axis`."""
    relax = _relax()
    if bias is not None and np.any(bias):
        acc = bb.emit(relax.op.add(acc, relax.const(bias.astype(np.int32))))
    if requant is None:
        return acc
    rank = len(_shape(acc))
    scale = np.asarray(requant[0], np.float32).reshape(-1)
    shaped = [1] * rank
    shaped[axis] = scale.size
    scale = scale.reshape(shaped if scale.size > 1 else [1] * rank)

    def compute(acc_t, scale_t):
        from tvm import te

        def element(*index):
            at = [0 if scale_t.shape[i] == 1 else index[i] for i in range(rank)]
            return int8_kernels.requantize(acc_t(*index), scale_t(*at), requant[1])

        return te.compute(acc_t.shape, element, "requantize")

    return bb.emit_te(compute, acc, relax.const(scale), primfunc_name_hint="requantize")


def _centred(bb, x, zero_point):
    """x - zero_point in int32 (zero_point an int, an array, or an int32 expression computed at
    run time, broadcast against x)."""
    relax = _relax()
    wide = relax.op.astype(x, "int32")
    if isinstance(zero_point, relax.Expr):
        wide = relax.op.subtract(wide, zero_point)
    elif np.any(zero_point):
        wide = relax.op.subtract(wide, relax.const(np.asarray(zero_point, np.int32)))
    return bb.emit(wide)


def _instruction() -> DotInstruction | None:
    import tvm

    return int8_kernels.instruction_for(tvm.target.Target.current(allow_none=True))


def _kernels():
    """The module whose packed kernel the current target gets: `amx_kernels` where it has AMX
    tiles (with the same operands and interface as VNNI's), else `int8_kernels`."""
    import tvm

    return amx_kernels if int8_kernels.kernel_for(tvm.target.Target.current(allow_none=True)) == "amx" else int8_kernels


def _multiplier(x_scale, w_scale, y_scale, op: str) -> np.ndarray:
    """x_scale * w_scale / y_scale in float32, evaluated in onnxruntime's order."""
    xs, ws, ys = (_constant(s, op, "scale").astype(np.float32) for s in (x_scale, w_scale, y_scale))
    return (xs.reshape(-1)[0] * ws.reshape(-1)) / ys.reshape(-1)[0]


def _per_channel(values: np.ndarray, channels: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(values, np.float32).reshape(-1), (channels,)).copy()


def _bias(expr, channels: int, op: str) -> np.ndarray:
    return np.zeros(channels, np.int64) if expr is None else _constant(expr, op, "B").astype(np.int64).reshape(-1)


def _zero_point(expr, channels: int | None = None):
    """A zero point: an int (per tensor) or, with `channels`, an int32 array of that length."""
    value = np.zeros(1, np.int32) if expr is None else _constant(expr, "integer op", "zero point").astype(np.int32)
    if channels is None:
        if value.size != 1:
            raise CodegenError(f"a per-tensor zero point has {value.size} values")
        return int(value.reshape(-1)[0])
    return np.broadcast_to(value.reshape(-1), (channels,)).copy()


def _constant(expr, op: str, what: str) -> np.ndarray:
    if not _is_constant(expr):
        raise CodegenError(f"{op}: {what} must be an initializer (a constant), not computed at run time")
    return expr.value.numpy()


def _is_constant(expr) -> bool:
    import tvm

    return isinstance(expr, tvm.ir.GenericConst)


def _constant_weights(a, b) -> bool:
    """Whether b is a constant matrix, for an a of rank 2 or more: the kernels' case."""
    return _is_constant(b) and b.value.numpy().ndim == 2 and len(_shape(a)) >= 2


def _fits_int8(values: np.ndarray) -> bool:
    return bool(values.size == 0 or (values.min() >= -128 and values.max() <= 127))


def _padded(values: np.ndarray, length: int, dtype) -> np.ndarray:
    out = np.zeros(length, dtype)
    out[:values.size] = values
    return out


def _shape(expr) -> list[int]:
    return [int(d) for d in expr.ty.shape.values]


def _dtype(expr) -> str:
    return str(expr.ty.dtype)


def _relax():
    from tvm import relax

    return relax
