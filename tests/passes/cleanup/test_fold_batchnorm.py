import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from graphopt.passes.cleanup.fold_batchnorm import FoldBatchNorm
from graphopt.testing.check import check_pass, ops, refusals, rng_array
from graphopt.testing.tiny import model, node


def bn_weights(c, seed=1):
    rng = np.random.default_rng(seed)
    return {"g": rng.uniform(0.5, 2, c).astype(np.float32), "b": rng.standard_normal(c).astype(np.float32),
            "m": rng.standard_normal(c).astype(np.float32), "v": rng.uniform(0.2, 3, c).astype(np.float32)}


def bn(x, y, name="bn"):
    return node("BatchNormalization", [x, "g", "b", "m", "v"], [y], name=name, epsilon=1e-3)


def conv_bn(cin=3, cout=8, group=1, bias=True, transpose=False):
    op = "ConvTranspose" if transpose else "Conv"
    wshape = (cin, cout // group, 3, 3) if transpose else (cout, cin // group, 3, 3)
    w = {"w": rng_array(wshape, 2), **bn_weights(cout)}
    inputs = ["x", "w"] + (["bias"] if bias else [])
    if bias:
        w["bias"] = rng_array((cout,), 3)
    nodes = [node(op, inputs, ["c"], name="conv", group=group, pads=[1, 1, 1, 1]), bn("c", "y")]
    return model(nodes, {"x": (2, cin, 6, 6)}, {"y": None}, w)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("transpose", [False, True])
def test_conv_and_convtranspose(bias, group, transpose):
    graph, result, _ = check_pass(conv_bn(cin=4, group=group, bias=bias, transpose=transpose), FoldBatchNorm())
    assert "BatchNormalization" not in ops(graph)
    assert result.stats["applied"] == {"fold-batchnorm": 1}


@given(cin=st.integers(1, 6), cout=st.integers(1, 9), bias=st.booleans())
@settings(max_examples=15, deadline=None)
def test_conv_random_shapes(cin, cout, bias):
    graph, _, _ = check_pass(conv_bn(cin=cin, cout=cout, bias=bias), FoldBatchNorm())
    assert ops(graph) == ["Conv"]


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_with_alpha_beta(trans_b):
    w = {"w": rng_array((6, 5) if trans_b else (5, 6), 4), "c": rng_array((6,), 5), **bn_weights(6)}
    nodes = [node("Gemm", ["x", "w", "c"], ["h"], name="gemm", transB=trans_b, alpha=0.7, beta=1.3), bn("h", "y")]
    graph, _, _ = check_pass(model(nodes, {"x": (3, 5)}, {"y": None}, w), FoldBatchNorm())
    assert ops(graph) == ["Gemm"]


def test_matmul_rank2_gets_an_add():
    w = {"w": rng_array((5, 6), 4), **bn_weights(6)}
    nodes = [node("MatMul", ["x", "w"], ["h"], name="mm"), bn("h", "y")]
    graph, _, _ = check_pass(model(nodes, {"x": (3, 5)}, {"y": None}, w), FoldBatchNorm())
    assert ops(graph) == ["MatMul", "Add"]


def test_refuses_matmul_rank3():
    w = {"w": rng_array((5, 4), 4), **bn_weights(4)}
    nodes = [node("MatMul", ["x", "w"], ["h"], name="mm"), bn("h", "y")]
    graph, result, _ = check_pass(model(nodes, {"x": (2, 4, 5)}, {"y": None}, w), FoldBatchNorm(),
                                  expect_modified=False)
    assert any("rank 3" in r for r in refusals(result))


def test_refuses_shared_weight():
    w = {"w": rng_array((8, 3, 3, 3), 2), **bn_weights(8)}
    nodes = [node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]), bn("c", "y"),
             node("Conv", ["x", "w"], ["z"], name="conv2", pads=[1, 1, 1, 1])]
    graph, result, _ = check_pass(model(nodes, {"x": (1, 3, 6, 6)}, {"y": None, "z": None}, w), FoldBatchNorm(),
                                  expect_modified=False)
    assert "weight 'w' is shared with another node" in refusals(result)


def test_refuses_when_conv_output_is_a_graph_output():
    w = {"w": rng_array((8, 3, 3, 3), 2), **bn_weights(8)}
    nodes = [node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]), bn("c", "y")]
    graph, result, _ = check_pass(model(nodes, {"x": (1, 3, 6, 6)}, {"y": None, "c": None}, w), FoldBatchNorm(),
                                  expect_modified=False)
    assert any("read elsewhere" in r for r in refusals(result))


def test_bn_output_name_kept_when_it_is_the_graph_output():
    graph, _, _ = check_pass(conv_bn(), FoldBatchNorm())
    assert [t.name for t in graph.outputs] == ["y"]
    assert graph.nodes[0].outputs[0].name == "y"
