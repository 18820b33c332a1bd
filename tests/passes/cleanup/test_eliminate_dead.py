from graphopt.passes.cleanup.eliminate_dead import EliminateDead
from graphopt.testing.check import check_pass, ops, rng_array
from graphopt.testing.tiny import model, node


def test_removes_dead_branch_and_its_weights():
    w = {"w": rng_array((3, 3), 1), "unused_w": rng_array((3, 3), 2)}
    nodes = [node("MatMul", ["x", "w"], ["y"]), node("MatMul", ["x", "unused_w"], ["dead"]),
             node("Relu", ["dead"], ["dead2"])]
    graph, result, _ = check_pass(model(nodes, {"x": (2, 3)}, {"y": None}, w), EliminateDead())
    assert ops(graph) == ["MatMul"]
    assert result.stats == {"nodes_removed": 2, "initializers_removed": 1}


def test_keeps_unused_graph_inputs():
    m = model([node("Relu", ["x"], ["y"])], {"x": (2, 3), "unused": (1,)}, {"y": None})
    graph, _, _ = check_pass(m, EliminateDead(), expect_modified=False)
    assert [t.name for t in graph.inputs] == ["x", "unused"]
