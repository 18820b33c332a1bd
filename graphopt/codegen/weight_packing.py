"""Constant weights packed once, at compile time, into the order the CPU kernels read them.

Matches: float32 `relax.nn.conv2d` in NHWC/HWIO with one group and `relax.matmul` whose second
operand is a 2-D [K, N] matrix, when the weights are a constant of at least
`PACK_MIN_BYTES` and the output channels (N) a multiple of the block.
Rewrites: the weights to [N / block, ..., block] (each block of `block` output channels
contiguous, for every reduction position in turn) and the operator to a TE kernel reading that
layout; the kernel's loop nest is the operator's, so the default schedule and its fused epilogue
apply unchanged. Guarantees: the same sums in the same order (exact). Verified against
onnxruntime by tests/codegen/test_cpu_schedules.py.

Why: the default schedule's register tile reads a few vectors of output channels at every
reduction step. In HWIO (or [K, N]) those vectors lie one row of N floats apart, so a tile's
slice of the weights spans a page per few steps and, at N = 512 or 3072, falls into a handful of
cache sets; packed, the slice is one stream. Below `PACK_MIN_BYTES` the weights stay in L2
either way and packing changes nothing measurable. Measured on Zen 5, one core: ResNet-18's
3x3 512 -> 512 convolution at 7x7 3.1-3.6 -> 2.0-2.3 ms; 1x1 convolutions with 0.9 MB weights
and 3x3 64 -> 64 unchanged.
"""
from __future__ import annotations

import numpy as np

# Weights smaller than this are left in their layout (see above).
PACK_MIN_BYTES = 1 << 20
# How Relax spells an out_dtype that is the input's (float32 here).
_SAME_DTYPE = ("None", "", "void", "float32")


def pack_weights(lanes: int):
    """The module pass, packing in blocks of two SIMD vectors of `lanes` floats: the default
    schedule's register tile for convolutions is two vectors wide."""
    from tvm import relax

    from graphopt.codegen.cpu_pipeline import rewrite_calls

    block = 2 * lanes

    def rewrite(builder, call):
        name = getattr(call.op, "name", None)
        if name == "relax.nn.conv2d" and _packable_conv(call, block):
            weights = call.args[1].value.numpy()
            kh, kw, c, n = weights.shape
            packed = np.ascontiguousarray(weights.reshape(kh, kw, c, n // block, block).transpose(3, 0, 1, 2, 4))
            return builder.call_te(_conv_nhwc_packed, call.args[0], relax.const(packed),
                                   [int(s) for s in call.attrs.strides], [int(p) for p in call.attrs.padding],
                                   [int(d) for d in call.attrs.dilation], primfunc_name_hint="conv2d_packed")
        if name == "relax.matmul" and _packable_matmul(call, block):
            weights = call.args[1].value.numpy()
            k, n = weights.shape
            packed = np.ascontiguousarray(weights.reshape(k, n // block, block).transpose(1, 0, 2))
            return builder.call_te(_matmul_packed, call.args[0], relax.const(packed),
                                   primfunc_name_hint="matmul_packed")
        return None

    return rewrite_calls("GraphoptPackWeights", rewrite)


def _constant_float32(expr) -> np.ndarray | None:
    import tvm

    if not isinstance(expr, tvm.ir.GenericConst):
        return None
    value = expr.value.numpy()
    return value if value.dtype == np.float32 and value.nbytes >= PACK_MIN_BYTES else None


def _static_float32(expr) -> bool:
    import tvm

    shape = getattr(expr.ty, "shape", None)
    return (str(getattr(expr.ty, "dtype", "")) == "float32" and shape is not None
            and all(isinstance(d, tvm.tirx.IntImm) for d in shape.values))


def _packable_conv(call, block: int) -> bool:
    attrs = call.attrs
    weights = _constant_float32(call.args[1])
    return (weights is not None and weights.ndim == 4 and weights.shape[3] % block == 0
            and attrs.data_layout == "NHWC" and attrs.kernel_layout == "HWIO" and attrs.out_layout == "NHWC"
            and int(attrs.groups) == 1 and _static_float32(call.args[0])
            and str(attrs.out_dtype) in _SAME_DTYPE)


def _packable_matmul(call, block: int) -> bool:
    weights = _constant_float32(call.args[1])
    return (weights is not None and weights.ndim == 2 and weights.shape[1] % block == 0
            and _static_float32(call.args[0]) and len(call.args[0].ty.shape.values) >= 2
            and str(call.attrs.out_dtype) in _SAME_DTYPE)


def _conv_nhwc_packed(data, weights, strides: list[int], padding: list[int], dilation: list[int]):
    """conv2d over NHWC data with weights packed [N / block, KH, KW, C, block]."""
    from tvm import te, topi

    n, h, w, c = (int(d) for d in data.shape)
    blocks, kh, kw, _, block = (int(d) for d in weights.shape)
    top, left, bottom, right = padding
    padded = topi.nn.pad(data, [0, top, left, 0], [0, bottom, right, 0]) if any(padding) else data
    out_h = (h + top + bottom - dilation[0] * (kh - 1) - 1) // strides[0] + 1
    out_w = (w + left + right - dilation[1] * (kw - 1) - 1) // strides[1] + 1
    ry, rx, rc = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx"), te.reduce_axis((0, c), "rc")
    return te.compute(
        (n, out_h, out_w, blocks * block),
        lambda b, y, x, f: te.sum(padded[b, y * strides[0] + ry * dilation[0], x * strides[1] + rx * dilation[1], rc]
                                  * weights[f // block, ry, rx, rc, f % block], axis=[ry, rx, rc]),
        name="conv2d_nhwc")


def _matmul_packed(data, weights):
    """data [..., M, K] @ weights packed [N / block, K, block]."""
    from tvm import te

    blocks, k, block = (int(d) for d in weights.shape)
    reduce = te.reduce_axis((0, k), "k")
    return te.compute(
        (*data.shape[:-1], blocks * block),
        lambda *i: te.sum(data[(*i[:-1], reduce)] * weights[i[-1] // block, reduce, i[-1] % block], axis=reduce),
        name="matmul")
