"""deploy.build_for_target builds the static-shaped library for the data it measures fidelity on."""
import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper

from graphopt import deploy
from graphopt.codegen import resolve
from graphopt.ir import ort


def pooled_rows():
    """x [N, 1, 4, W] -> 2x2 max pool -> reshaped to [n, 2, -1] by a shape computed from x: a
    symbolic width of 1 pools to nothing."""
    graph = helper.make_graph(
        [helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
         helper.make_node("Shape", ["p"], ["s"]), helper.make_node("Slice", ["s", "zero", "one"], ["n"]),
         helper.make_node("Concat", ["n", "rest"], ["shape"], axis=0),
         helper.make_node("Reshape", ["p", "shape"], ["y"])], "rows",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, "R"])],
        [numpy_helper.from_array(np.array([0], np.int64), "zero"), numpy_helper.from_array(np.array([1], np.int64), "one"),
         numpy_helper.from_array(np.array([2, -1], np.int64), "rest")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_symbolic_dims_are_built_at_the_data_s_shape(tmp_path):
    model = pooled_rows()
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 1, 4, 16)).astype(np.float32)}
    graph = gs.import_onnx(model)
    assert deploy.library_shapes(graph, feeds) == {"x": (1, 1, 4, 16)}
    section = deploy.build_for_target(graph, resolve("x86"), tmp_path, feeds, ort.run(model, feeds))
    assert section["fidelity"]["y"]["max_abs"] == 0.0
