"""Packed int8 convolution and matmul kernels tensorized with the CPU's dot-product instruction.

One kernel computes `out = epilogue(conv(x, w) + bias)` for NHWC data, where the epilogue is the
ONNX requantization (QLinearConv, QLinearMatMul) or nothing (ConvInteger, MatMulInteger). A
matmul is the 1x1 convolution of a 1 x M "image". The weights are packed at import time, in
numpy, as [OC/L, KH, KW, IC/4, L, 4] int8 (L = output lanes of one instruction; IC padded to a
multiple of 4 and OC to a multiple of L with zeros), so that one instruction's operand is 4*L
contiguous bytes:

- x86 with AVX-512 VNNI: `vpdpbusd` (uint8 data x int8 weights -> 16 int32);
- aarch64 with +dotprod: `sdot` (int8 x int8 -> 4 int32);

both from `int8_intrinsics`. Where the target also has AMX (`kernel_for`), `amx_kernels` computes
the same kernel on tiles, with VNNI's operands.

Data whose type differs from the instruction's (int8 for VNNI, uint8 for sdot) is shifted by 128
while the kernel pads and packs it; `kernel_zero_point` gives the zero point it pads with, and
the caller folds `-zero_point * sum(w)` into the int32 bias, so the kernel never subtracts a
zero point per element. The schedule is written by hand, not searched by MetaSchedule (whose
VNNI candidates did not build): a tile of P output pixels x Q instruction-wide channel blocks
lives in registers while the reduction runs, the epilogue is applied to the tile before it
leaves them, and tiles are spread over the cores.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from graphopt.codegen import int8_intrinsics

if TYPE_CHECKING:
    import tvm

# Marks a kernel as scheduled: graphopt's default scheduler, dlight and MetaSchedule skip it.
SCHEDULED = "tirx.is_scheduled"
OPAQUE = 8  # relax OpPatternKind.kOpaque: FuseOps must not merge the kernel into a new PrimFunc
# The instruction a packed kernel multiplies with ("amx", "vnni", "sdot"), as the manifest records it.
INSTRUCTION = "graphopt.int8_instruction"


@dataclass(frozen=True)
class DotInstruction:
    """A dot-product instruction: `lanes` int32 sums of 4 products each, per call."""

    name: str           # as the manifest records it
    intrin: str         # the registered TensorIntrin
    lanes: int
    data_dtype: str     # the data operand's type; the weights are int8
    accumulators: int   # vector registers for the accumulator tile, at most
    max_blocks: int     # channel blocks per tile, at most
    registers: int = 32  # vector registers: accumulators, one per block's weights, the data


VNNI = DotInstruction("vnni", int8_intrinsics.VNNI_16X4, 16, "uint8", 28, 4)
SDOT = DotInstruction("sdot", int8_intrinsics.SDOT_4X4, 4, "int8", 24, 8)


def instruction_for(target: tvm.target.Target | None) -> DotInstruction | None:
    """The dot-product instruction a `tvm.target.Target` has, or None (not a CPU, or no VNNI or
    dotprod: the caller then uses the generic integer path)."""
    if target is None or target.kind.name != "llvm":
        return None
    from tvm.target.codegen import target_has_features

    if target_has_features("avx512vnni", target):
        return VNNI
    if target_has_features("dotprod", target):
        return SDOT
    return None


def kernel_for(target: tvm.target.Target | None) -> str:
    """The packed int8 kernel `target` gets, best first: "amx" (AMX tiles, `amx_kernels`, where
    the target has amx-tile and amx-int8; they take VNNI's operands, and every AMX CPU has VNNI),
    "vnni", "sdot", or "generic" (no packed kernel: int32 Relax ops)."""
    inst = instruction_for(target)
    if inst is None:
        return "generic"
    from tvm.target.codegen import target_has_features

    if inst is VNNI and target_has_features(["amx-tile", "amx-int8"], target):
        return "amx"
    return inst.name


def instruction_used(mod: tvm.IRModule) -> str | None:
    """The instruction of the packed int8 kernels in `mod`, the best where there are several
    ("amx" over "vnni"); None where it has none."""
    from tvm import tirx

    used = {str(f.attrs[INSTRUCTION]) for _, f in mod.functions_items()
            if isinstance(f, tirx.PrimFunc) and f.attrs is not None and INSTRUCTION in f.attrs}
    return next((name for name in ("amx", VNNI.name, SDOT.name) if name in used), None)


@dataclass(frozen=True)
class ConvShape:
    """A static NHWC convolution: data [n, h, w, c], weights [oc, c, kh, kw] (ONNX's OIHW)."""

    n: int
    h: int
    w: int
    c: int
    oc: int
    kh: int
    kw: int
    strides: tuple[int, int] = (1, 1)
    dilations: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right

    @property
    def out_hw(self) -> tuple[int, int]:
        top, left, bottom, right = self.pads
        oh = (self.h + top + bottom - self.dilations[0] * (self.kh - 1) - 1) // self.strides[0] + 1
        ow = (self.w + left + right - self.dilations[1] * (self.kw - 1) - 1) // self.strides[1] + 1
        return oh, ow


def pack_weights(w: np.ndarray, inst: DotInstruction) -> np.ndarray:
    """OIHW int8 weights as [OC/L, KH, KW, IC/4, L, 4], zero-padded."""
    oc, ic, kh, kw = w.shape
    ocp, icp = -(-oc // inst.lanes) * inst.lanes, -(-ic // 4) * 4
    padded = np.zeros((ocp, icp, kh, kw), np.int8)
    padded[:oc, :ic] = w
    blocked = padded.reshape(ocp // inst.lanes, inst.lanes, icp // 4, 4, kh, kw)
    return np.ascontiguousarray(blocked.transpose(0, 4, 5, 2, 1, 3))


def kernel_zero_point(zero_point: int, data_dtype: str, inst: DotInstruction) -> int:
    """The data zero point as the kernel sees it, after shifting the data to the instruction's type."""
    return zero_point + _shift(data_dtype, inst)


def _shift(data_dtype: str, inst: DotInstruction) -> int:
    if data_dtype == inst.data_dtype:
        return 0
    return 128 if inst.data_dtype == "uint8" else -128


@dataclass(frozen=True)
class Requant:
    """y = saturate(round_half_even(acc * scale[oc]) + zero_point) in `dtype`, as onnxruntime does."""

    dtype: str
    zero_point: int


def requantize(acc: tvm.ir.Expr, scale: tvm.ir.Expr, requant: Requant) -> tvm.ir.Expr:
    """The requantization of one int32 value (TIR expressions), rounding half to even; shared by
    every int8 kernel.

    On CPU targets (the current target's kind is llvm) it rounds with `tirx.round`, which TVM's
    LLVM codegen lowers to llvm.nearbyint as it does `tirx.nearbyint`, but which its vectorizer
    keeps a vector operation where it scalarizes nearbyint (16 scalar conversions a vector: 3x the
    time of a depthwise layer at 14x14). Elsewhere (CUDA, where round is half away from zero)
    nearbyint."""
    import tvm
    from tvm import tirx

    target = tvm.target.Target.current(allow_none=True)
    rounded = tirx.round if target is not None and target.kind.name == "llvm" else tirx.nearbyint
    info = np.iinfo(requant.dtype)
    # Clamp in float first: a large product would overflow the conversion to int32.
    value = acc.astype("float32") * scale
    value = tirx.max(tirx.min(value, float(info.max - requant.zero_point)), float(info.min - requant.zero_point))
    return (rounded(value).astype("int32") + requant.zero_point).astype(requant.dtype)


def conv_kernel(shape: ConvShape, data_dtype: str, zero_point: int, inst: DotInstruction,
                requant: Requant | None) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc (x, packed w, bias[OCp] int32, [scale[OCp] float32], out).

    `zero_point` is the data's, in `data_dtype`; the output is NHWC, int32 without `requant`.
    """
    from tvm import te, tirx

    oh, ow = shape.out_hw
    top, left = shape.pads[0], shape.pads[1]
    lanes, ocb, icb = inst.lanes, -(-shape.oc // inst.lanes), -(-shape.c // 4)
    x = te.placeholder((shape.n, shape.h, shape.w, shape.c), data_dtype, "x")
    w = te.placeholder((ocb, shape.kh, shape.kw, icb, lanes, 4), "int8", "w")
    bias = te.placeholder((ocb * lanes,), "int32", "bias")
    shift = _shift(data_dtype, inst)
    padded_h = max(shape.h + top, (oh - 1) * shape.strides[0] + (shape.kh - 1) * shape.dilations[0] + 1)
    padded_w = max(shape.w + left, (ow - 1) * shape.strides[1] + (shape.kw - 1) * shape.dilations[1] + 1)
    needs_pack = shift != 0 or icb * 4 != shape.c or (padded_h, padded_w) != (shape.h, shape.w)

    def packed(n, h, w_, c):
        inside = tirx.all(h >= top, h < shape.h + top, w_ >= left, w_ < shape.w + left, c < shape.c)
        value = x[n, tirx.min(tirx.max(h - top, 0), shape.h - 1), tirx.min(tirx.max(w_ - left, 0), shape.w - 1),
                  tirx.min(c, shape.c - 1)]
        # The shift is a sign-bit flip, which LLVM emits as one xor.
        value = (value.astype("int32") + shift).astype(inst.data_dtype)
        return tirx.if_then_else(inside, value, tirx.const(zero_point + shift, inst.data_dtype))

    xp = (te.compute((shape.n, padded_h, padded_w, icb * 4), packed, "pack") if needs_pack else x)
    rh, rw = te.reduce_axis((0, shape.kh), "rh"), te.reduce_axis((0, shape.kw), "rw")
    rc, ri = te.reduce_axis((0, icb), "rc"), te.reduce_axis((0, 4), "ri")
    sh, sw = shape.strides
    dh, dw = shape.dilations
    conv = te.compute(
        (shape.n, oh, ow, ocb, lanes),
        lambda n, y, x_, ob, oi: te.sum(
            xp[n, y * sh + rh * dh, x_ * sw + rw * dw, rc * 4 + ri].astype("int32")
            * w[ob, rh, rw, rc, oi, ri].astype("int32"), axis=[rh, rw, rc, ri]),
        "conv")
    args = [x, w, bias]
    if requant is None:
        out = te.compute((shape.n, oh, ow, shape.oc),
                         lambda n, y, x_, c: conv[n, y, x_, c // lanes, c % lanes] + bias[c], "epilogue")
    else:
        scale = te.placeholder((ocb * lanes,), "float32", "scale")
        args.append(scale)
        out = te.compute((shape.n, oh, ow, shape.oc),
                         lambda n, y, x_, c: requantize(conv[n, y, x_, c // lanes, c % lanes] + bias[c],
                                                        scale[c], requant), "epilogue")
    # Without "global_symbol" ("main"): the module names the kernel where it is added.
    func = te.create_prim_func([*args, out]).without_attr("global_symbol")
    return (_schedule(func, shape, inst, needs_pack).with_attr(SCHEDULED, True).with_attr("op_pattern", OPAQUE)
            .with_attr(INSTRUCTION, inst.name))


def _tile(ow: int, ocb: int, inst: DotInstruction) -> tuple[int, int]:
    """P pixels x Q channel blocks held in accumulators: exact divisors, as many accumulators as
    fit, then Q nearest 2 (Q weight vectors loaded per step and reused by P pixels; more blocks
    re-stream more weights per pixel from L2). The P * Q accumulators, Q weight vectors and the
    data vector must fit the registers: 7 x 4 spills, and ran 2.5x slower than 7 x 2 (a 3x3
    convolution of 512 channels at 7x7)."""
    shapes = [(p, q) for q in range(1, min(ocb, inst.max_blocks) + 1) if ocb % q == 0
              for p in range(1, min(ow, inst.accumulators // q) + 1)
              if ow % p == 0 and p * q + q + 1 <= inst.registers]
    return max(shapes, key=lambda s: (s[0] * s[1], -abs(s[1] - 2)))


def _schedule(func, shape: ConvShape, inst: DotInstruction, needs_pack: bool):
    from tvm import s_tir

    int8_intrinsics.ensure_registered()

    sch = s_tir.Schedule(func)
    conv = sch.get_sblock("conv")
    _, ow = shape.out_hw
    ocb = -(-shape.oc // inst.lanes)
    pixels, blocks = _tile(ow, ocb, inst)
    n, y, x, ob, oi, rh, rw, rc, ri = sch.get_loops(conv)
    x_outer, x_inner = sch.split(x, [None, pixels])
    ob_outer, ob_inner = sch.split(ob, [None, blocks])
    sch.reorder(n, ob_outer, y, x_outer, rh, rw, rc, x_inner, ob_inner, oi, ri)
    tile = sch.fuse(n, ob_outer, y, x_outer)
    sch.parallel(tile)
    epilogue = sch.get_sblock("epilogue")
    sch.reverse_compute_at(epilogue, tile)
    *_, channel = sch.get_loops(epilogue)
    _, lanes = sch.split(channel, [None, inst.lanes])
    sch.vectorize(lanes)
    init = sch.decompose_reduction(conv, rh)
    *_, init_x, init_ob, init_oi = sch.get_loops(init)
    sch.unroll(init_x)
    sch.unroll(init_ob)
    sch.vectorize(init_oi)
    sch.tensorize(oi, inst.intrin)
    sch.unroll(x_inner)
    sch.unroll(ob_inner)
    if needs_pack:
        pack = sch.get_sblock("pack")
        n, h, *_ = sch.get_loops(pack)
        sch.parallel(sch.fuse(n, h))
    return sch.mod["main"]
