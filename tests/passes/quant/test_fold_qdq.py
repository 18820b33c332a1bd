import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.ir import ort
from graphopt.ir.graph import export
from graphopt.ir.verify import NO_WEIGHT_QDQ, check
from graphopt.passes.quant.fold_qdq import FoldQDQ, QParams, quantize
from graphopt.passes.registry import lookup
from graphopt.testing.check import check_pass, ops, refusals, rng_array
from graphopt.testing.tiny import model, node

ZP_TYPES = {"int8": np.int8, "uint8": np.uint8}


def qdq(src, out, axis=1, zp="z", suffix=""):
    inputs = [src, "s", zp] if zp else [src, "s"]
    return [node("QuantizeLinear", inputs, [f"q{suffix}"], name=f"q{suffix}", axis=axis),
            node("DequantizeLinear", [f"q{suffix}", *inputs[1:]], [out], name=f"dq{suffix}", axis=axis)]


def params(channels, dtype, seed=0):
    """Scales and zero points; channels=None means per-tensor."""
    rng = np.random.default_rng(seed)
    shape = () if channels is None else (channels,)
    s = rng.uniform(0.01, 0.05, shape).astype(np.float32)
    lo, hi = (-10, 10) if dtype is np.int8 else (118, 138)
    return {"s": s, "z": rng.integers(lo, hi, shape).astype(dtype)}


def with_ties(w, s, axis):
    """Put some weights exactly half-way between two integers, where rounding mode matters."""
    w = w.copy()
    scale = s if s.ndim == 0 else s.reshape([-1 if i == axis else 1 for i in range(w.ndim)])
    ties = (np.arange(w.size).reshape(w.shape) % 7 - 3 + 0.5).astype(np.float32) * scale
    return np.where(np.arange(w.size).reshape(w.shape) % 3 == 0, ties.astype(np.float32), w)


