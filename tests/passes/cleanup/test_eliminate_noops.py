import numpy as np
import onnx
import pytest

from graphopt.passes.cleanup.eliminate_noops import EliminateNoops
from graphopt.testing.check import check_pass, ops, refusals
from graphopt.testing.tiny import model, node


def relu_around(*middle, extra_weights=None, shape=(2, 3, 4)):
    nodes = [node("Relu", ["x"], ["a"]), *middle, node("Relu", ["b"], ["y"])]
    return model(nodes, {"x": shape}, {"y": None}, extra_weights)


CASES = {
    "identity": (node("Identity", ["a"], ["b"]), None),
    "dropout": (node("Dropout", ["a", "ratio"], ["b"]), {"ratio": np.array(0.5, np.float32)}),
    "cast": (node("Cast", ["a"], ["b"], to=onnx.TensorProto.FLOAT), None),
    "reshape": (node("Reshape", ["a", "s"], ["b"]), {"s": np.array([2, 3, 4], np.int64)}),
    "unsqueeze-squeeze": (None, None),
    "transpose": (node("Transpose", ["a"], ["b"], perm=[0, 1, 2]), None),
    "pad": (node("Pad", ["a", "p"], ["b"]), {"p": np.zeros(6, np.int64)}),
}


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][0] is not None])
def test_removes_noop(case):
    middle, weights = CASES[case]
    graph, _, _ = check_pass(relu_around(middle, extra_weights=weights), EliminateNoops())
    assert ops(graph) == ["Relu", "Relu"]


def test_composes_transposes_into_identity_and_removes_it():
    middle = [node("Transpose", ["a"], ["t"], perm=[1, 2, 0]), node("Transpose", ["t"], ["b"], perm=[2, 0, 1])]
    graph, _, _ = check_pass(relu_around(*middle), EliminateNoops())
    assert ops(graph) == ["Relu", "Relu"]


def test_composes_reshapes():
    w = {"s1": np.array([6, 4], np.int64), "s2": np.array([4, 6], np.int64)}
    middle = [node("Reshape", ["a", "s1"], ["t"]), node("Reshape", ["t", "s2"], ["b"])]
    graph, _, _ = check_pass(model([node("Relu", ["x"], ["a"]), *middle, node("Relu", ["b"], ["y"])],
                                   {"x": (2, 3, 4)}, {"y": None}, w), EliminateNoops())
    assert ops(graph) == ["Relu", "Reshape", "Relu"]


def test_keeps_real_work():
    w = {"s": np.array([6, 4], np.int64)}
    graph, _, _ = check_pass(relu_around(node("Reshape", ["a", "s"], ["c"]), node("Transpose", ["c"], ["b"], perm=[1, 0]),
                                         extra_weights=w), EliminateNoops(), expect_modified=False)
    assert ops(graph) == ["Relu", "Reshape", "Transpose", "Relu"]


def test_refuses_identity_from_input_to_output():
    m = model([node("Identity", ["x"], ["y"])], {"x": (2, 3)}, {"y": None})
    graph, result, _ = check_pass(m, EliminateNoops(), expect_modified=False)
    assert ops(graph) == ["Identity"]
    assert refusals(result) == ["graph output 'y' would alias graph input 'x'"]


def test_identity_before_output_keeps_output_name():
    m = model([node("Relu", ["x"], ["a"]), node("Identity", ["a"], ["y"])], {"x": (2, 3)}, {"y": None})
    graph, _, _ = check_pass(m, EliminateNoops())
    assert ops(graph) == ["Relu"] and graph.outputs[0].name == "y"


def test_dropout_with_used_mask_stays():
    m = model([node("Dropout", ["x"], ["y", "mask"])], {"x": (2, 3)}, {"y": None})
    m.graph.output.append(onnx.helper.make_tensor_value_info("mask", onnx.TensorProto.BOOL, [2, 3]))
    graph, _, _ = check_pass(m, EliminateNoops(), expect_modified=False)
    assert ops(graph) == ["Dropout"]
