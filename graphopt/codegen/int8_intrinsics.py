"""The dot-product tensor intrinsics graphopt's int8 kernels tensorize with: x86 `vpdpbusd`
(AVX-512 VNNI) and aarch64 `sdot` (+dotprod).

Graphopt's own rather than TVM's "dot_16x4_vnni" and "dot_4x4_i8i8s32_sdot" for two reasons:
TVM 0.27's VNNI one calls `llvm.x86.avx512.vpdpbusd.512` with <16 x i32> operands, the signature
of LLVM 16 and older, which the LLVM inside TVM 0.27 rejects (so every kernel using it fails
LLVM's verifier: why MetaSchedule's VNNI candidates never built); and importing
`tvm.s_tir.tensor_intrin` builds every intrinsic of every target, 19 s on a loaded machine.
"""
from __future__ import annotations

VNNI_16X4 = "graphopt_dot_16x4_vnni"
SDOT_4X4 = "graphopt_dot_4x4_sdot"


def ensure_registered() -> None:
    """Register both intrinsics with TVM unless they are already: TVM's registry is process-global,
    so registration happens on first use rather than as a side effect of importing graphopt."""
    from tvm import s_tir

    for name, lanes, data, call in ((VNNI_16X4, 16, "uint8", _vnni), (SDOT_4X4, 4, "int8", _sdot)):
        if s_tir.TensorIntrin.get(name, allow_missing=True) is None:
            s_tir.TensorIntrin.register(name, _description(lanes, data), _implementation(lanes, data, call))


def _description(lanes: int, data: str):
    """c[i] += sum over k < 4 of a[k] * b[i, k], in int32."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((4,), data, offset_factor=1), b: T.Buffer((lanes, 4), "int8", offset_factor=1),
             c: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:4], b[0:lanes, 0:4])
            T.writes(c[0:lanes])
            for i, k in T.grid(lanes, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    c[vi] = c[vi] + T.Cast("int32", a[vk]) * T.Cast("int32", b[vi, vk])

    return desc


def _implementation(lanes: int, data: str, call):
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def impl(a: T.Buffer((4,), data, offset_factor=1), b: T.Buffer((lanes, 4), "int8", offset_factor=1),
             c: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:4], b[0:lanes, 0:4])
            T.writes(c[0:lanes])
            # The 4 data bytes, as one int32, in every lane: the instruction's data operand.
            spread = T.reinterpret(T.broadcast(T.reinterpret(a.vload([0], f"{data}x4"), dtype="int32"), lanes),
                                   dtype=f"{data}x{4 * lanes}")
            c[T.ramp(T.int32(0), 1, lanes)] = call(c.vload([0], dtype=f"int32x{lanes}"), spread,
                                                   b.vload([0, 0], dtype=f"int8x{4 * lanes}"))

    return impl


def _vnni(acc, data, weights):
    from tvm.script import tirx as T

    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                                   acc, data, weights, dtype="int32x16")


def _sdot(acc, data, weights):
    from tvm.script import tirx as T

    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
                                   acc, data, weights, dtype="int32x4")
