"""Integer ONNX operators compiled by TVM agree with onnxruntime; the x86 and aarch64 kernels use
the dot-product instructions (vpdpbusd, sdot)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import codegen
from graphopt.codegen import build, cpu_pipeline, int8_kernels, targets
from graphopt.testing.check import integer_reference

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models"
# A JSON target with VNNI, so that the assembly check holds on x86 machines without it.
CASCADELAKE = '{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "cascadelake"}'
_TYPES = {np.uint8: TensorProto.UINT8, np.int8: TensorProto.INT8, np.int32: TensorProto.INT32}


def _has_vnni() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return targets.host_arch() == "x86_64" and cpuinfo.is_file() and "avx512_vnni" in cpuinfo.read_text()


HOST_VNNI = _has_vnni()
# x86: the host's features, so the VNNI kernels where the host has them; x86-64: the generic path.
RUN_TARGETS = [pytest.param("x86", marks=pytest.mark.skipif(not HOST_VNNI, reason="host CPU lacks avx512_vnni")),
               "x86-64"]


def _model(node: onnx.NodeProto, inputs: dict[str, tuple[np.dtype, list[int]]], out_type,
           weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node], "int8", [helper.make_tensor_value_info(n, _TYPES[t], s) for n, (t, s) in inputs.items()],
        [helper.make_tensor_value_info(node.output[0], _TYPES[out_type], None)],
        [numpy_helper.from_array(v, n) for n, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _integers(rng, dtype, shape) -> np.ndarray:
    info = np.iinfo(dtype)
    return rng.integers(info.min, int(info.max) + 1, shape).astype(dtype)


def _qlinear_conv(rng, x_type, y_type, ic=5, oc=24, size=9, pads=(1, 1, 1, 1), strides=(1, 1), dilations=(1, 1),
                  bias=True, per_channel=True, kernel=3):
    channels = oc if per_channel else ()  # per-tensor scale and zero point are scalars
    weights = {"xs": np.array(0.02, np.float32), "xz": np.array(7 if x_type is np.uint8 else -3, x_type),
               "w": _integers(rng, np.int8, (oc, ic, kernel, kernel)),
               "ws": rng.uniform(0.001, 0.01, channels).astype(np.float32),
               "wz": np.zeros(channels, np.int8), "ys": np.array(0.05, np.float32),
               "yz": np.array(100 if y_type is np.uint8 else -5, y_type)}
    names = ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"]
    if bias:
        weights["b"] = rng.integers(-5000, 5000, oc).astype(np.int32)
        names.append("b")
    node = helper.make_node("QLinearConv", names, ["y"], pads=list(pads), strides=list(strides),
                            dilations=list(dilations))
    return _model(node, {"x": (x_type, [1, ic, size, size])}, y_type, weights)


def _conv_integer(rng, ic=6, oc=20, size=7):
    # uint8 weights with zero point 128: centred, they fit int8, so the fast path takes them.
    weights = {"w": _integers(rng, np.uint8, (oc, ic, 3, 3)), "xz": np.array(9, np.uint8),
               "wz": np.array(128, np.uint8)}
    node = helper.make_node("ConvInteger", ["x", "w", "xz", "wz"], ["y"], pads=[0, 1, 2, 1], strides=[2, 1])
    return _model(node, {"x": (np.uint8, [1, ic, size, size])}, np.int32, weights)


def _qlinear_matmul(rng, a_type, rows=(3, 5), k=40, n=20):
    weights = {"as": np.array(0.03, np.float32), "az": np.array(11 if a_type is np.uint8 else 4, a_type),
               "b": _integers(rng, np.int8, (k, n)), "bs": np.array(0.004, np.float32), "bz": np.array(0, np.int8),
               "ys": np.array(0.1, np.float32), "yz": np.array(120 if a_type is np.uint8 else 2, a_type)}
    node = helper.make_node("QLinearMatMul", ["a", "as", "az", "b", "bs", "bz", "ys", "yz"], ["y"])
    return _model(node, {"a": (a_type, [*rows, k])}, a_type, weights)


def _matmul_integer(rng, constant_b=True):
    weights = {"az": np.array(-6, np.int8), "bz": np.array([3, -2, 0, 1, 5, -1, 2, 0], np.int8)}
    inputs = {"a": (np.int8, [4, 36])}
    if constant_b:
        weights["b"] = _integers(rng, np.int8, (36, 8)) // 2  # centred by bz it still fits int8
    else:
        inputs["b"] = (np.int8, [36, 8])
    node = helper.make_node("MatMulInteger", ["a", "b", "az", "bz"], ["y"])
    return _model(node, inputs, np.int32, weights)


CASES = {
    "qconv-u8": lambda rng: _qlinear_conv(rng, np.uint8, np.uint8),
    "qconv-s8-stride-asym-pad": lambda rng: _qlinear_conv(rng, np.int8, np.int8, pads=(1, 0, 2, 1), strides=(2, 2),
                                                          bias=False, per_channel=False),
    "qconv-u8-dilated": lambda rng: _qlinear_conv(rng, np.uint8, np.uint8, ic=32, oc=16, dilations=(2, 2)),
    "qconv-pointwise": lambda rng: _qlinear_conv(rng, np.uint8, np.uint8, ic=64, oc=48, size=7, pads=(0, 0, 0, 0),
                                                 kernel=1),
    "conv-integer": _conv_integer,
    "qmatmul-u8": lambda rng: _qlinear_matmul(rng, np.uint8),
    "qmatmul-s8": lambda rng: _qlinear_matmul(rng, np.int8, rows=(1, 2, 7), k=33, n=17),
    "matmul-integer": _matmul_integer,
    "matmul-integer-dynamic-b": lambda rng: _matmul_integer(rng, constant_b=False),
}


def _feeds(rng, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    types = {v: k for k, v in _TYPES.items()}
    return {i.name: _integers(rng, types[i.type.tensor_type.elem_type],
                              [d.dim_value for d in i.type.tensor_type.shape.dim]) for i in model.graph.input}


@pytest.mark.parametrize("target", RUN_TARGETS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_onnxruntime_within_one_step(case, target, tmp_path):
    rng = np.random.default_rng(sorted(CASES).index(case))
    model = CASES[case](rng)
    feeds = _feeds(rng, model)
    expected = integer_reference(model, feeds)["y"]
    got = codegen.load(codegen.compile(model, target, tmp_path).library).run(feeds)["y"]
    assert got.dtype == expected.dtype and got.shape == expected.shape
    diff = np.abs(got.astype(np.int64) - expected.astype(np.int64))
    # Integer outputs are exact; requantized ones may differ by one step where the float product
    # lands on a rounding tie, which neither side computes exactly.
    assert diff.max() <= (0 if expected.dtype == np.int32 else 1)
    assert (diff > 0).mean() < 0.01


def _chain(rng) -> onnx.ModelProto:
    """QLinearConv -> DequantizeLinear -> Relu -> Add (residual) -> QuantizeLinear -> QLinearConv:
    a float island between two int8 kernels, as quantize_static leaves one."""
    first = _qlinear_conv(rng, np.uint8, np.uint8, ic=8, oc=16, size=10)
    second = _qlinear_conv(rng, np.uint8, np.uint8, ic=16, oc=16, size=10)
    weights = {t.name: numpy_helper.to_array(t) for t in first.graph.initializer}
    weights.update({f"{t.name}2": numpy_helper.to_array(t) for t in second.graph.initializer})
    nodes = [helper.make_node("QLinearConv", list(first.graph.node[0].input), ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("DequantizeLinear", ["a", "ys", "yz"], ["af"]),
             helper.make_node("Relu", ["af"], ["ar"]),
             helper.make_node("Add", ["ar", "af"], ["s"]),
             helper.make_node("QuantizeLinear", ["s", "xs2", "xz2"], ["q"]),
             helper.make_node("QLinearConv", ["q", *[f"{n}2" for n in second.graph.node[0].input[1:]]], ["y"],
                              pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 8, 10, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("target", RUN_TARGETS)
def test_chain_matches_onnxruntime(target, tmp_path):
    rng = np.random.default_rng(7)
    model = _chain(rng)
    feeds = _feeds(rng, model)
    got = codegen.load(codegen.compile(model, target, tmp_path).library).run(feeds)["y"]
    diff = np.abs(got.astype(np.int64) - integer_reference(model, feeds)["y"].astype(np.int64))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_chain_runs_without_transposes_between_kernels():
    target = targets.resolve(CASCADELAKE)
    lowered = build.lower_for_tuning(build.to_relax(_chain(np.random.default_rng(7)), None, target), target)
    kernels = [gvar.name_hint for gvar, _ in lowered.functions_items() if gvar.name_hint != "main"]
    # The model's NCHW input becomes NHWC once, and its output NCHW once; nothing in between.
    assert sum("transpose" in k for k in kernels) == 2 and sum(k.startswith("int8_conv") for k in kernels) == 2


def _assembly(model: onnx.ModelProto, target_name: str) -> str:
    import tvm

    target = targets.resolve(target_name)
    mod = build.to_relax(model, None, target)
    executable = tvm.compile(mod, target=target.tvm_target(), relax_pipeline=cpu_pipeline.pipeline(target))
    return "\n".join(m.inspect_source("asm") for m in executable.mod.imports)


@pytest.mark.parametrize("target,instruction", [(CASCADELAKE, "vpdpbusd"), ("arm-dotprod", "sdot")])
def test_kernels_use_the_dot_product_instruction(target, instruction):
    rng = np.random.default_rng(0)
    assert instruction in _assembly(_qlinear_conv(rng, np.uint8, np.uint8), target)
    assert instruction in _assembly(_qlinear_matmul(rng, np.int8), target)


@pytest.mark.parametrize("target,instruction", [("x86-64", "vpdpbusd"), ("arm", "sdot")])
def test_without_dot_product_the_generic_kernel_is_used(target, instruction):
    assert instruction not in _assembly(_qlinear_conv(np.random.default_rng(0), np.uint8, np.uint8), target)


def test_cuda_builds_with_the_generic_kernel(tmp_path):
    result = codegen.compile(_qlinear_conv(np.random.default_rng(0), np.int8, np.int8), "cuda", tmp_path)
    assert result.library.is_file()


@pytest.mark.parametrize("inst", [int8_kernels.VNNI, int8_kernels.SDOT], ids=["vnni", "sdot"])
@pytest.mark.parametrize("width, blocks", [(56, 4), (7, 32), (1, 64), (256, 64), (13, 5)])
def test_register_tile_divides_the_output_and_fits_the_registers(inst, width, blocks):
    pixels, per_tile = int8_kernels._tile(width, blocks, inst)
    assert width % pixels == 0 and blocks % per_tile == 0
    assert pixels * per_tile <= inst.accumulators and pixels * per_tile + per_tile + 1 <= inst.registers


def test_register_tile_of_a_7x7_image_does_not_spill():
    assert int8_kernels._tile(7, 32, int8_kernels.VNNI) == (7, 2)


# -- the digits CNN, quantized by onnxruntime -------------------------------------------------
def _with_gemm_as_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """Gemm(x, W, b, transB=1) as MatMul + Add, so that quantize_static emits QLinearMatMul (it
    turns Gemm into com.microsoft's QGemm, which neither TVM nor graphopt imports)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    weights = {t.name: t for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "Gemm" or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 \
                or attrs.get("beta", 1.0) != 1.0 or node.input[1] not in weights:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(weights[node.input[1]])
        weights[node.input[1]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w.T if attrs.get("transB") else w),
                                                                node.input[1]))
        product = f"{node.output[0]}_matmul"
        nodes.append(helper.make_node("MatMul", node.input[:2], [product]))
        nodes.append(helper.make_node("Add", [product, node.input[2]], list(node.output)))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


