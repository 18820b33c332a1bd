"""Shapes only the run knows (NonZero, a Range or a Tile as long as an input's value): the
importer keeps them expressible (dynamic_shapes, symbolic_values), TVM's fusion does not move a
kernel before its dimensions are known (dataflow_split), and each library agrees with
onnxruntime on several inputs of one static shape whose values give other output shapes. And
OneHot (one_hot), which these models use."""
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import codegen
from graphopt.codegen import build, dataflow_split
from graphopt.ir import ort

F, I64 = TensorProto.FLOAT, TensorProto.INT64


def make(nodes, inputs, outputs, weights=None, opset=13):
    """`inputs` and `outputs`: name -> (elem_type, shape or None)."""
    graph = helper.make_graph(
        nodes, "dynamic",
        [helper.make_tensor_value_info(n, t, s) for n, (t, s) in inputs.items()],
        [helper.make_tensor_value_info(n, t, s) for n, (t, s) in outputs.items()],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in (weights or {}).items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def agrees_on_each(model, runs, tmp_path):
    """Compile once (the first run's shapes), then compare every run with onnxruntime."""
    lib = codegen.load(codegen.compile(model, "x86", tmp_path).library)
    for feeds in runs:
        reference = ort.run(model, feeds)
        got = lib.run(feeds)
        for name, expected in reference.items():
            assert got[name].shape == expected.shape, name
            np.testing.assert_allclose(got[name], expected, rtol=1e-6, atol=1e-6, err_msg=name)
    return lib


def n(name, op, inputs, **attrs):
    return helper.make_node(op, inputs, [name], name=name, **attrs)


def test_tile_and_reshape_by_a_computed_shape(tmp_path):
    """Tile by [1, max(counts), 1] (a Cast to int32 and back, as tf2onnx writes it), then Reshape
    to [prod(Shape[:2]), Shape[2:]] and a multiply by a [2] weight, which needs the last dim known."""
    nodes = [n("ex", "Exp", ["x"]),
             n("m", "ReduceMax", ["counts"], axes=[0], keepdims=1),
             n("m32", "Cast", ["m"], to=TensorProto.INT32),
             n("reps32", "Concat", ["one32", "m32", "one32"], axis=0),
             n("reps", "Cast", ["reps32"], to=I64),
             n("t", "Tile", ["ex", "reps"]),
             n("ts", "Shape", ["t"]),
             n("lead", "Slice", ["ts", "zero", "two"]),
             n("rows", "ReduceProd", ["lead"], axes=[0], keepdims=1),
             n("tail", "Slice", ["ts", "two", "big"]),
             n("shape", "Concat", ["rows", "tail"], axis=0),
             n("r", "Reshape", ["t", "shape"]),
             n("y", "Mul", ["r", "w"])]
    weights = {"one32": np.array([1], np.int32), "zero": np.array([0]), "two": np.array([2]),
               "big": np.array([9]), "w": np.array([1.5, -2.0], np.float32)}
    model = make(nodes, {"x": (F, [3, 1, 2]), "counts": (I64, [3])}, {"y": (F, None)}, weights)
    x = np.random.default_rng(0).standard_normal((3, 1, 2)).astype(np.float32)
    agrees_on_each(model, [{"x": x, "counts": np.array(c)} for c in ([2, 4, 1], [1, 1, 1], [5, 0, 3])], tmp_path)


def test_reshape_with_zero_and_minus_one_around_a_value(tmp_path):
    """Reshape x [2, 6] to [0, m, -1], m read from the data: 0 copies, -1 takes the rest."""
    nodes = [n("m", "ReduceMax", ["counts"], axes=[0], keepdims=1),
             n("shape", "Concat", ["zero", "m", "minus"], axis=0),
             n("y", "Reshape", ["x", "shape"])]
    model = make(nodes, {"x": (F, [2, 6]), "counts": (I64, [2])}, {"y": (F, None)},
                 {"zero": np.array([0]), "minus": np.array([-1])})
    x = np.arange(12, dtype=np.float32).reshape(2, 6)
    agrees_on_each(model, [{"x": x, "counts": np.array(c)} for c in ([3, 1], [1, 2], [6, 6])], tmp_path)


def nonzero_model():
    """y = x[x > 0] (NonZero), u = v[v > 0]; outputs y + u (two unrelated run-time lengths,
    broadcast), y * w (w static [4]: the run's length must be 4 or 1) and ConstantOfShape(Shape(y))."""
    def positives(src, tag):
        return [n(f"{tag}_pos", "Greater", [src, "zero_f"]),
                n(f"{tag}_nz", "NonZero", [f"{tag}_pos"]),
                n(f"{tag}_idx", "Squeeze", [f"{tag}_nz", "axis0"]),
                n(f"{tag}_val", "Gather", [src, f"{tag}_idx"], axis=0)]
    nodes = [*positives("x", "x"), *positives("v", "v"),
             n("sum", "Add", ["x_val", "v_val"]),
             n("scaled", "Mul", ["x_val", "w"]),
             n("ys", "Shape", ["x_val"]),
             n("ones", "ConstantOfShape", ["ys"], value=numpy_helper.from_array(np.array([3], np.int64))),
             n("count", "ReduceSum", ["ones"], keepdims=0)]
    outputs = {"sum": (F, None), "scaled": (F, None), "count": (I64, None)}
    return make(nodes, {"x": (F, [4]), "v": (F, [4])}, outputs,
                {"zero_f": np.array(0, np.float32), "axis0": np.array([0]), "w": np.array([1, 2, 3, 4], np.float32)})


def test_nonzero_lengths_broadcast_at_run_time(tmp_path):
    x4 = np.array([1, 2, 3, 4], np.float32)
    one = np.array([-1, 5, -1, 0], np.float32)
    runs = [{"x": x4, "v": x4 * 2}, {"x": x4, "v": one}, {"x": one, "v": -one - 1}]
    lib = agrees_on_each(nonzero_model(), runs, tmp_path)
    # ONNX broadcasting needs equal lengths or a 1 (onnxruntime refuses 2 against 3): so does the library
    with pytest.raises(Exception, match="match_cast"):
        lib.run({"x": np.array([1, 2, 0, 0], np.float32), "v": np.array([1, 2, 3, 0], np.float32)})


def test_static_models_import_unchanged():
    """No run-time dimension: no match_cast, and dataflow_split leaves the module as it is."""
    nodes = [n("h", "MatMul", ["x", "w"]), n("y", "Add", ["h", "b"])]
    model = make(nodes, {"x": (F, [2, 3])}, {"y": (F, None)},
                 {"w": np.ones((3, 4), np.float32), "b": np.ones(4, np.float32)})
    mod = build.to_relax(model)
    assert "match_cast" not in mod.script()
    assert dataflow_split.separate(mod).same_as(mod)


@pytest.mark.parametrize("case", [
    {"indices": np.float32, "depth": np.array([5], np.int64), "values": np.array([-1, 7], np.int64), "axis": -1},
    {"indices": np.float32, "depth": np.array(4.0, np.float32), "values": np.array([0, 1], np.float32), "axis": 0},
    {"indices": np.int64, "depth": np.array([6], np.int64), "values": np.array([0.5, 2], np.float32), "axis": 1},
], ids=["depth_vector_int_values", "float_depth", "middle_axis"])
def test_one_hot(case, tmp_path):
    """Float (truncated) and negative indices, and ones outside [-depth, depth - 1] (all off_value);
    the type combinations onnxruntime implements."""
    model = make([n("y", "OneHot", ["i", "depth", "values"], axis=case["axis"])],
                 {"i": (helper.np_dtype_to_tensor_dtype(np.dtype(case["indices"])), [2, 3])},
                 {"y": (helper.np_dtype_to_tensor_dtype(case["values"].dtype), None)},
                 {"depth": case["depth"], "values": case["values"]}, opset=11)
    indices = np.array([[0, 1.7, -1], [3, -4, 9]]).astype(case["indices"])
    agrees_on_each(model, [{"i": indices}], tmp_path)
