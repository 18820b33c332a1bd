"""Activations that are genuinely negative, through quantize and lower-int8, against the float model.

The digits model's activations are never negative (pixels, then Relu), so there a uint8 zero point
of round(lo / scale) in place of round(-lo / scale) changes nothing. Here a layer reads N(-0.5, 1)
inputs with no Relu before it and (with a bias of -1) writes outputs of about [-5, 3]; its output
goes on to an Identity, so it is quantized too.
"""
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from graphopt.ir import ort
from graphopt.passes.base import PassContext
from graphopt.passes.quant.insert_qdq import Quantize
from graphopt.passes.quant.lower_int8 import LowerInt8
from graphopt.passes.quant.shift_uint8 import u8s8_inexact
from graphopt.testing.check import check_pass, ops
from graphopt.testing.tiny import model, node

K, N = 16, 8
INPUTS = {"Conv": (4, K, 4, 4), "Gemm": (64, K), "MatMul": (64, K)}
FORMS = {"Conv": "QLinearConv", "Gemm": "MatMulInteger+Add+Cast+Mul+QuantizeLinear", "MatMul": "QLinearMatMul"}


def to_kn(op: str, w: np.ndarray) -> np.ndarray:
    """A layer's weight as the [K, N] matrix that multiplies channels-last inputs."""
    return {"Conv": lambda: w[:, :, 0, 0].T, "Gemm": lambda: w.T, "MatMul": lambda: w}[op]()


def channels_last(op: str, t: np.ndarray) -> np.ndarray:
    return np.moveaxis(t, 1, -1) if op == "Conv" else t


def layer_model(op: str) -> onnx.ModelProto:
    """x -> layer (1x1 Conv, Gemm with transB, or MatMul) -> h -> Identity -> y."""
    kn = (np.random.default_rng(0).standard_normal((K, N)) * 0.3).astype(np.float32)
    w = {"Conv": kn.T[:, :, None, None], "Gemm": np.ascontiguousarray(kn.T), "MatMul": kn}[op]
    weights = {"w": w, "b": np.full(N, -1.0, np.float32)}
    if op == "MatMul":
        layer, weights = node("MatMul", ["x", "w"], ["h"], name="layer"), {"w": w}
    else:
        layer = node(op, ["x", "w", "b"], ["h"], name="layer", **({"transB": 1} if op == "Gemm" else {}))
    shape = INPUTS[op]
    out = (shape[0], N, *shape[2:])
    return model([layer, node("Identity", ["h"], ["y"])], {"x": shape}, {"y": out}, weights)


def initializer(m: onnx.ModelProto, name: str) -> np.ndarray:
    return onnx.numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == name))


def dequantized(graph: gs.Graph, tensor: str) -> tuple[float, int]:
    """(scale, zero point) of the QuantizeLinear that reads `tensor`."""
    q = next(n for n in graph.nodes if n.op == "QuantizeLinear" and n.inputs[0].name == tensor)
    return float(q.inputs[1].values), int(q.inputs[2].values)


def layer_values(graph: gs.Graph, slot: int) -> np.ndarray:
    """The float values the QDQ layer computes with for input `slot`: integers x scale."""
    dq = next(n for n in graph.nodes if n.name == "layer").inputs[slot].inputs[0]
    q, s = dq.inputs[0].values.astype(np.float32), dq.inputs[1].values
    shape = [1] * q.ndim
    if s.ndim:
        shape[dq.attrs.get("axis", 1)] = -1
    return q * s.reshape(shape)


@pytest.mark.parametrize("activation_type", ["uint8", "int8"])
@pytest.mark.parametrize("op", ["Conv", "Gemm", "MatMul"])
def test_negative_activations_within_steps_of_float(op, activation_type):
    if activation_type == "uint8" and u8s8_inexact():  # onnxruntime's u8 x s8 saturates on this CPU
        pytest.skip(u8s8_inexact())
    m = layer_model(op)
    feeds = {"x": (np.random.default_rng(1).standard_normal(INPUTS[op]) - 0.5).astype(np.float32)}
    h = channels_last(op, ort.run(m, feeds)["y"])
    assert feeds["x"].min() < -2 and h.min() < -3 < 2 < h.max()  # genuinely negative, asymmetric

    qdq = gs.import_onnx(m)
    assert Quantize(activation_type=activation_type).run(qdq, PassContext(feeds=feeds)).modified
    # lower-int8 with its default activations="auto": int8 activations are shifted to uint8 where
    # this host's onnxruntime computes u8 x s8 exactly, and stay int8 where it does not.
    shifts = u8s8_inexact() is None
    lowered, result, _ = check_pass(qdq, LowerInt8(), inputs=[feeds])
    assert result.decisions["layer"]["form"] == FORMS[op] and "DequantizeLinear" in ops(lowered)
    assert result.stats["uint8_activations"] == (2 if activation_type == "int8" and shifts else 0)
    assert not result.refused
    if shifts:
        assert all(np.dtype(t.dtype) == np.uint8 for t in lowered.tensors().values()
                   if isinstance(t, gs.Variable) and t.dtype is not None and np.dtype(t.dtype).itemsize == 1)

    sx, _ = dequantized(qdq, "x")
    sh, _ = dequantized(qdq, "h")
    # The QDQ layer's error against the float one: input rounding (half a step of x) times the
    # weights, the weights' own rounding times the input, and the bias's rounding.
    w, wq = to_kn(op, initializer(m, "w")), to_kn(op, layer_values(qdq, 1))
    bias = np.abs(layer_values(qdq, 2) - initializer(m, "b")) if op != "MatMul" else 0.0
    x = channels_last(op, feeds["x"])
    bound = sx / 2 * np.abs(wq).sum(0) + np.abs(x) @ np.abs(wq - w) + bias
    qdq_y = channels_last(op, ort.run(qdq, feeds)["y"])
    low_y = channels_last(op, ort.run(lowered, feeds)["y"])
    # Then the output's own rounding, and lower-int8's one step on the integers.
    assert np.all(np.abs(qdq_y - h) <= bound + sh + 1e-5), np.abs(qdq_y - h).max()
    assert np.all(np.abs(low_y - qdq_y) <= sh * 1.001), np.abs(low_y - qdq_y).max() / sh
    assert np.all(np.abs(low_y - h) <= bound + 2 * sh + 1e-5), np.abs(low_y - h).max()
