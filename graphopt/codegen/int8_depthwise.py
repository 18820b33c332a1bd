"""A vectorized int8 depthwise convolution for CPUs: QLinearConv and ConvInteger whose group
equals their input and output channels (MobileNetV2's and EfficientNet's 3x3 and 5x5 layers).

The packed kernel of `int8_kernels` reduces over input channels, which a depthwise convolution
does not have, and the generic path (an int32 Relax conv2d on centred operands, then a separate
requantization) runs at scalar speed. Here channels are the vector axis of NHWC data:

    out[n, y, x, c] = epilogue(sum over (i, j) of xp[n, y*sh + i*dh, x*sw + j*dw, c] * w[i, j, c] + bias'[c])

with xp the data padded with its zero point, w the centred weights as int16 and
bias' = bias - zero_point * sum of w (so padded taps add zero_point * w - zero_point * w = 0, and no
zero point is subtracted per element). Both operands widen to int32 vectors; as both fit 16
bits, LLVM multiplies them with `vpmaddwd` on x86 (or multiplies and accumulates with
`vpdpwssd`, tuning for a CPU where that is fast) rather than `vpmulld`, twice the micro-ops. A tile of P output pixels along W x Q channel
vectors stays in registers over the taps (loads of the same input vector by neighbouring pixels
are shared once unrolled), the bias and the requantization are applied before the tile leaves
them, and rows are spread over the cores. The schedule is written by hand and marked scheduled,
so graphopt's default scheduler leaves it alone.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from graphopt.codegen import cpu_schedules, int8_kernels
from graphopt.codegen.cpu_schedules import Simd
from graphopt.codegen.int8_kernels import OPAQUE, SCHEDULED, ConvShape, Requant
from graphopt.ir.errors import CodegenError

if TYPE_CHECKING:
    import tvm
    from tvm import relax, te

_MIN_LANES = 4      # channel vectors narrower than this are left to the generic path


def vectors_for(shape: ConvShape, groups: int, weights: np.ndarray) -> Simd | None:
    """The kernel's channel vectors (int32 lanes dividing the channels, vector registers) for a
    convolution on TVM's current target, or None where the kernel does not apply: not depthwise
    with one output per channel (group == C == OC), not an LLVM CPU target, or channels not a
    multiple of 4."""
    import tvm

    if not (groups > 1 and groups == shape.c == shape.oc and weights.shape[1] == 1):
        return None
    target = tvm.target.Target.current(allow_none=True)
    if target is None or target.kind.name != "llvm":
        return None
    simd = cpu_schedules.simd_of(target)
    lanes = math.gcd(shape.c, simd.lanes)
    return Simd(lanes, simd.registers) if lanes >= _MIN_LANES else None


def emit(bb: relax.BlockBuilder, x_nhwc: relax.Expr, zero_point: int, centred: np.ndarray, bias: np.ndarray,
         shape: ConvShape, simd: Simd, requant: tuple[np.ndarray, Requant] | None) -> relax.Expr:
    """The kernel's NHWC output (a bound var) for NHWC data `x_nhwc` with a constant zero point.

    `centred`: the weights minus their zero points, [C, 1, KH, KW]; `bias`: int64 [C];
    `requant`: per-channel float32 multipliers and the output's type and zero point, or None for
    an int32 output.
    """
    from tvm import relax

    if np.abs(centred).max(initial=0) >= 2**15:
        raise CodegenError("a depthwise convolution's centred weights do not fit int16")
    weights = np.ascontiguousarray(centred[:, 0].transpose(1, 2, 0)).astype(np.int16)  # [KH, KW, C]
    total = bias - zero_point * centred.astype(np.int64).sum(axis=(1, 2, 3))
    if np.abs(total).max(initial=0) >= 2**31:
        raise CodegenError("a depthwise convolution's bias does not fit int32 once its zero point is folded in")
    args = [x_nhwc, relax.const(weights), relax.const(total.astype(np.int32))]
    if requant is not None:
        args.append(relax.const(np.asarray(requant[0], np.float32)))
    data_dtype = str(x_nhwc.ty.dtype)
    kernel = depthwise_kernel(shape, data_dtype, zero_point, simd, None if requant is None else requant[1])
    gvar = bb.add_func(kernel, "int8_depthwise")
    out_dtype = "int32" if requant is None else requant[1].dtype
    out_type = relax.TensorType([shape.n, *shape.out_hw, shape.c], out_dtype)
    return bb.emit(relax.call_tir(gvar, args, out_type))


def depthwise_kernel(shape: ConvShape, data_dtype: str, zero_point: int, simd: Simd,
                     requant: Requant | None) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc (x [N, H, W, C], w [KH, KW, C] int16, bias [C] int32,
    [scale [C] float32], out [N, OH, OW, C]); `zero_point` is the data's, in `data_dtype`."""
    from tvm import te

    x = te.placeholder((shape.n, shape.h, shape.w, shape.c), data_dtype, "x")
    w = te.placeholder((shape.kh, shape.kw, shape.c), "int16", "w")
    bias = te.placeholder((shape.c,), "int32", "bias")
    padded = _padded(x, shape, zero_point)
    rh, rw = te.reduce_axis((0, shape.kh), "rh"), te.reduce_axis((0, shape.kw), "rw")
    (sh, sw), (dh, dw) = shape.strides, shape.dilations
    conv = te.compute(
        (shape.n, *shape.out_hw, shape.c),
        lambda n, y, x_, c: te.sum(padded[n, y * sh + rh * dh, x_ * sw + rw * dw, c].astype("int32")
                                   * w[rh, rw, c].astype("int32"), axis=[rh, rw]),
        "conv")
    args = [x, w, bias]
    if requant is None:
        out = te.compute(conv.shape, lambda *i: conv(*i) + bias[i[3]], "epilogue")
    else:
        scale = te.placeholder((shape.c,), "float32", "scale")
        args.append(scale)
        out = te.compute(conv.shape, lambda *i: int8_kernels.requantize(conv(*i) + bias[i[3]], scale[i[3]], requant),
                         "epilogue")
    # Without "global_symbol" ("main"): the module names the kernel where it is added.
    func = te.create_prim_func([*args, out]).without_attr("global_symbol")
    return _schedule(func, shape, simd, padded is not x).with_attr(SCHEDULED, True).with_attr("op_pattern", OPAQUE)


