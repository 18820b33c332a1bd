"""Concrete input shapes: parsing --input-shape, checking it against the model, and specializing a
graph so that shapes behind exporter-style shape arithmetic are known (and MACs are right)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from graphopt.ir.errors import DataError
from graphopt.ir.graph import infer_shapes
from graphopt.ir.shapes import check_input_shapes, parse_input_shapes, specialize
from graphopt.report import summarize
from graphopt.testing.tiny import with_dims

DIGITS = Path(__file__).resolve().parents[2] / "models" / "digits_cnn.onnx"


def dynamic_flatten() -> gs.Graph:
    """Conv, then the flatten torch exports: Shape -> Gather(0) -> Unsqueeze -> Concat(-1) ->
    Reshape, then Gemm; x is [N, 1, H, W]."""
    r = np.random.default_rng(0)
    inits = [nh.from_array(r.standard_normal((4, 1, 3, 3)).astype(np.float32), "cw"),
             nh.from_array(r.standard_normal((10, 144)).astype(np.float32), "gw"),
             nh.from_array(np.array(0, np.int64), "zero"), nh.from_array(np.array([-1], np.int64), "minus1"),
             nh.from_array(np.array([0], np.int64), "ax0")]
    nodes = [h.make_node("Conv", ["x", "cw"], ["c"], name="conv"), h.make_node("Shape", ["c"], ["s"]),
             h.make_node("Gather", ["s", "zero"], ["n"], axis=0), h.make_node("Unsqueeze", ["n", "ax0"], ["n1"]),
             h.make_node("Concat", ["n1", "minus1"], ["shp"], axis=0), h.make_node("Reshape", ["c", "shp"], ["f"]),
             h.make_node("Gemm", ["f", "gw"], ["y"], transB=1, name="gemm")]
    graph = h.make_graph(nodes, "dynflat", [h.make_tensor_value_info("x", T.FLOAT, ["N", 1, "H", "W"])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["N", 10])], inits)
    return gs.import_onnx(h.make_model(graph, opset_imports=[h.make_opsetid("", 13)]))


def attention_scores(d: int = 16, heads: int = 2) -> gs.Graph:
    """q = x Wq split into heads by a Reshape whose shape is computed from Shape(x) (batch and
    sequence gathered, heads and head size appended), then scores = q k^T per head; x is [B, T, d]."""
    r = np.random.default_rng(1)
    inits = [nh.from_array(r.standard_normal((d, d)).astype(np.float32), "wq"),
             nh.from_array(r.standard_normal((d, d)).astype(np.float32), "wk"),
             nh.from_array(np.array([0, 1], np.int64), "bt"), nh.from_array(np.array([heads, d // heads], np.int64), "hd")]
    nodes = [h.make_node("MatMul", ["x", "wq"], ["q"], name="q"), h.make_node("MatMul", ["x", "wk"], ["k"], name="k"),
             h.make_node("Shape", ["x"], ["xs"]), h.make_node("Gather", ["xs", "bt"], ["b_t"], axis=0),
             h.make_node("Concat", ["b_t", "hd"], ["split"], axis=0),
             h.make_node("Reshape", ["q", "split"], ["qh"]), h.make_node("Reshape", ["k", "split"], ["kh"]),
             h.make_node("Transpose", ["qh"], ["qt"], perm=[0, 2, 1, 3]),
             h.make_node("Transpose", ["kh"], ["kt"], perm=[0, 2, 3, 1]),
             h.make_node("MatMul", ["qt", "kt"], ["scores"], name="scores")]
    graph = h.make_graph(nodes, "attn", [h.make_tensor_value_info("x", T.FLOAT, ["B", "T", d])],
                         [h.make_tensor_value_info("scores", T.FLOAT, None)], inits)
    return gs.import_onnx(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]))




def test_parse_input_shapes():
    assert parse_input_shapes(["x=1,3,48,320", "s=", " ids = 2,64"]) == {"x": (1, 3, 48, 320), "s": (), "ids": (2, 64)}
    assert parse_input_shapes([]) == {}


@pytest.mark.parametrize("spec, message", [
    ("x", "--input-shape 'x': write NAME=D0,D1,..."),
    ("=1,2", "--input-shape '=1,2': write NAME=D0,D1,..."),
    ("x=1,a", "--input-shape 'x=1,a': dims must be integers separated by commas"),
    ("x=1,0,8", "--input-shape 'x=1,0,8': every dim must be positive"),
    ("x=-1,8", "--input-shape 'x=-1,8': every dim must be positive"),
])
def test_parse_errors_say_what_to_write(spec, message):
    with pytest.raises(DataError) as info:
        parse_input_shapes([spec])
    assert str(info.value).startswith(message)


def test_an_input_given_twice_is_an_error():
    with pytest.raises(DataError, match="input 'x' is given twice"):
        parse_input_shapes(["x=1,2", "x=1,3"])


@pytest.mark.parametrize("shapes, message", [
    ({"image": (1, 1, 8, 8)}, "m.onnx: --input-shape image: the model has no input 'image' (inputs: x)"),
    ({"x": (1, 8, 8)}, "m.onnx: --input-shape x=1,8,8: input 'x' has rank 4 [N, 1, H, W], not 3"),
    ({"x": (1, 3, 8, 8)}, "m.onnx: --input-shape x=1,3,8,8: input 'x' has dim 1 fixed at 1 [N, 1, H, W]"),
])
def test_shapes_are_checked_against_the_model(shapes, message):
    with pytest.raises(DataError) as info:
        check_input_shapes(dynamic_flatten(), shapes, "m.onnx")
    assert str(info.value) == message


def test_dynamic_flatten_is_specialized_through_the_shape_arithmetic():
    graph = dynamic_flatten()
    special = specialize(graph, {"x": (2, 1, 8, 8)})
    shapes = {t.name: t.shape for t in special.tensors().values() if isinstance(t, gs.Variable)}
    assert shapes["c"] == [2, 4, 6, 6] and shapes["f"] == [2, 144] and shapes["y"] == [2, 10]
    layers = summarize(special, layers=True)["layers"]
    assert {x["name"]: x["macs"] for x in layers if x["macs"]} == {"conv": 2 * 4 * 36 * 9, "gemm": 2 * 10 * 144}
    # The graph itself keeps its symbolic dims; onnx's own inference alone loses the Reshape's rank.
    assert graph.inputs[0].shape == ["N", 1, "H", "W"]
    assert next(t for t in infer_shapes(graph).tensors().values() if t.name == "f").shape is None


def test_without_shapes_the_rank_behind_a_symbolic_reshape_is_known():
    special = specialize(dynamic_flatten(), {})
    f = next(t for t in special.tensors().values() if t.name == "f")
    assert len(f.shape) == 2 and f.shape[0] == "N" and isinstance(f.shape[1], str)


def test_attention_macs_under_symbolic_batch_and_sequence():
    d, heads, seq = 16, 2, 64
    summary = summarize(attention_scores(d, heads), shapes={"x": (1, seq, d)})
    projections = 2 * seq * d * d
    scores = heads * seq * seq * (d // heads)
    assert summary["macs"] == projections + scores
    assert summary["input_shapes"] == {"x": [1, seq, d]} and "symbolic_dims" not in summary
    unspecialized = summarize(infer_shapes(attention_scores(d, heads)))
    assert unspecialized["macs"] < summary["macs"] / 30 and unspecialized["symbolic_dims"] == ["T"]


def test_digits_with_symbolic_batch_and_spatial_dims_counts_the_static_models_macs():
    model = onnx.load(DIGITS)
    static = summarize(infer_shapes(gs.import_onnx(with_dims(model, [1, 1, 8, 8]))))["macs"]
    symbolic = gs.import_onnx(with_dims(model, ["N", 1, "H", "W"]))
    assert summarize(infer_shapes(symbolic.copy()))["macs"] < static / 10  # H and W counted as 1
    # The weights are over the skeleton's size limit: inference reads their dims only.
    assert summarize(symbolic, shapes={"x": (1, 1, 8, 8)})["macs"] == static == 484_992


def test_graphopts_own_function_ops_are_inferred_too():
    from graphopt.passes.conv.winograd import Winograd
    from graphopt.passes.manager import PassManager
    from graphopt.testing.check import rng_array
    from graphopt.testing.tiny import model, node

    graph = gs.import_onnx(model([node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])],
                                 {"x": (1, 4, 6, 6)}, {"y": None}, {"w": rng_array((8, 4, 3, 3))}))
    PassManager([Winograd(emit="tvm", tile=4)]).run(graph)  # an ai.graphopt::WinogradConv marker
    static = summarize(graph)["macs"]
    graph.inputs[0].shape = ["N", 4, "H", "W"]
    graph.outputs[0].shape = None
    special = specialize(graph, {"x": (1, 4, 6, 6)})
    assert special.outputs[0].shape == [1, 8, 6, 6]
    assert summarize(graph, shapes={"x": (1, 4, 6, 6)})["macs"] == static == 4608