@pytest.fixture(scope="module")
def digits_int8(tmp_path_factory) -> Path:
    quantization = pytest.importorskip("onnxruntime.quantization")
    folder = tmp_path_factory.mktemp("digits")
    source = folder / "digits_matmul.onnx"
    onnx.save(_with_gemm_as_matmul(onnx.load(MODELS / "digits_cnn.onnx")), source)
    calibration = np.load(MODELS / "digits_calib.npz")["x"][:64]

    class Reader(quantization.CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": calibration[i:i + 1]} for i in range(len(calibration))])

        def get_next(self):
            return next(self.batches, None)

    quantized = folder / "digits_int8.onnx"
    quantization.quantize_static(str(source), str(quantized), Reader(), quant_format=quantization.QuantFormat.QOperator,
                                 per_channel=True, op_types_to_quantize=["Conv", "MatMul"],
                                 activation_type=quantization.QuantType.QUInt8,
                                 weight_type=quantization.QuantType.QInt8)
    ops = {n.op_type for n in onnx.load(quantized).graph.node}
    assert {"QLinearConv", "QLinearMatMul"} <= ops
    return quantized


def _digits_predictions_agree(got: np.ndarray, expected: np.ndarray) -> None:
    assert (got.argmax(1) != expected.argmax(1)).sum() <= 3


@pytest.mark.skipif(not HOST_VNNI, reason="host CPU lacks avx512_vnni")
def test_quantized_digits_predictions_match_onnxruntime(digits_int8, tmp_path):
    x = np.load(MODELS / "digits_test.npz")["x"]
    expected = integer_reference(onnx.load(digits_int8), {"x": x})
    name = next(iter(expected))
    lib = codegen.load(codegen.compile(digits_int8, "x86", tmp_path, shapes={"x": list(x.shape)}).library)
    _digits_predictions_agree(lib.run({"x": x})[name], expected[name])


def _arm_env():
    # tools/ is a folder of scripts, not a package.
    spec = importlib.util.spec_from_file_location("arm_env", REPO / "tools" / "arm_env.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.mark.arm_emulated
def test_quantized_digits_built_for_arm_dotprod_matches_onnxruntime(digits_int8, tmp_path):
    arm_env = _arm_env()
    if not arm_env.is_ready():
        pytest.skip(f"no emulated aarch64 environment in {arm_env.env_dir()} (python tools/arm_env.py setup)")
    x = np.load(MODELS / "digits_test.npz")["x"][:32]
    expected = integer_reference(onnx.load(digits_int8), {"x": x})
    name = next(iter(expected))
    library = codegen.compile(digits_int8, "arm-dotprod", tmp_path, shapes={"x": list(x.shape)}).library
    got = arm_env.run(library, [x])[0]
    _digits_predictions_agree(got, expected[name])
    # Float logits from int8 layers: equal up to a step of the last quantized layer.
    assert np.abs(got - expected[name]).max() < 0.5


@pytest.mark.parametrize("target", ["x86", "x86-64"])
def test_lowered_digits_predictions_match_onnxruntime(digits_lowered, target, tmp_path):
    if target == "x86" and not HOST_VNNI:
        pytest.skip("host CPU lacks avx512_vnni")
    x = np.load(MODELS / "digits_test.npz")["x"]
    expected = integer_reference(onnx.load(digits_lowered), {"x": x})["logits"]
    lib = codegen.load(codegen.compile(digits_lowered, target, tmp_path, shapes={"x": list(x.shape)}).library)
    _digits_predictions_agree(lib.run({"x": x})["logits"], expected)


@pytest.mark.arm_emulated
@pytest.mark.parametrize("target", ["arm", "arm-dotprod"])
def test_lowered_digits_built_for_arm_matches_onnxruntime(digits_lowered, target, tmp_path):
    arm_env = _arm_env()
    if not arm_env.is_ready():
        pytest.skip(f"no emulated aarch64 environment in {arm_env.env_dir()} (python tools/arm_env.py setup)")
    x = np.load(MODELS / "digits_test.npz")["x"][:64]
    expected = integer_reference(onnx.load(digits_lowered), {"x": x})["logits"]
    library = codegen.compile(digits_lowered, target, tmp_path, shapes={"x": list(x.shape)}).library
    _digits_predictions_agree(arm_env.run(library, [x])[0], expected)
