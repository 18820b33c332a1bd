"""The row and matrix views of a layer reproduce the layer (rows @ Wᵀ is its output in
onnxruntime), and the streamed statistics equal those of all rows at once."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from graphopt.ir import ort
from graphopt.passes import activations
from graphopt.testing import tiny

RNG = np.random.default_rng(0)


def _conv(**attrs):
    w = RNG.standard_normal((6, 4 // attrs.get("group", 1), 3, 3)).astype(np.float32)
    return tiny.model([tiny.node("Conv", ["x", "w"], ["y"], name="conv", **attrs)],
                      {"x": (2, 4, 9, 8)}, {"y": None}, {"w": w}), (2, 4, 9, 8)


CASES = {
    "conv-pads-strides": lambda: _conv(pads=[1, 0, 2, 1], strides=[2, 1]),
    "conv-groups-dilations": lambda: _conv(group=2, dilations=[2, 1], pads=[1, 1, 1, 1]),
    "conv-same-upper": lambda: _conv(auto_pad="SAME_UPPER", strides=[2, 2]),
    "gemm-transA-transB": lambda: (tiny.model(
        [tiny.node("Gemm", ["x", "w"], ["y"], name="gemm", transA=1, transB=1)], {"x": (5, 3)}, {"y": None},
        {"w": RNG.standard_normal((7, 5)).astype(np.float32)}), (5, 3)),
    "matmul-3d": lambda: (tiny.model(
        [tiny.node("MatMul", ["x", "w"], ["y"], name="mm")], {"x": (2, 3, 5)}, {"y": None},
        {"w": RNG.standard_normal((5, 4)).astype(np.float32)}), (2, 3, 5)),
}


@pytest.mark.parametrize("case", CASES)
def test_rows_times_weight_matrix_is_the_layer_output(case):
    model, shape = CASES[case]()
    graph = gs.import_onnx(model)
    node = graph.nodes[0]
    assert activations.supported(node) is None
    x = RNG.standard_normal(shape).astype(np.float32)
    expected = ort.run(model, {"x": x})["y"]
    rows, w = activations.layer_rows(node, x), activations.weight_matrix(node)
    got = np.einsum("gnk,gok->gno", rows, w)  # [groups, positions, outputs of the group]
    if node.op == "Conv":
        n, _, oh, ow = expected.shape
        got = got.reshape(got.shape[0], n, oh, ow, -1).transpose(1, 0, 4, 2, 3).reshape(expected.shape)
    np.testing.assert_allclose(got.reshape(expected.shape), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(activations.weight_values(node, w), node.inputs[1].values)


def test_streamed_statistics_equal_the_whole_data_set():
    model, _ = _conv(group=2, pads=[1, 1, 1, 1])
    graph = gs.import_onnx(tiny.with_dims(model, ["N", 4, 9, 8]))
    x = RNG.standard_normal((10, 4, 9, 8)).astype(np.float32)
    stats = activations.statistics(graph, graph.nodes, {"x": x}, batch_size=3, keep_rows=50)["conv"]
    rows = activations.layer_rows(graph.nodes[0], x).astype(np.float64)
    # float32 sums within a batch, float64 across batches
    np.testing.assert_allclose(stats.hessian, np.einsum("gnk,gnl->gkl", rows, rows) / rows.shape[1],
                               rtol=1e-5, atol=1e-6)
    assert stats.rows_seen == rows.shape[1] and stats.rows.shape == (2, 50, rows.shape[2])
    # every kept row is one of the layer's rows
    assert all(np.isclose(rows[0], r).all(axis=1).any() for r in stats.rows[0].astype(np.float64))


def test_many_rows_are_sampled_to_the_budget_and_estimate_the_same_moment(monkeypatch):
    monkeypatch.setattr(activations, "MIN_ROWS", 0)
    monkeypatch.setattr(activations, "ROWS_PER_K", 100)  # K = 18 per group: 1800 of 7200 rows
    model, _ = _conv(group=2, pads=[1, 1, 1, 1])
    graph = gs.import_onnx(tiny.with_dims(model, ["N", 4, 9, 8]))
    x = RNG.standard_normal((100, 4, 9, 8)).astype(np.float32)
    stats = activations.statistics(graph, graph.nodes, {"x": x}, batch_size=10)["conv"]
    rows = activations.layer_rows(graph.nodes[0], x).astype(np.float64)
    assert rows.shape[1] == 7200 and stats.rows_seen == 1800
    full = np.einsum("gnk,gnl->gkl", rows, rows) / rows.shape[1]
    # a sample covariance of n rows is within a few sqrt(K / n) of the whole, relatively
    assert np.linalg.norm(stats.hessian - full) < 3 * np.sqrt(18 / 1800) * np.linalg.norm(full)


def test_an_activation_product_is_refused_by_name():
    model = tiny.model([tiny.node("MatMul", ["a", "b"], ["y"], name="qk")], {"a": (2, 3), "b": (3, 2)}, {"y": None})
    graph = gs.import_onnx(model)
    assert "activation product" in activations.supported(graph.nodes[0])
    with pytest.raises(Exception, match="'qk'"):
        activations.statistics(graph, graph.nodes, {"a": np.ones((2, 3), np.float32), "b": np.ones((3, 2), np.float32)})
