import pytest

from graphopt.passes.cleanup.fuse_matmul_add import FuseMatMulAdd
from graphopt.testing import builders
from graphopt.testing.check import check_pass, ops, refusals, rng_array
from graphopt.testing.tiny import model, node


@pytest.mark.parametrize("bias_shape", [(6,), (1, 6), (3, 6), (3, 1)])
@pytest.mark.parametrize("swap", [False, True])
def test_matmul_add_becomes_gemm(bias_shape, swap):
    w = {"w": rng_array((5, 6), 1), "c": rng_array(bias_shape, 2)}
    add_inputs = ["c", "h"] if swap else ["h", "c"]
    m = model([node("MatMul", ["x", "w"], ["h"]), node("Add", add_inputs, ["y"])], {"x": (3, 5)}, {"y": None}, w)
    graph, _, _ = check_pass(m, FuseMatMulAdd())
    assert ops(graph) == ["Gemm"] and graph.outputs[0].name == "y"


def test_mlp_builder_hidden_layers_fuse():
    graph, result, _ = check_pass(builders.mlp(), FuseMatMulAdd())
    assert "MatMul" not in ops(graph)
    assert result.stats["applied"]["matmul-add-to-gemm"] == 2


def test_refuses_rank3_activation():
    graph, result, _ = check_pass(builders.transformer(layers=1), FuseMatMulAdd(), expect_modified=False)
    assert any("Gemm needs rank 2" in r for r in refusals(result))


def test_matmul_with_other_reader_stays():
    w = {"w": rng_array((5, 6), 1), "c": rng_array((6,), 2)}
    m = model([node("MatMul", ["x", "w"], ["h"]), node("Add", ["h", "c"], ["y"]), node("Relu", ["h"], ["z"])],
              {"x": (3, 5)}, {"y": None, "z": None}, w)
    graph, _, _ = check_pass(m, FuseMatMulAdd(), expect_modified=False)
    assert sorted(ops(graph)) == ["Add", "MatMul", "Relu"]
