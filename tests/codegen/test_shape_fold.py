"""Shape computations exporters emit (Shape -> Gather -> Unsqueeze -> Concat -> Reshape, Identity on
a shape, Shape -> Slice) compile once the input shapes are static, and agree with onnxruntime;
what cannot compile says which node and what would help."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import codegen
from graphopt.codegen import build, shape_fold
from graphopt.ir import ort
from graphopt.ir.errors import CodegenError

SHAPE_COMPUTATIONS = {
    # the acceptance model's: n = shape(c)[0]; reshape(c, [n, -1])
    "gather": [helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
               helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"]),
               helper.make_node("Concat", ["n1", "minus1"], ["shp"], axis=0)],
    # a Paddle recognizer's Identity on the shape
    "identity": [helper.make_node("Identity", ["s"], ["s2"], name="Identity.148"),
                 helper.make_node("Gather", ["s2", "zero"], ["n"], axis=0),
                 helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"]),
                 helper.make_node("Concat", ["n1", "minus1"], ["shp"], axis=0)],
    "slice": [helper.make_node("Slice", ["s", "zero1", "one1"], ["n1"]),
              helper.make_node("Concat", ["n1", "minus1"], ["shp"], axis=0)],
    # integer arithmetic TVM's frontend cannot carry as a shape: Cast, ReduceProd
    "cast_reduce": [helper.make_node("Cast", ["s"], ["s32"], to=TensorProto.INT32),
                    helper.make_node("Slice", ["s32", "one1", "four1"], ["chw"]),
                    helper.make_node("ReduceProd", ["chw"], ["p32"], keepdims=1),
                    helper.make_node("Slice", ["s32", "zero1", "one1"], ["n32"]),
                    helper.make_node("Concat", ["n32", "p32"], ["shp32"], axis=0),
                    helper.make_node("Cast", ["shp32"], ["shp"], to=TensorProto.INT64)],
}


def dynamic_flatten(kind: str = "gather") -> onnx.ModelProto:
    """Conv -> a flatten whose shape is computed from Shape(c) -> Gemm, input x [N, 1, 8, 8]."""
    rng = np.random.default_rng(2)
    weights = [numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "cw"),
               numpy_helper.from_array(rng.standard_normal((10, 4 * 36)).astype(np.float32), "gw"),
               numpy_helper.from_array(np.array(0, np.int64), "zero"),
               numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
               numpy_helper.from_array(np.array([0], np.int64), "ax0")]
    weights += [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in (("zero1", 0), ("one1", 1), ("four1", 4))]
    nodes = [helper.make_node("Conv", ["x", "cw"], ["c"]), helper.make_node("Shape", ["c"], ["s"]),
             *SHAPE_COMPUTATIONS[kind],
             helper.make_node("Reshape", ["c", "shp"], ["f"], name="Reshape@18"),
             helper.make_node("Gemm", ["f", "gw"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "dynflat", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("kind", sorted(SHAPE_COMPUTATIONS))
def test_a_computed_flatten_compiles_at_batch_1_and_matches_onnxruntime(kind, tmp_path):
    model = dynamic_flatten(kind)
    x = np.random.default_rng(3).standard_normal((1, 1, 8, 8)).astype(np.float32)
    library = codegen.load(codegen.compile(model, "x86", tmp_path).library)
    np.testing.assert_allclose(library(x), ort.run(model, {"x": x})["y"], rtol=1e-4, atol=1e-4)


def test_a_given_batch_is_what_the_shape_folds_to(tmp_path):
    model = dynamic_flatten()
    x = np.random.default_rng(4).standard_normal((3, 1, 8, 8)).astype(np.float32)
    library = codegen.load(codegen.compile(model, "x86", tmp_path, shapes={"x": [3, 1, 8, 8]}).library)
    np.testing.assert_allclose(library(x), ort.run(model, {"x": x})["y"], rtol=1e-4, atol=1e-4)


def test_fold_replaces_the_shape_computation_by_the_constant_it_computes():
    folded = shape_fold.prepare(dynamic_flatten("cast_reduce"), {"x": [2, 1, 8, 8]})
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Reshape", "Gemm"]
    constants = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    assert constants["shp"].tolist() == [2, 144] and constants["shp"].dtype == np.int64


def test_fold_leaves_a_model_without_shape_ops_as_it_is():
    no_shapes = helper.make_model(helper.make_graph(
        [helper.make_node("Transpose", ["w"], ["wt"]), helper.make_node("MatMul", ["x", "wt"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(np.eye(2, dtype=np.float32), "w")]))
    assert shape_fold.prepare(no_shapes, {"x": [1, 2]}) is no_shapes


def test_fold_does_not_write_large_values_into_the_model():
    # ConstantOfShape of a feature map's shape: a value TVM computes, not a constant to store.
    graph = helper.make_graph(
        [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("ConstantOfShape", ["s"], ["z"]),
         helper.make_node("Add", ["x", "z"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64, 64, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64, 64, 64])])
    folded = shape_fold.prepare(helper.make_model(graph), {"x": [1, 64, 64, 64]})
    assert [n.op_type for n in folded.graph.node] == ["ConstantOfShape", "Add"]
    assert numpy_helper.to_array(folded.graph.initializer[0]).tolist() == [1, 64, 64, 64]


def test_prepare_removes_identities_but_keeps_graph_outputs_and_renames_inside_subgraphs():
    then = helper.make_graph([helper.make_node("Neg", ["b"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["a"]), helper.make_node("Dropout", ["a"], ["b"]),
         helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=then),
         helper.make_node("Identity", ["b"], ["z"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]), helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2]), helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph)
    bypassed = shape_fold.prepare(model, {"x": [2], "c": []})
    assert [n.op_type for n in bypassed.graph.node] == ["If", "Identity"]
    assert bypassed.graph.node[0].attribute[0].g.node[0].input == ["x"]
    assert bypassed.graph.node[1].input == ["x"]
    feeds = {"x": np.array([1.0, -2.0], np.float32), "c": np.array(True)}
    assert all(np.array_equal(a, b) for a, b in zip(ort.run(model, feeds).values(), ort.run(bypassed, feeds).values()))


def test_a_shape_from_tensor_values_names_the_node_and_what_helps():
    # (A Reshape by a shape read from an input converts: graphopt.codegen.dynamic_shapes.)
    graph = helper.make_graph([helper.make_node("TopK", ["x", "k"], ["y", "i"], name="TopK@18")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6]),
                               helper.make_tensor_value_info("k", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3]),
                               helper.make_tensor_value_info("i", TensorProto.INT64, [2, 3])])
    with pytest.raises(CodegenError) as error:
        build.to_relax(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    message = str(error.value)
    assert message.startswith("cannot convert node 'TopK@18' (TopK): a shape it reads is computed at run time")
    assert "--input-shape" in message and "\n" not in message and "Traceback" not in message


def test_an_import_error_after_symbolic_dims_were_set_to_1_says_so():
    # A width of 1 pooled by 2 leaves nothing for the Reshape to flatten.
    graph = helper.make_graph(
        [helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
         helper.make_node("Reshape", ["p", "shape"], ["y"], name="flatten")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.array([1, 4], np.int64), "shape")])
    with pytest.raises(CodegenError, match=r"node 'flatten' \(Reshape\).*the symbolic dims x: W were set to 1"):
        build.to_relax(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))


def test_model_local_functions_are_inlined_before_import(tmp_path):
    # torch exports blocks (SqueezeExcitation, ...) as model-local functions: their bodies convert.
    body = [helper.make_node("Sigmoid", ["X"], ["s"]), helper.make_node("Mul", ["X", "s"], ["Y"])]
    silu = helper.make_function("local", "SiLUBlock", ["X"], ["Y"], body, [helper.make_opsetid("", 17)])
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
                               helper.make_node("SiLUBlock", ["c"], ["y"], domain="local", name="block")], "fn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                              functions=[silu])
    library = codegen.load(codegen.compile(model, "x86", tmp_path).library)
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(library(x), ort.run(model, {"x": x})["y"], rtol=1e-4, atol=1e-5)


def test_an_empty_tensor_concatenated_by_a_torch_export_is_dropped(tmp_path):
    # torch pads with ConstantOfShape([n, 0, 3]) -> Concat: folded, it would be an empty constant,
    # which TVM cannot load back from a library.
    inits = [numpy_helper.from_array(np.array(0, np.int64), "zero"), numpy_helper.from_array(np.array([0], np.int64), "ax"),
             numpy_helper.from_array(np.array([0, 3], np.int64), "rest")]
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["n", "ax"], ["n1"]), helper.make_node("Concat", ["n1", "rest"], ["shape"], axis=0),
             helper.make_node("ConstantOfShape", ["shape"], ["empty"],
                              value=numpy_helper.from_array(np.array([0.0], np.float32))),
             helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Concat", ["r", "empty"], ["y"], axis=1)]
    graph = helper.make_graph(nodes, "pad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    library = codegen.load(codegen.compile(model, "x86", tmp_path).library)
    x = np.random.default_rng(2).standard_normal((1, 4, 3)).astype(np.float32)
    np.testing.assert_allclose(library(x), ort.run(model, {"x": x})["y"], rtol=1e-6, atol=1e-6)
