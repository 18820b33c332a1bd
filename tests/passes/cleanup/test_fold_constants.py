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
    reasons = refusals(result.stats)
    assert "output is a graph output" in reasons
    assert any("grow the model" in r for r in reasons)
    assert sorted(ops(graph)) == ["Add", "ConstantOfShape", "Neg"]
