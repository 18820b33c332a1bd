"""The int8 depthwise kernel (`int8_depthwise`) agrees with onnxruntime, and depthwise
QLinearConv/ConvInteger on CPU targets use it while other grouped convolutions keep the generic path.

Bound: ConvInteger's int32 outputs are compared exactly. QLinearConv's outputs may differ by one
step of the int8 output, and in under 1% of the elements: the int32 sums are exact on both sides,
and both requantize as float32(acc) * (x_scale * w_scale / y_scale), round half to even, add the
zero point and saturate, but onnxruntime's kernels may evaluate the product with other
instructions (an FMA, another order), which moves a value that lands next to a .5 tie across it.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import codegen
from graphopt.codegen import build, cpu_pipeline, int8_depthwise, targets
from graphopt.testing.check import integer_reference

pytestmark = pytest.mark.skipif(targets.host_arch() != "x86_64", reason="runs x86 libraries on this machine")

# A JSON target with AVX-512, so that the assembly check covers it on x86 machines without it.
CASCADELAKE = '{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "cascadelake"}'
_TYPES = {np.uint8: TensorProto.UINT8, np.int8: TensorProto.INT8, np.int32: TensorProto.INT32}


def _integers(rng, dtype, shape) -> np.ndarray:
    info = np.iinfo(dtype)
    return rng.integers(info.min, int(info.max) + 1, shape).astype(dtype)


def _layer_weights(rng, prefix: str, x_type, c: int, k: int, bias: bool = True) -> dict[str, np.ndarray]:
    """One depthwise QLinearConv's initializers: non-zero zero points (per channel for the
    weights) and per-channel weight scales."""
    unsigned = x_type is np.uint8
    w_type = np.uint8 if unsigned else np.int8
    weights = {"xs": np.array(0.02, np.float32), "xz": np.array(9 if unsigned else -4, x_type),
               "w": _integers(rng, w_type, (c, 1, k, k)),
               # Outputs spread over about +-25 steps around the zero point, few saturated.
               "ws": rng.uniform(0.005, 0.015, c).astype(np.float32) / k,
               # onnxruntime takes one zero point for uint8 weights, one per channel for int8.
               "wz": np.array(128, np.uint8) if unsigned else rng.integers(-3, 4, c).astype(np.int8),
               "ys": np.array(0.05, np.float32), "yz": np.array(110 if unsigned else -6, x_type)}
    if bias:
        weights["b"] = rng.integers(-3000, 3000, c).astype(np.int32)
    return {f"{prefix}{n}": v for n, v in weights.items()}


def _qlinear_node(prefix: str, x: str, y: str, weights: dict, c: int, **attrs) -> onnx.NodeProto:
    names = [x] + [f"{prefix}{n}" for n in ("xs", "xz", "w", "ws", "wz", "ys", "yz", "b") if f"{prefix}{n}" in weights]
    return helper.make_node("QLinearConv", names, [y], group=c, **attrs)


def _model(nodes: list, x_type, x_shape: list[int], y_type, weights: dict) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "depthwise", [helper.make_tensor_value_info("x", _TYPES[x_type], x_shape)],
                              [helper.make_tensor_value_info("y", _TYPES[y_type], None)],
                              [numpy_helper.from_array(v, n) for n, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _single(rng, x_type, c=32, size=12, k=3, strides=(1, 1), pads=(1, 1, 1, 1), dilations=(1, 1), bias=True):
    weights = _layer_weights(rng, "", x_type, c, k, bias)
    node = _qlinear_node("", "x", "y", weights, c, kernel_shape=[k, k], strides=list(strides), pads=list(pads),
                         dilations=list(dilations))
    return _model([node], x_type, [1, c, size, size], x_type, weights)


def _chain(rng, x_type, c=48, size=15):
    """dw 3x3 stride 1 -> dw 5x5 stride 2: the second reads the first's NHWC output directly."""
    first, second = _layer_weights(rng, "a_", x_type, c, 3), _layer_weights(rng, "b_", x_type, c, 5)
    second["b_xs"], second["b_xz"] = first["a_ys"], first["a_yz"]  # the first's output quantization
    nodes = [_qlinear_node("a_", "x", "mid", first, c, kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             _qlinear_node("b_", "mid", "y", second, c, kernel_shape=[5, 5], pads=[2, 2, 2, 2], strides=[2, 2])]
    return _model(nodes, x_type, [1, c, size, size], x_type, {**first, **second})


def _conv_integer(rng, c=16, size=10, group=None):
    weights = {"w": _integers(rng, np.uint8, (c, 1 if group is None else c // group, 3, 3)),
               "xz": np.array(13, np.uint8), "wz": np.array(121, np.uint8)}
    node = helper.make_node("ConvInteger", ["x", "w", "xz", "wz"], ["y"], group=group or c, pads=[1, 0, 1, 2])
    return _model([node], np.uint8, [1, c, size, size], np.int32, weights)


SINGLE = {
    "u8-3x3-s1": lambda rng: _single(rng, np.uint8),
    "s8-3x3-s1": lambda rng: _single(rng, np.int8, c=48, size=9),
    "u8-5x5-s2": lambda rng: _single(rng, np.uint8, c=64, size=13, k=5, strides=(2, 2), pads=(2, 2, 2, 2)),
    "s8-5x5-s2-no-bias": lambda rng: _single(rng, np.int8, c=16, size=11, k=5, strides=(2, 2), pads=(2, 2, 2, 2),
                                             bias=False),
    "s8-3x3-s2-asymmetric-pads": lambda rng: _single(rng, np.int8, c=32, size=10, strides=(2, 2), pads=(0, 1, 1, 0)),
    "u8-3x3-no-pads-24-channels": lambda rng: _single(rng, np.uint8, c=24, size=8, pads=(0, 0, 0, 0)),
    "u8-3x3-dilated": lambda rng: _single(rng, np.uint8, c=16, size=11, pads=(2, 2, 2, 2), dilations=(2, 2)),
}


def _feeds(rng, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    types = {v: k for k, v in _TYPES.items()}
    return {i.name: _integers(rng, types[i.type.tensor_type.elem_type],
                              [d.dim_value for d in i.type.tensor_type.shape.dim]) for i in model.graph.input}


def _assert_matches_onnxruntime(model: onnx.ModelProto, target: str, folder, seed: int) -> None:
    feeds = _feeds(np.random.default_rng(seed), model)
    expected = integer_reference(model, feeds)["y"]
    got = codegen.load(codegen.compile(model, target, folder).library).run(feeds)["y"]
    assert got.dtype == expected.dtype and got.shape == expected.shape
    diff = np.abs(got.astype(np.int64) - expected.astype(np.int64))
    assert diff.max() <= (0 if expected.dtype == np.int32 else 1)  # see the module docstring
    assert (diff > 0).mean() < 0.01
    info = np.iinfo(expected.dtype)
    assert np.isin(expected, [info.min, info.max]).mean() < 0.05  # the data tests rounding, not clamping


def _kernel_names(model: onnx.ModelProto, target_name: str) -> list[str]:
    target = targets.resolve(target_name)
    lowered = build.lower_for_tuning(build.to_relax(model, None, target), target)
    return [gvar.name_hint for gvar, _ in lowered.functions_items() if gvar.name_hint != "main"]


@pytest.mark.parametrize("case", list(SINGLE))
def test_single_layer_matches_onnxruntime(case, tmp_path):
    seed = sorted(SINGLE).index(case)
    _assert_matches_onnxruntime(SINGLE[case](np.random.default_rng(seed)), "x86", tmp_path, seed)


@pytest.mark.parametrize("target", ["x86", "x86-64"])  # AVX-512 (or the host's) and SSE2 vectors
@pytest.mark.parametrize("x_type", [np.uint8, np.int8], ids=["u8", "s8"])
def test_chain_matches_onnxruntime(x_type, target, tmp_path):
    _assert_matches_onnxruntime(_chain(np.random.default_rng(3), x_type), target, tmp_path, 4)


def test_conv_integer_matches_onnxruntime_exactly(tmp_path):
    _assert_matches_onnxruntime(_conv_integer(np.random.default_rng(5)), "x86", tmp_path, 6)


@pytest.mark.parametrize("target", ["x86", "x86-64"])
def test_chain_runs_the_kernel_without_transposes_between_layers(target):
    kernels = _kernel_names(_chain(np.random.default_rng(3), np.uint8), target)
    # Two depthwise kernels; NCHW -> NHWC once before them and back once after; no generic conv2d.
    assert sum(k.startswith("int8_depthwise") for k in kernels) == 2
    assert sum("transpose" in k for k in kernels) == 2 and not any("conv2d" in k for k in kernels)


def test_conv_integer_uses_the_kernel():
    assert any(k.startswith("int8_depthwise") for k in _kernel_names(_conv_integer(np.random.default_rng(5)), "x86"))


def test_grouped_convolution_keeps_the_generic_path():
    kernels = _kernel_names(_conv_integer(np.random.default_rng(5), group=4), "x86")
    assert not any(k.startswith("int8_depthwise") for k in kernels) and any("conv2d" in k for k in kernels)


@pytest.mark.parametrize("width, vectors, registers", [(56, 6, 32), (7, 60, 32), (112, 2, 32), (13, 9, 16),
                                                       (1, 1, 16), (14, 24, 32)])
def test_register_tile_divides_the_output_and_leaves_half_the_registers(width, vectors, registers):
    pixels, per_tile = int8_depthwise.tile(width, vectors, registers)
    assert width % pixels == 0 and vectors % per_tile == 0 and pixels * per_tile <= registers // 2


def _assembly(model: onnx.ModelProto, target_name: str) -> str:
    import tvm

    target = targets.resolve(target_name)
    executable = tvm.compile(build.to_relax(model, None, target), target=target.tvm_target(),
                             relax_pipeline=cpu_pipeline.pipeline(target))
    return "\n".join(m.inspect_source("asm") for m in executable.mod.imports)


@pytest.mark.parametrize("target", [CASCADELAKE, "x86", "x86-64"])
def test_kernel_multiplies_16_bit_pairs(target):
    # (v)pmaddwd, or vpdpwssd (which also accumulates) where LLVM tunes for a CPU with VNNI that
    # runs it fast (Zen 4); never the int32 multiply (v)pmulld, twice the micro-ops.
    assembly = _assembly(_single(np.random.default_rng(0), np.uint8), target)
    assert ("pmaddwd" in assembly or "vpdpwssd" in assembly) and "pmulld" not in assembly
