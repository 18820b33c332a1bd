"""graphopt.testing.check.signed_reference: the same integers through onnxruntime's s8 x s8 kernels,
the reference integer kernels are checked against on CPUs where its u8 x s8 kernels saturate."""
import numpy as np
from onnx import TensorProto, helper, numpy_helper

from graphopt.ir import ort
from graphopt.testing.check import integer_reference, signed_reference


def _model(op_node, inputs, outputs, weights):
    return helper.make_model(helper.make_graph([op_node], "m", inputs, outputs,
                                               [numpy_helper.from_array(v, k) for k, v in weights.items()]),
                             opset_imports=[helper.make_opsetid("", 13)])


def test_matmul_integer_is_exact_where_u8_x_s8_pairs_overflow_16_bits():
    rng = np.random.default_rng(0)
    x = np.concatenate([np.full((1, 64), 255, np.uint8), rng.integers(0, 256, (7, 64)).astype(np.uint8)])
    w = np.concatenate([np.full((64, 1), 127, np.int8), rng.integers(-128, 128, (64, 3)).astype(np.int8)], axis=1)
    zx = np.array(3, np.uint8)
    m = _model(helper.make_node("MatMulInteger", ["x", "w", "zx"], ["y"]),
               [helper.make_tensor_value_info("x", TensorProto.UINT8, [8, 64])],
               [helper.make_tensor_value_info("y", TensorProto.INT32, [8, 4])], {"w": w, "zx": zx})
    exact = (x.astype(np.int64) - 3) @ w.astype(np.int64)
    assert np.array_equal(ort.run(signed_reference(m), {"x": x})["y"], exact)
    assert np.array_equal(integer_reference(m, {"x": x})["y"], exact)


def test_qlinearconv_with_uint8_output_is_the_exact_requantization():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (2, 16, 5, 5)).astype(np.uint8)
    w = rng.integers(-127, 128, (4, 16, 3, 3)).astype(np.int8)
    sx, sw, sy, zx, zy = 0.02, 0.01, 0.9, 120, 130
    m = _model(helper.make_node("QLinearConv", ["x", "sx", "zx", "w", "sw", "zw", "sy", "zy"], ["y"], pads=[1] * 4),
               [helper.make_tensor_value_info("x", TensorProto.UINT8, [2, 16, 5, 5])],
               [helper.make_tensor_value_info("y", TensorProto.UINT8, [2, 4, 5, 5])],
               {"sx": np.array(sx, np.float32), "zx": np.array(zx, np.uint8), "w": w, "sw": np.array(sw, np.float32),
                "zw": np.array(0, np.int8), "sy": np.array(sy, np.float32), "zy": np.array(zy, np.uint8)})
    padded = np.pad(x.astype(np.int64) - zx, ((0, 0), (0, 0), (1, 1), (1, 1)))
    acc = sum(np.einsum("nchw,oc->nohw", padded[:, :, i:i + 5, j:j + 5], w[:, :, i, j].astype(np.int64))
              for i in range(3) for j in range(3))
    expected = np.clip(np.rint(acc * (np.float32(sx) * np.float32(sw) / np.float32(sy))) + zy, 0, 255)
    got = ort.run(signed_reference(m), {"x": x})["y"]
    assert got.dtype == np.uint8
    assert np.abs(got.astype(np.int64) - expected).max() <= 1  # float requantization may round the other way
