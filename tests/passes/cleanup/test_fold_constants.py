import numpy as np

from graphopt.passes.cleanup.fold_constants import FoldConstants
from graphopt.testing.check import check_pass, ops, refusals, rng_array
from graphopt.testing.tiny import model, node


def test_folds_constant_subexpression():
    w = {"a": rng_array((4, 4), 1), "b": rng_array((4, 4), 2)}
    nodes = [node("Add", ["a", "b"], ["ab"]), node("Transpose", ["ab"], ["abt"], perm=[1, 0]),
             node("MatMul", ["x", "abt"], ["y"])]
    graph, result, _ = check_pass(model(nodes, {"x": (3, 4)}, {"y": None}, w), FoldConstants())
    assert ops(graph) == ["MatMul"]
    assert result.stats["folded"] == 2


def test_folds_shape_computation_of_static_shapes():
    w = {"idx": np.array(0, dtype=np.int64), "minus1": np.array([-1], dtype=np.int64),
         "axes": np.array([0], dtype=np.int64)}
    nodes = [node("Shape", ["x"], ["s"]), node("Gather", ["s", "idx"], ["n"], axis=0),
             node("Unsqueeze", ["n", "axes"], ["n1"]), node("Concat", ["n1", "minus1"], ["shape"], axis=0),
             node("Reshape", ["x", "shape"], ["y"])]
    graph, _, _ = check_pass(model(nodes, {"x": (2, 3, 4)}, {"y": None}, w), FoldConstants())
    assert ops(graph) == ["Reshape"]


def test_never_folds_dequantize_of_a_weight():
    w = {"q": np.arange(-8, 8, dtype=np.int8).reshape(4, 4), "s": np.array(0.1, np.float32),
         "z": np.array(0, np.int8)}
    nodes = [node("DequantizeLinear", ["q", "s", "z"], ["wf"]), node("MatMul", ["x", "wf"], ["y"])]
    graph, _, _ = check_pass(model(nodes, {"x": (3, 4)}, {"y": None}, w), FoldConstants(), expect_modified=False)
    assert ops(graph) == ["DequantizeLinear", "MatMul"]


def test_refuses_graph_output_and_large_growth():
    w = {"a": rng_array((2,), 1), "big": np.array([1024, 1024], dtype=np.int64)}
    nodes = [node("Neg", ["a"], ["y"]), node("ConstantOfShape", ["big"], ["zeros"]),
             node("Add", ["x", "zeros"], ["z"])]
    graph, result, _ = check_pass(model(nodes, {"x": (1024, 1024)}, {"y": None, "z": None}, w),
                                  FoldConstants(max_growth_bytes=1024), expect_modified=False)
    reasons = refusals(result)
    assert "output is a graph output" in reasons
    assert any("grow the model" in r for r in reasons)
    assert sorted(ops(graph)) == ["Add", "ConstantOfShape", "Neg"]


def test_folds_shape_with_start_and_end_and_size():
    # Shape-15 slices the dims by start/end (negative counts from the back); Size counts elements.
    # Every folded value reaches an output, so folding one wrongly changes an output's values or shape.
    w = {"minus1": np.array([-1], dtype=np.int64)}
    nodes = [node("Shape", ["x"], ["last"], start=-1), node("Cast", ["last"], ["lastf"], to=1),
             node("Add", ["x", "lastf"], ["y"]),
             node("Shape", ["x"], ["first"], end=1), node("Concat", ["first", "minus1"], ["shape"], axis=0),
             node("Reshape", ["x", "shape"], ["r"]),
             node("Shape", ["x"], ["mid"], start=1, end=-1), node("Cast", ["mid"], ["midf"], to=1),
             node("Size", ["x"], ["n"]), node("Cast", ["n"], ["nf"], to=1), node("Mul", ["midf", "nf"], ["k"]),
             node("Mul", ["x", "k"], ["z"])]
    graph, result, _ = check_pass(model(nodes, {"x": (2, 3, 4)}, {"y": None, "r": None, "z": None}, w),
                                  FoldConstants())
    assert sorted(ops(graph)) == ["Add", "Mul", "Reshape"]
    assert graph.outputs[1].shape == [2, 12]
    assert graph.tensors()["k"].values.tolist() == [72.0]  # mid = [3], size = 24
    assert result.stats["folded"] >= 3