def _padded(x: te.Tensor, shape: ConvShape, zero_point: int) -> te.Tensor:
    """x padded with its zero point to the extent the taps read, or x itself without padding."""
    from tvm import te, tirx

    top, left = shape.pads[0], shape.pads[1]
    oh, ow = shape.out_hw
    height = max(shape.h + top, (oh - 1) * shape.strides[0] + (shape.kh - 1) * shape.dilations[0] + 1)
    width = max(shape.w + left, (ow - 1) * shape.strides[1] + (shape.kw - 1) * shape.dilations[1] + 1)
    if (top, left, height, width) == (0, 0, shape.h, shape.w):
        return x

    def element(n, h, w, c):
        inside = tirx.all(h >= top, h < shape.h + top, w >= left, w < shape.w + left)
        # if_then_else evaluates only the branch taken, so the load outside x never happens.
        return tirx.if_then_else(inside, x[n, h - top, w - left, c], tirx.const(zero_point, x.dtype))

    return te.compute((shape.n, height, width, shape.c), element, "pad")


def tile(out_w: int, vectors: int, registers: int) -> tuple[int, int]:
    """P pixels along W x Q channel vectors held in accumulators: exact divisors (no tails), at
    most half the vector registers, the most pixels first (neighbouring pixels share input
    vectors; channel vectors share nothing). LLVM evaluates the unrolled taps of a tile as trees
    of multiply-adds, which take about as many registers again: on AVX-512, 21 to 24
    accumulators spilled and ran 1.3-1.8x slower than 14 or 16 (MobileNetV2's layers)."""
    budget = registers // 2
    pixels = max(p for p in range(1, min(out_w, budget) + 1) if out_w % p == 0)
    return pixels, max(q for q in range(1, vectors + 1) if vectors % q == 0 and pixels * q <= budget)


def _schedule(func: tvm.tirx.PrimFunc, shape: ConvShape, simd: Simd, padded: bool) -> tvm.tirx.PrimFunc:
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    conv = sch.get_sblock("conv")
    lanes = simd.lanes
    pixels, vectors = tile(shape.out_hw[1], shape.c // lanes, simd.registers)
    n, y, x, c, rh, rw = sch.get_loops(conv)
    x_outer, x_inner = sch.split(x, [None, pixels])
    c_outer, c_vectors, c_lanes = sch.split(c, [None, vectors, lanes])
    sch.reorder(n, y, x_outer, c_outer, rh, rw, x_inner, c_vectors, c_lanes)
    rows = sch.fuse(n, y)
    sch.parallel(rows)
    epilogue = sch.get_sblock("epilogue")
    sch.reverse_compute_at(epilogue, c_outer)
    *_, e_x, e_c = sch.get_loops(epilogue)
    e_vectors, e_lanes = sch.split(e_c, [None, lanes])
    for loop in (e_x, e_vectors):
        sch.unroll(loop)
    sch.vectorize(e_lanes)
    sch.vectorize(c_lanes)  # before the reduction is split: vectorize refuses an update block alone
    init = sch.decompose_reduction(conv, rh)
    *_, i_x, i_vectors, i_lanes = sch.get_loops(init)
    for loop in (i_x, i_vectors, rh, rw, x_inner, c_vectors):
        sch.unroll(loop)
    sch.vectorize(i_lanes)
    if padded:
        pad = sch.get_sblock("pad")
        n, h, _, c = sch.get_loops(pad)
        sch.parallel(sch.fuse(n, h))
        sch.vectorize(sch.split(c, [None, lanes])[1])
    return sch.mod["main"]

