"""The int8 kernels on Intel AMX tiles: built for Sapphire Rapids they hold the tile instructions;
their loop nest, offsets, strides and tile configuration compute the convolution exactly when the
tile instructions are replaced by plain TIR with AMX's documented semantics (this runs on any
CPU); on an AMX host the real library agrees with onnxruntime. Dispatch: amx, vnni, sdot, generic."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest

from graphopt import codegen
from graphopt.codegen import amx_kernels, amx_permission, int8_kernels, targets
from graphopt.codegen.int8_kernels import ConvShape, Requant
from graphopt.ir import ort
from graphopt.ir.errors import CodegenError

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models"
SAPPHIRE_RAPIDS = '{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "sapphirerapids"}'
# VNNI code this x86 host runs, with AMX's features: kernel_for says "amx", and the emulated tiles
# put no AMX instruction in the library.
CASCADELAKE_AMX = ('{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "cascadelake", '
                   '"mattr": ["+amx-tile", "+amx-int8"]}')


def _cpu_flags() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.read_text() if targets.host_arch() == "x86_64" and cpuinfo.is_file() else ""


HOST_VNNI = "avx512_vnni" in _cpu_flags()


class EmulatedTiles:
    """AMX's tile instructions as plain TIR, with the semantics Intel documents: ldtilecfg's
    64-byte layout decides each tile's rows and bytes per row, tileloadd/tilestored move rows a
    stride apart, tdpbusd adds unsigned bytes of A times signed bytes of B in groups of 4."""

    def configure(self, config) -> None:
        from tvm.script.ir_builder import tirx as T

        self.config = T.alloc_buffer((64,), "uint8", scope="local")
        with T.serial(0, 64) as i:
            T.buffer_store(self.config, config[i], [i])
        self.bytes = T.alloc_buffer((8, 16, 64), "uint8", scope="local")
        self.sums = T.alloc_buffer((8, 16, 16), "int32", scope="local")

    def _rows(self, tile: int):
        return self.config[48 + tile].astype("int32")

    def _colsb(self, tile: int):
        return self.config[16 + 2 * tile].astype("int32") + self.config[17 + 2 * tile].astype("int32") * 256

    def zero(self, tile: int) -> None:
        from tvm.script.ir_builder import tirx as T

        with T.serial(0, 16) as r, T.serial(0, 16) as n:
            T.buffer_store(self.sums, T.int32(0), [tile, r, n])

    def load(self, tile: int, buffer, offset, stride: int) -> None:
        from tvm.script.ir_builder import tirx as T

        assert buffer.dtype in ("uint8", "int8")
        flat = T.decl_buffer((_size(buffer),), buffer.dtype, data=buffer.data)
        with T.serial(0, self._rows(tile)) as r, T.serial(0, self._colsb(tile)) as b:
            T.buffer_store(self.bytes, flat[offset + r * stride + b].astype("uint8"), [tile, r, b])

    def dot(self, c: int, a: int, b: int) -> None:
        from tvm.script.ir_builder import tirx as T

        with T.serial(0, self._rows(c)) as m, T.serial(0, self._colsb(c) // 4) as n, \
                T.serial(0, self._colsb(a)) as k:
            product = (self.bytes[a, m, k].astype("int32")
                       * self.bytes[b, k // 4, n * 4 + k % 4].astype("int8").astype("int32"))
            T.buffer_store(self.sums, self.sums[c, m, n] + product, [c, m, n])

    def store(self, tile: int, buffer, offset, stride: int) -> None:
        from tvm.script.ir_builder import tirx as T

        assert buffer.dtype == "int32"
        flat = T.decl_buffer((_size(buffer),), "int32", data=buffer.data)
        with T.serial(0, self._rows(tile)) as r, T.serial(0, self._colsb(tile) // 4) as n:
            T.buffer_store(flat, self.sums[tile, r, n], [offset + r * (stride // 4) + n])

    def release(self) -> None:
        pass


def _size(buffer) -> int:
    return int(np.prod([int(d) for d in buffer.shape]))


# -- the tiling and its configuration ------------------------------------------------------------
SHAPES = {
    "3x3-pad": ConvShape(1, 9, 9, 5, 24, 3, 3, pads=(1, 1, 1, 1)),
    "stride-asym-pad": ConvShape(2, 11, 10, 3, 16, 3, 3, strides=(2, 2), pads=(1, 0, 2, 1)),
    "dilated": ConvShape(1, 12, 12, 32, 16, 3, 3, dilations=(2, 2), pads=(2, 2, 2, 2)),
    "two-chunks-wide": ConvShape(1, 3, 40, 100, 48, 1, 3, pads=(0, 1, 0, 1)),
    "two-pixel-tiles": ConvShape(1, 2, 32, 64, 32, 1, 1),
    "three-chunks": ConvShape(1, 5, 5, 130, 20, 1, 1),
    "one-channel": ConvShape(1, 8, 8, 1, 16, 3, 3, pads=(1, 1, 1, 1)),
    "matmul": ConvShape(1, 1, 35, 33, 17, 1, 1),
    "matmul-one-row": ConvShape(1, 1, 1, 64, 10, 1, 1),
}


def _decoded(config: bytes) -> tuple[list[int], list[int]]:
    """(rows, bytes per row) of the 8 tiles, checking what LDTILECFG faults on."""
    assert config[0] == 1 and config[1] == 0, "palette 1, start row 0"
    assert not any(config[2:16]) and not any(config[32:48]) and not any(config[56:64]), "reserved bytes are 0"
    colsb = [int.from_bytes(config[16 + 2 * i:18 + 2 * i], "little") for i in range(8)]
    rows = list(config[48:56])
    for r, c in zip(rows, colsb):
        assert (r == 0) == (c == 0) and r <= 16 and c <= 64
    return rows, colsb


@pytest.mark.parametrize("name", list(SHAPES))
def test_plan_fits_the_tiles_and_tdpbusd_shapes(name):
    shape = SHAPES[name]
    plan = amx_kernels.plan(shape)
    _, ow = shape.out_hw
    assert plan.chunk % 4 == 0 and plan.chunk <= 64 and plan.channels % plan.chunk == 0 and plan.channels >= shape.c
    assert plan.channels - shape.c < 4 * (plan.channels // plan.chunk), "padding below one quad per chunk"
    assert plan.out_w >= ow and plan.out_w % (plan.rows * plan.pixel_tiles) == 0 and plan.out_w - ow < plan.rows
    assert plan.blocks % plan.channel_tiles == 0
    rows, colsb = _decoded(plan.config())
    used = {plan.c_tile(p, q) for p in range(plan.pixel_tiles) for q in range(plan.channel_tiles)}
    used |= {plan.a_tile(p) for p in range(plan.pixel_tiles)} | {plan.b_tile(q) for q in range(plan.channel_tiles)}
    assert len(used) == plan.pixel_tiles * plan.channel_tiles + plan.pixel_tiles + plan.channel_tiles <= 8
    assert {i for i in range(8) if rows[i]} == used
    for p in range(plan.pixel_tiles):
        for q in range(plan.channel_tiles):
            c, a, b = plan.c_tile(p, q), plan.a_tile(p), plan.b_tile(q)
            # tdpbusd: C is M x N*4 bytes, A M x K bytes, B K/4 x N*4 bytes.
            assert rows[c] == rows[a] == plan.rows and colsb[c] == colsb[b] == 64
            assert colsb[a] == plan.chunk and rows[b] == plan.chunk // 4


def test_weights_are_vnni_packed_with_channels_padded_to_whole_chunks():
    w = np.random.default_rng(0).integers(-128, 128, (20, 100, 3, 3)).astype(np.int8)
    packed = amx_kernels.pack_weights(w, int8_kernels.VNNI)
    assert packed.shape == (2, 3, 3, 26, 16, 4)  # 100 channels: 2 chunks of 52
    # B row r of tap (i, j), chunk k holds channels 4r..4r+3 of chunk k for 16 output channels.
    assert packed[1, 2, 0, 13, 3, 2] == w[19, 54, 2, 0]
    assert not packed[:, :, :, 25].any() and not packed[1, :, :, :, 4:].any()  # channels 100-103, outputs 20-31


# -- the kernel, with emulated tiles, against numpy ---------------------------------------------
def _reference(x: np.ndarray, w: np.ndarray, bias: np.ndarray, shape: ConvShape, zero_point: int) -> np.ndarray:
    """sum((x - zero_point) * w) + bias, NHWC, x padded with its zero point: int32."""
    top, left, bottom, right = shape.pads
    padded = np.pad(x.astype(np.int32) - zero_point, ((0, 0), (top, bottom), (left, right), (0, 0)))
    oh, ow = shape.out_hw
    (sh, sw), (dh, dw) = shape.strides, shape.dilations
    acc = np.zeros((shape.n, oh, ow, shape.oc), np.int64)
    for i in range(shape.kh):
        for j in range(shape.kw):
            patch = padded[:, i * dh:i * dh + (oh - 1) * sh + 1:sh, j * dw:j * dw + (ow - 1) * sw + 1:sw]
            acc += np.einsum("nyxc,oc->nyxo", patch, w[:, :, i, j].astype(np.int64))
    return (acc + bias).astype(np.int32)


def _requantized(acc: np.ndarray, scale: np.ndarray, requant: Requant) -> np.ndarray:
    info = np.iinfo(requant.dtype)
    value = np.clip(acc.astype(np.float32) * scale, info.min - requant.zero_point, info.max - requant.zero_point)
    return (np.rint(value).astype(np.int32) + requant.zero_point).astype(requant.dtype)


def _run_emulated(shape: ConvShape, data_dtype: str, zero_point: int, requant: Requant | None, rng):
    import tvm

    inst = int8_kernels.VNNI
    info = np.iinfo(data_dtype)
    x = rng.integers(info.min, int(info.max) + 1, (shape.n, shape.h, shape.w, shape.c)).astype(data_dtype)
    w = rng.integers(-128, 128, (shape.oc, shape.c, shape.kh, shape.kw)).astype(np.int8)
    bias = rng.integers(-5000, 5000, shape.oc).astype(np.int64)
    scale = rng.uniform(0.0005, 0.003, shape.oc).astype(np.float32)
    ocp = amx_kernels.plan(shape).blocks * amx_kernels.LANES
    # As int8_import folds it: the kernel's data is shifted to uint8, so is its zero point.
    kernel_zero_point = int8_kernels.kernel_zero_point(zero_point, data_dtype, inst)
    folded = bias - kernel_zero_point * w.astype(np.int64).sum(axis=(1, 2, 3))
    args = [x, amx_kernels.pack_weights(w, inst), np.pad(folded, (0, ocp - shape.oc)).astype(np.int32)]
    if requant is not None:
        args.append(np.pad(scale, (0, ocp - shape.oc)))
    oh, ow = shape.out_hw
    out = np.zeros((shape.n, oh, ow, shape.oc), "int32" if requant is None else requant.dtype)
    func = amx_kernels.conv_kernel(shape, data_dtype, zero_point, inst, requant, tiles=EmulatedTiles())
    kernel = tvm.tirx.build(func.with_attr("global_symbol", "kernel"), target=tvm.target.Target({"kind": "llvm"}))
    tensors = [tvm.runtime.tensor(a) for a in [*args, out]]
    kernel["kernel"](*tensors)
    expected = _reference(x, w, bias, shape, zero_point)
    return tensors[-1].numpy(), expected if requant is None else _requantized(expected, scale, requant)


@pytest.mark.parametrize("name", list(SHAPES))
def test_emulated_tiles_compute_the_convolution_exactly(name):
    rng = np.random.default_rng(sorted(SHAPES).index(name))
    got, expected = _run_emulated(SHAPES[name], "uint8", 7, None, rng)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("data_dtype, zero_point, requant", [("uint8", 9, Requant("uint8", 100)),
                                                              ("int8", -3, Requant("int8", -5))])
def test_emulated_tiles_requantize_as_onnxruntime(data_dtype, zero_point, requant):
    got, expected = _run_emulated(SHAPES["3x3-pad"], data_dtype, zero_point, requant, np.random.default_rng(1))
    np.testing.assert_array_equal(got, expected)


# -- dispatch ------------------------------------------------------------------------------------
@pytest.mark.parametrize("target, kernel", [
    (SAPPHIRE_RAPIDS, "amx"),
    ('{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "sapphirerapids", "mattr": ["-amx-int8"]}', "vnni"),
    ('{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "cascadelake"}', "vnni"),
    ("arm-dotprod", "sdot"), ("x86-64", "generic"), ("arm", "generic"), ("cuda", "generic")])
def test_dispatch_picks_the_best_int8_kernel_of_the_target(target, kernel):
    assert int8_kernels.kernel_for(targets.resolve(target).tvm_target()) == kernel


def test_no_target_gets_the_generic_kernel():
    assert int8_kernels.kernel_for(None) == "generic"


@pytest.mark.parametrize("refused", [True, False])
def test_x86_leaves_amx_out_where_linux_refuses_it(refused, monkeypatch):
    import tvm

    monkeypatch.setattr(amx_permission, "refusal", lambda: "Linux refuses" if refused else None)
    spec = targets.runnable_here({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "sapphirerapids"})
    assert int8_kernels.kernel_for(tvm.target.Target(spec)) == ("vnni" if refused else "amx")


def test_x86_takes_amx_from_the_cpu_flags_where_llvm_names_an_older_cpu():
    """Under a hypervisor LLVM names a Sapphire Rapids "rocketlake": the flags Linux reports decide."""
    import tvm

    flags = {"avx512f", "avx512_vnni", "amx_tile", "amx_int8", "amx_bf16"}
    spec = targets._with_cpuinfo_features({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "rocketlake"}, flags)
    assert int8_kernels.kernel_for(tvm.target.Target(spec)) == "amx"
    zen = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4"}
    assert targets._with_cpuinfo_features(zen, {"avx512f", "avx512_vnni"}) == zen  # nothing it lacks


# -- the int8 digits CNN ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_amx(digits_lowered, tmp_path_factory) -> codegen.build.BuildResult:
    x = np.load(MODELS / "digits_test.npz")["x"]
    return codegen.compile(digits_lowered, SAPPHIRE_RAPIDS, tmp_path_factory.mktemp("amx"), shapes={"x": list(x.shape)})


def test_digits_for_sapphire_rapids_holds_the_tile_instructions(digits_amx):
    assert digits_amx.manifest["libraries"][digits_amx.library.name]["int8_instruction"] == "amx"
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump is not installed (binutils): cannot disassemble the library")
    disassembly = subprocess.run([objdump, "-d", str(digits_amx.library)], capture_output=True, text=True,
                                 check=True).stdout
    mnemonics = set(re.findall(r"^\s*[0-9a-f]+:\t[0-9a-f ]+\t(\w+)", disassembly, re.MULTILINE))
    assert {"ldtilecfg", "tilezero", "tileloadd", "tdpbusd", "tilestored", "tilerelease"} <= mnemonics


def _digits_predictions_agree(got: np.ndarray, expected: np.ndarray) -> None:
    """test_int8's tolerance for the lowered digits CNN."""
    assert (got.argmax(1) != expected.argmax(1)).sum() <= 3


