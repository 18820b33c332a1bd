"""Helpers over gs.Graph: cycle finding, shape inference, Constant nodes to initializers, skeletons."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper

from graphopt.ir.graph import (SKELETON_MAX_ELEMENTS, constant_nodes_to_initializers, find_cycle,
                               infer_shapes, np_dtype, skeleton, static_shape)


def chain(*edges: tuple[str, list[str], list[str]]) -> onnx.GraphProto:
    """A graph of Identity/Sum nodes named by `edges`: (name, inputs, outputs)."""
    nodes = [helper.make_node("Sum", inputs, outputs, name=name) for name, inputs, outputs in edges]
    return helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])


def test_acyclic_graph_has_no_cycle():
    assert find_cycle(chain(("a", ["x"], ["t"]), ("b", ["t", "x"], ["y"]))) == []


def test_acyclic_graph_out_of_order_has_no_cycle():
    assert find_cycle(chain(("b", ["t"], ["y"]), ("a", ["x"], ["t"]))) == []


def test_two_node_cycle():
    assert find_cycle(chain(("a", ["x", "u"], ["t"]), ("b", ["t"], ["u"]), ("c", ["u"], ["y"]))) == ["a", "b"]


def test_self_loop():
    assert find_cycle(chain(("a", ["x"], ["t"]), ("b", ["t", "y"], ["y"]))) == ["b"]


def test_cycle_excludes_nodes_only_downstream_of_it():
    graph = chain(("d", ["x"], ["p"]), ("a", ["p", "w"], ["u"]), ("b", ["u"], ["v"]), ("c", ["v"], ["w"]),
                  ("e", ["w"], ["q"]), ("f", ["q"], ["y"]))
    assert find_cycle(graph) == ["a", "b", "c"]


def test_cycle_reported_from_its_first_node_in_file_order():
    graph = chain(("c", ["b_out"], ["c_out"]), ("a", ["x", "c_out"], ["a_out"]), ("b", ["a_out"], ["b_out"]))
    assert find_cycle(graph) == ["c", "a", "b"]


def test_unnamed_nodes_are_named_by_index_and_op():
    graph = chain(("", ["x", "u"], ["t"]), ("", ["t"], ["u"]))
    assert find_cycle(graph) == ["#0:Sum", "#1:Sum"]


def test_infer_shapes_fills_intermediate_shapes():
    w = numpy_helper.from_array(np.ones((3, 5), np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Transpose", ["h"], ["t"], name="tr", perm=[1, 0]),
             helper.make_node("Relu", ["t"], ["y"], name="relu")]
    model = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=[w]),
        opset_imports=[helper.make_opsetid("", 17)])
    graph = gs.import_onnx(model)
    assert graph.tensors()["t"].shape is None
    infer_shapes(graph)
    tensors = graph.tensors()
    assert tensors["h"].shape == ["n", 5]
    assert tensors["t"].shape == [5, "n"] and tensors["t"].dtype == np.float32
    assert tensors["y"].shape == [5, "n"]
    assert static_shape(tensors["t"]) is None


def test_infer_shapes_with_large_initializer_uses_skeleton():
    big = SKELETON_MAX_ELEMENTS * 2
    w = numpy_helper.from_array(np.ones((4, big), np.float32), "W")
    model = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=[w]),
        opset_imports=[helper.make_opsetid("", 17)])
    graph = infer_shapes(gs.import_onnx(model))
    assert static_shape(graph.tensors()["y"]) == (2, big)


def test_skeleton_moves_large_initializers_to_inputs():
    small = numpy_helper.from_array(np.ones(4, np.float32), "small")
    large = numpy_helper.from_array(np.ones(SKELETON_MAX_ELEMENTS + 1, np.float32), "large")
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Add", ["small", "large"], ["y"], name="add")], "g", [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [SKELETON_MAX_ELEMENTS + 1])],
        initializer=[small, large]),
        opset_imports=[helper.make_opsetid("", 17)])
    out = skeleton(model)
    assert [t.name for t in out.graph.initializer] == ["small"]
    assert [i.name for i in out.graph.input] == ["large"]
    onnx.checker.check_model(out)


def test_constant_nodes_to_initializers_counts_and_keeps_unsupported_ones():
    nodes = [helper.make_node("Constant", [], ["a"], name="ca", value_ints=[1, 2]),
             helper.make_node("Constant", [], ["s"], name="cs", value_string="text"),
             helper.make_node("Constant", [], ["f"], name="cf", value_float=2.5),
             helper.make_node("Add", ["x", "f"], ["y"], name="add"),
             helper.make_node("Identity", ["a"], ["a_out"], name="ia"),
             helper.make_node("Identity", ["s"], ["s_out"], name="is")]
    outputs = [helper.make_tensor_value_info(n, t, None)
               for n, t in (("y", TensorProto.FLOAT), ("a_out", TensorProto.INT64), ("s_out", TensorProto.STRING))]
    model = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])], outputs),
        opset_imports=[helper.make_opsetid("", 17)])
    graph = gs.import_onnx(model)
    assert constant_nodes_to_initializers(graph) == 2
    assert [n.name for n in graph.nodes if n.op == "Constant"] == ["cs"]
    tensors = graph.tensors()
    np.testing.assert_array_equal(tensors["a"].values, np.array([1, 2], np.int64))
    assert tensors["f"].values.dtype == np.float32 and float(tensors["f"].values) == 2.5


def test_np_dtype_reads_onnx_type_numbers_and_numpy_dtypes():
    assert np_dtype(np.float32) == np.dtype(np.float32)
    assert np_dtype(TensorProto.BFLOAT16).name == "bfloat16"
    assert np_dtype(np.int64(TensorProto.FLOAT8E4M3FN)).name == "float8_e4m3fn"