def conv_fq(dtype, per_channel):
    p = params(8 if per_channel else None, dtype)
    w = with_ties(rng_array((8, 3, 3, 3), 2) * 0.2, p["s"], 0)
    nodes = qdq("w", "wd", axis=0) + [node("Conv", ["x", "wd"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    return model(nodes, {"x": (2, 3, 6, 6)}, {"y": None}, {"w": w, **p})


def gemm_fq(dtype, per_channel, op):
    p = params(6 if per_channel else None, dtype, seed=3)
    w = with_ties(rng_array((5, 6), 4) * 0.2, p["s"], 1)
    mm = node(op, ["x", "wd"], ["y"], name="mm")
    return model(qdq("w", "wd", axis=1) + [mm], {"x": (3, 5)}, {"y": None}, {"w": w, **p})


def assert_bit_identical(before: onnx.ModelProto, after, seeds=(0, 1)):
    for seed in seeds:
        feeds = {"x": rng_array([d.dim_value for d in before.graph.input[0].type.tensor_type.shape.dim], seed)}
        ref, out = ort.run(before, feeds), ort.run(export(after), feeds)
        for name in ref:
            np.testing.assert_array_equal(out[name], ref[name])


def folded(graph):
    """The graph as a model, after checking that no QuantizeLinear is left on a constant."""
    assert check(graph, [NO_WEIGHT_QDQ]) == []
    return export(graph)


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("dtype", ZP_TYPES.values(), ids=ZP_TYPES)
def test_conv_weight_becomes_integer(dtype, per_channel):
    m = conv_fq(dtype, per_channel)
    graph, result, _ = check_pass(m, FoldQDQ())
    out = folded(graph)
    assert result.stats["applied"] == {"fold-weight-qdq": 1}
    weight = next(i for i in out.graph.initializer if i.name == "q")
    assert numpy_helper.to_array(weight).dtype == dtype
    assert_bit_identical(m, graph)


@pytest.mark.parametrize("op", ["Gemm", "MatMul"])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("dtype", ZP_TYPES.values(), ids=ZP_TYPES)
def test_gemm_and_matmul_weights(dtype, per_channel, op):
    m = gemm_fq(dtype, per_channel, op)
    graph, _, _ = check_pass(m, FoldQDQ())
    folded(graph)
    assert ops(graph) == ["DequantizeLinear", op]
    assert_bit_identical(m, graph)


@pytest.mark.parametrize("dtype, lo, hi", [(np.int16, -300, 300), (ml_dtypes.uint4, 0, 15),
                                           (ml_dtypes.int4, -8, 7)], ids=["int16", "uint4", "int4"])
def test_wider_and_sub_byte_types(dtype, lo, hi):
    s = np.float32(0.1)
    w = (np.random.default_rng(5).uniform(lo - 3, hi + 3, (6, 5)) * s).astype(np.float32)
    nodes = qdq("w", "wd") + [node("MatMul", ["x", "wd"], ["y"], name="mm")]
    m = model(nodes, {"x": (3, 6)}, {"y": None}, {"w": w, "s": s, "z": np.array(1, dtype)}, opset=21)
    graph, _, _ = check_pass(m, FoldQDQ())
    folded(graph)
    assert_bit_identical(m, graph)


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_quantize_matches_onnxruntime_elementwise(axis):
    """Many random values, so that x * (1 / scale) in place of x / scale would show."""
    x = np.random.default_rng(7).standard_normal((64, 512)).astype(np.float32) * 3
    p = params(None if axis is None else x.shape[axis], np.int8, seed=8)
    graph = helper.make_graph([node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=axis or 0)], "q",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("q", TensorProto.INT8, x.shape)],
                              [numpy_helper.from_array(v, k) for k, v in p.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    params_ = QParams(p["s"], p["z"], TensorProto.INT8, axis)
    np.testing.assert_array_equal(quantize(x, params_), ort.run(m, {"x": x})["q"])


def test_saturates_like_onnxruntime():
    p = params(None, np.int8)
    w = np.array([[-1e9, 1e9], [np.inf, -np.inf]], np.float32)
    m = model(qdq("w", "wd") + [node("Add", ["x", "wd"], ["y"])], {"x": (2, 2)}, {"y": None}, {"w": w, **p})
    graph, _, _ = check_pass(m, FoldQDQ())
    assert_bit_identical(m, graph)


def test_no_zero_point_means_uint8():
    p = params(None, np.uint8)
    m = model(qdq("w", "wd", zp=None) + [node("MatMul", ["x", "wd"], ["y"])], {"x": (3, 5)}, {"y": None},
              {"w": rng_array((5, 6), 4), "s": p["s"]})
    graph, _, _ = check_pass(m, FoldQDQ())
    assert numpy_helper.to_array(folded(graph).graph.initializer[0]).dtype == np.uint8
    assert_bit_identical(m, graph)


def test_weight_read_by_two_quantizers_folds_both():
    p = params(None, np.int8)
    nodes = (qdq("w", "a") + qdq("w", "b", suffix="2")
             + [node("Add", ["x", "a"], ["xa"]), node("Add", ["xa", "b"], ["y"])])
    m = model(nodes, {"x": (3, 5)}, {"y": None}, {"w": rng_array((3, 5), 4), **p})
    graph, result, _ = check_pass(m, FoldQDQ())
    folded(graph)
    assert result.stats["applied"] == {"fold-weight-qdq": 2}


def test_q_dq_q_chain_collapses_to_first_q():
    p = params(None, np.uint8)
    nodes = [node("QuantizeLinear", ["x", "s", "z"], ["q1"], name="q1"),
             node("DequantizeLinear", ["q1", "s", "z"], ["d1"], name="d1"),
             node("QuantizeLinear", ["d1", "s", "z"], ["q2"], name="q2"),
             node("DequantizeLinear", ["q2", "s", "z"], ["y"], name="d2")]
    m = model(nodes, {"x": (3, 5)}, {"y": None}, p)
    graph, result, _ = check_pass(m, FoldQDQ())
    assert ops(graph) == ["QuantizeLinear", "DequantizeLinear"]
    assert result.stats["applied"] == {"drop-dq-q": 1}
    assert_bit_identical(m, graph)


def test_dq_q_on_stored_integer_weight_collapses():
    s = np.array([0.02, 0.03, 0.04], np.float32)
    wq = np.random.default_rng(9).integers(-128, 128, (5, 3)).astype(np.int8)
    nodes = [node("DequantizeLinear", ["wq", "s"], ["d1"], name="d1", axis=1),
             node("QuantizeLinear", ["d1", "s"], ["q2"], name="q2", axis=-1, output_dtype=TensorProto.INT8),
             node("DequantizeLinear", ["q2", "s"], ["wd"], name="d2", axis=1),
             node("MatMul", ["x", "wd"], ["y"], name="mm")]
    m = model(nodes, {"x": (3, 5)}, {"y": None}, {"wq": wq, "s": s}, opset=21)
    graph, _, _ = check_pass(m, FoldQDQ())
    assert ops(graph) == ["DequantizeLinear", "MatMul"]
    assert_bit_identical(m, graph)


def test_dq_q_with_different_scale_is_kept():
    p = params(None, np.uint8)
    nodes = [node("QuantizeLinear", ["x", "s", "z"], ["q1"], name="q1"),
             node("DequantizeLinear", ["q1", "s", "z"], ["d1"], name="d1"),
             node("QuantizeLinear", ["d1", "s2", "z"], ["q2"], name="q2"),
             node("DequantizeLinear", ["q2", "s2", "z"], ["y"], name="d2")]
    m = model(nodes, {"x": (3, 5)}, {"y": None}, {**p, "s2": p["s"] * 2})
    _, result, _ = check_pass(m, FoldQDQ(), expect_modified=False)
    assert any("differ in scale" in r for r in refusals(result))


def test_refuses_weight_shared_with_float_reader():
    p = params(None, np.int8)
    nodes = qdq("w", "wd") + [node("Add", ["x", "wd"], ["a"]), node("Add", ["a", "w"], ["y"], name="raw")]
    m = model(nodes, {"x": (3, 5)}, {"y": None}, {"w": rng_array((3, 5), 4), **p})
    graph, result, _ = check_pass(m, FoldQDQ(), expect_modified=False)
    assert "weight 'w' is shared with Add 'raw'; it stays float" in refusals(result)
    assert "QuantizeLinear" in ops(graph)


def test_refuses_scale_computed_at_run_time():
    p = params(None, np.int8)
    nodes = [node("Abs", ["x"], ["ax"]), node("ReduceMax", ["ax"], ["s"], keepdims=0)] + qdq("w", "wd") + [
        node("Add", ["x", "wd"], ["y"])]
    m = model(nodes, {"x": (3, 5)}, {"y": None}, {"w": rng_array((3, 5), 4), "z": p["z"]})
    _, result, _ = check_pass(m, FoldQDQ(), expect_modified=False)
    assert any("computed at run time" in r for r in refusals(result))


def test_refuses_quantized_graph_output():
    p = params(None, np.int8)
    q = node("QuantizeLinear", ["w", "s", "z"], ["q"], name="q")
    m = model([node("Identity", ["x"], ["y"]), q], {"x": (3, 5)}, {"y": None, "q": (3, 5)},
              {"w": rng_array((3, 5), 4), **p})
    m.graph.output[1].type.tensor_type.elem_type = TensorProto.INT8
    _, result, _ = check_pass(m, FoldQDQ(), expect_modified=False)
    assert any("is a graph output" in r for r in refusals(result))


def test_registered():
    assert lookup("fold-qdq") is FoldQDQ


# -- the fake-quant digits model of the acceptance script ---------------------------------------
def fake_quant_twin(qdq_model: onnx.ModelProto) -> onnx.ModelProto:
    """Each int8 weight of quantize_static's QDQ output back to float, behind a QuantizeLinear with
    the same scale and zero point: the numerics of a QAT export (as acceptance/6-quantize.sh does)."""
    m = onnx.ModelProto()
    m.CopyFrom(qdq_model)
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    for n in list(g.node):
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits:
            continue
        q = numpy_helper.to_array(inits[n.input[0]])
        if q.dtype != np.int8 or q.ndim < 2:
            continue
        s = numpy_helper.to_array(inits[n.input[1]])
        z = numpy_helper.to_array(inits[n.input[2]]) if len(n.input) > 2 else np.zeros_like(s, np.int8)
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        shape[axis] = -1
        f = ((q.astype(np.float32) - z.reshape(shape).astype(np.float32)) * s.reshape(shape)).astype(np.float32)
        g.initializer.append(numpy_helper.from_array(f, n.input[0] + "_float"))
        g.initializer.remove(inits[n.input[0]])
        g.node.insert(list(g.node).index(n), helper.make_node(
            "QuantizeLinear", [n.input[0] + "_float", n.input[1], n.input[2]], [n.input[0] + "_fq"], axis=axis))
        n.input[0] = n.input[0] + "_fq"
    return m


@pytest.fixture(scope="module")
def digits_fake_quant(tmp_path_factory):
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    calib = np.load("models/digits_calib.npz")["x"].astype(np.float32)[:64]
    name = onnx.load("models/digits_cnn.onnx").graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{name: calib[i:i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.it, None)

    path = tmp_path_factory.mktemp("digits") / "ort_q.onnx"
    quantize_static("models/digits_cnn.onnx", str(path), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return fake_quant_twin(onnx.load(str(path)))


def test_digits_fake_quant_folds_to_int8(digits_fake_quant):
    test = np.load("models/digits_test.npz")
    x, labels = test["x"].astype(np.float32), test["y"]
    name = digits_fake_quant.graph.input[0].name
    graph, result, _ = check_pass(digits_fake_quant, FoldQDQ(), inputs=[{name: x[:8]}])
    out = folded(graph)
    assert out.ByteSize() < 0.6 * digits_fake_quant.ByteSize(), result.stats["constant_bytes"]
    before, after = (next(iter(ort.run(mdl, {name: x}).values())) for mdl in (digits_fake_quant, out))
    np.testing.assert_array_equal(after, before)
    assert (after.argmax(1) == labels).mean() == (before.argmax(1) == labels).mean()