@pytest.mark.skipif(amx_permission.refusal() is None, reason="Linux grants this process AMX")
def test_loading_an_amx_library_where_amx_is_refused_says_why_in_one_line(digits_amx):
    with pytest.raises(CodegenError) as error:
        codegen.load(digits_amx.library)
    message = str(error.value)
    assert "\n" not in message and "AMX" in message and "--target x86" in message


@pytest.mark.skipif("amx_int8" not in _cpu_flags(), reason="CPU has no AMX-INT8")
def test_amx_library_matches_onnxruntime(digits_lowered, digits_amx, tmp_path):
    if amx_permission.refusal() is not None:
        pytest.skip(amx_permission.refusal())
    x = np.load(MODELS / "digits_test.npz")["x"]
    expected = ort.run(onnx.load(digits_lowered), {"x": x})["logits"]
    got = codegen.load(digits_amx.library).run({"x": x})["logits"]
    _digits_predictions_agree(got, expected)
    # The same integer sums and epilogue as the VNNI kernels: the same logits, bit for bit.
    vnni = SAPPHIRE_RAPIDS.replace('}', ', "mattr": ["-amx-tile", "-amx-int8"]}')
    library = codegen.compile(digits_lowered, vnni, tmp_path, shapes={"x": list(x.shape)}).library
    np.testing.assert_array_equal(got, codegen.load(library).run({"x": x})["logits"])


@pytest.mark.skipif(not HOST_VNNI, reason="host CPU lacks avx512_vnni (the emulated library is VNNI code)")
def test_digits_on_emulated_tiles_match_the_vnni_library_and_onnxruntime(digits_lowered, tmp_path, monkeypatch):
    x = np.load(MODELS / "digits_test.npz")["x"]
    monkeypatch.setattr(amx_kernels, "INTRINSICS", EmulatedTiles())
    monkeypatch.setattr(amx_permission, "require", lambda library: None)  # no AMX instruction to permit
    emulated = codegen.compile(digits_lowered, CASCADELAKE_AMX, tmp_path / "amx", shapes={"x": list(x.shape)})
    assert emulated.manifest["libraries"][emulated.library.name]["int8_instruction"] == "amx"
    got = codegen.load(emulated.library).run({"x": x})["logits"]
    _digits_predictions_agree(got, ort.run(onnx.load(digits_lowered), {"x": x})["logits"])
    vnni = CASCADELAKE_AMX.replace("+amx", "-amx")
    library = codegen.compile(digits_lowered, vnni, tmp_path / "vnni", shapes={"x": list(x.shape)}).library
    np.testing.assert_array_equal(got, codegen.load(library).run({"x": x})["logits"])
