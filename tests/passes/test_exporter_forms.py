"""Weights in the forms exporters write them: behind Transpose (x @ W^T), Identity and Cast, as
Constant nodes, shared by two nodes, in unnamed nodes, in float16. canonicalize folds them to plain
initializers, and every pass family then rewrites or refuses each layer with a reason."""
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.optimize import optimize

FLOAT_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


def exported(dtype: int) -> onnx.ModelProto:
    """Unnamed nodes (as many exporters leave them), weights behind each form, W2 shared by a Gemm."""
    rng = np.random.default_rng(0)
    npd = FLOAT_TYPES[dtype]
    weights = [numpy_helper.from_array(rng.standard_normal((8, 16)).astype(npd), "W"),
               numpy_helper.from_array(rng.standard_normal((8, 8)).astype(npd), "W2"),
               numpy_helper.from_array(rng.standard_normal((8, 8)), "W3"),
               numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(npd), "C")]
    k = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(npd))
    nodes = [helper.make_node("Conv", ["img", "C"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["cr"]),
             helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "Wt"], ["a"]),
             helper.make_node("Identity", ["W2"], ["W2i"]), helper.make_node("MatMul", ["a", "W2i"], ["b"]),
             helper.make_node("Cast", ["W3"], ["W3c"], to=dtype), helper.make_node("MatMul", ["b", "W3c"], ["y"]),
             helper.make_node("Constant", [], ["k"], value=k), helper.make_node("MatMul", ["y", "k"], ["z"]),
             helper.make_node("Gemm", ["z", "W2"], ["g"], transB=1)]
    inputs = [helper.make_tensor_value_info("x", dtype, ["N", 16]), helper.make_tensor_value_info("img", dtype, ["N", 3, 8, 8])]
    outputs = [helper.make_tensor_value_info("g", dtype, ["N", 8]), helper.make_tensor_value_info("cr", dtype, ["N", 4, 8, 8])]
    return helper.make_model(helper.make_graph(nodes, "exported", inputs, outputs, weights),
                             opset_imports=[helper.make_opsetid("", 17)])


def feeds(dtype: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    npd = FLOAT_TYPES[dtype]
    return {"x": rng.standard_normal((16, 16)).astype(npd), "img": rng.standard_normal((16, 3, 8, 8)).astype(npd)}


@pytest.mark.parametrize("dtype", FLOAT_TYPES)
def test_canonicalize_leaves_plain_initializers_on_named_layers(dtype):
    result = optimize(gs.import_onnx(exported(dtype)), "canonicalize", data=feeds(dtype), latency=False)
    assert sorted(n.op for n in result.graph.nodes) == ["Conv", "Gemm", "MatMul", "MatMul", "MatMul", "MatMul", "Relu"]
    products = [n for n in result.graph.nodes if n.op in ("Conv", "MatMul", "Gemm")]
    assert all(isinstance(n.inputs[1], gs.Constant) for n in products)
    assert len({n.name for n in result.graph.nodes}) == 7 and all(n.name for n in result.graph.nodes)


@pytest.mark.parametrize("dtype", FLOAT_TYPES)
@pytest.mark.parametrize("spec", ["quantize", "prune-magnitude", "prune-n-m", "prune-channels(ratio=0.5)",
                                  "factorize-svd(rank=2)", "factorize-tucker(rank=2)", "winograd"])
def test_every_layer_is_rewritten_or_refused_with_a_reason(dtype, spec):
    # Coverage, not fidelity: random weights at harsh settings lose accuracy by design, so the gate
    # is told to accept any loss (min_cosine=-1) and the test looks only at what was rewritten.
    result = optimize(gs.import_onnx(exported(dtype)), f"canonicalize,{spec}", data=feeds(dtype), latency=False,
                      min_cosine=-1.0)
    record = result.report["passes"][-1]
    assert record["modified"] == bool(record["decisions"])
    assert record["decisions"] or record["refused"], record
    assert all(r["node"] and r["reason"] for r in record["refused"] + record["skipped"])


def test_float16_layers_are_refused_by_quantize_with_the_reason():
    result = optimize(gs.import_onnx(exported(TensorProto.FLOAT16)), "canonicalize,quantize",
                      data=feeds(TensorProto.FLOAT16), latency=False)
    record = result.report["passes"][-1]
    assert not record["modified"] and len(record["refused"]) == 6
    assert all("float16: quantize takes float32 layers" in r["reason"] for r in record["refused"])
