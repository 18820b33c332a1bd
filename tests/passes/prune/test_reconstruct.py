"""The math behind prune-channels' data-aware methods (graphopt.passes.prune.reconstruct): the
reconstruction-error Gram matrix equals the error measured on rows, ThiNet and LASSO keep what
matters, the refit is the least-squares solution and lowers the consumer's output error, and on
small models (onnxruntime) the chosen-and-refit channels beat the weights-only choice."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from graphopt.ir import ort
from graphopt.passes.base import PassContext
from graphopt.passes.manager import PassManager
from graphopt.passes.prune import reconstruct
from graphopt.passes.prune.channels import PruneChannels
from graphopt.passes.prune.reconstruct import Consumer
from graphopt.testing.check import rng_array
from graphopt.testing.tiny import model, node


def consumer_from_rows(rows: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, width: int) -> Consumer:
    """A consumer whose K columns are channels of `width` contiguous columns each, group "g"."""
    channels = rows.shape[1] // width
    return Consumer("c", {"g": np.arange(channels * width).reshape(channels, width)}, weight, bias,
                    rows.T @ rows / len(rows), rows.mean(0))


def correlated_rows(n: int, k: int, seed: int = 0) -> np.ndarray:
    """Rows with correlated, non-centred columns (as a Relu's outputs are)."""
    rng = np.random.default_rng(seed)
    return np.maximum(rng.standard_normal((n, k)) @ rng.standard_normal((k, k)) + 0.5, 0)


def test_gram_is_the_mean_squared_error_of_removing_channels():
    rows, w = correlated_rows(500, 12), rng_array((5, 12)).astype(np.float64)
    c = consumer_from_rows(rows, w, None, width=3)
    g = reconstruct.gram("g", [c, c])  # two consumers: their errors add
    for removed in ([0], [1, 3], [0, 2, 3]):
        cols = np.concatenate([np.arange(3 * r, 3 * r + 3) for r in removed])
        error = rows[:, cols] @ w[:, cols].T  # what the removed channels contributed
        ones = np.zeros(4)
        ones[removed] = 1
        assert ones @ g @ ones == pytest.approx(2 * np.mean(np.sum(error ** 2, 1)), rel=1e-9)


def test_thinet_removes_the_channels_whose_sum_contributes_least():
    assert reconstruct.thinet(np.diag([3.0, 1.0, 2.0, 4.0]), 2).tolist() == [0, 3]
    # Channel 1 alone costs more than channel 2, but it cancels channel 0: once 0 is gone,
    # removing 1 as well costs nothing. The greedy sees the error of the sum, not of each channel.
    g = np.array([[1.0, -1.0, 0.0], [-1.0, 2.0, 0.0], [0.0, 0.0, 1.5]])
    assert reconstruct.thinet(g, 1).tolist() == [2]
    kept = reconstruct.thinet(np.diag([1.0, 2.0, 3.0, 4.0, 9.0, 8.0, 7.0, 6.0]), 4, divisions=2)
    assert kept.tolist() == [2, 3, 4, 5]  # each block of 4 loses 2


def test_lasso_ranks_independent_channels_by_their_contribution():
    scores = reconstruct.lasso_scores(np.diag([3.0, 1.0, 2.0, 4.0]))
    assert np.argsort(-scores).tolist() == [3, 0, 2, 1]
    # A channel that duplicates another adds nothing the other cannot rebuild: one of the pair goes.
    z = np.random.default_rng(1).standard_normal((3, 400))
    z = np.vstack([z, z[0]])  # channel 3 == channel 0
    kept = reconstruct.select(reconstruct.lasso_scores(z @ z.T / 400), 3)
    assert {1, 2} <= set(kept.tolist()) and len({0, 3} & set(kept.tolist())) == 1


@pytest.mark.parametrize("with_bias", [True, False])
def test_refit_is_the_least_squares_solution(with_bias):
    rows, w = correlated_rows(400, 12, seed=2), rng_array((5, 12), 3).astype(np.float64)
    b = rng_array((5,), 4).astype(np.float64) if with_bias else None
    c = consumer_from_rows(rows, w, b, width=3)
    removed = np.arange(3, 6)
    weight, bias = reconstruct.refit(c, removed, ridge=0.0)
    stay = np.setdiff1d(np.arange(12), removed)
    design = np.column_stack([rows[:, stay], np.ones(len(rows))]) if with_bias else rows[:, stay]
    target = rows @ w.T + (b if with_bias else 0)
    expected = np.linalg.lstsq(design, target, rcond=None)[0]
    np.testing.assert_allclose(weight[:, stay], expected[:len(stay)].T, rtol=1e-6, atol=1e-8)
    assert np.all(weight[:, removed] == 0)
    if with_bias:
        np.testing.assert_allclose(bias, expected[-1], rtol=1e-6, atol=1e-8)
    cut = w.copy()
    cut[:, removed] = 0
    measured = np.mean(np.sum((design @ expected - target) ** 2, 1))
    assert reconstruct.output_error(c, weight, bias) == pytest.approx(measured, rel=1e-6, abs=1e-9)
    assert reconstruct.output_error(c, weight, bias) < 0.8 * reconstruct.output_error(c, cut, b)


def test_refit_survives_a_mean_inconsistent_with_the_second_moment():
    """The mean comes from sampled rows, H from all of them: an input that never varies makes the
    pair indefinite when the sample's mean is a little off; the refit must still solve."""
    rows = correlated_rows(300, 8, seed=5)
    rows[:, 5] = 2.0  # a constant input: E[x²] = E[x]²
    c = consumer_from_rows(rows, rng_array((4, 8), 6).astype(np.float64), rng_array((4,), 7).astype(np.float64),
                           width=2)
    c.mean = c.mean * 1.01
    weight, bias = reconstruct.refit(c, np.array([0, 1]), ridge=1e-3)
    assert np.isfinite(weight).all() and np.isfinite(bias).all()
    cut = c.weight.copy()
    cut[:, :2] = 0
    assert reconstruct.output_error(c, weight, bias) < reconstruct.output_error(c, cut, c.bias)


def conv(x, y, w, b=None, **attrs):
    return node("Conv", [x, w] + ([b] if b else []), [y], name=y, pads=[1, 1, 1, 1], **attrs)


def two_branch_model():
    """Two Convs concatenated, a Relu, and the consumer Conv `y`: both groups read by one layer."""
    w = {"wa": rng_array((6, 3, 3, 3)), "ba": rng_array((6,), 1), "wb": rng_array((8, 3, 3, 3), 2),
         "bb": rng_array((8,), 3), "wy": rng_array((5, 14, 3, 3), 4), "by": rng_array((5,), 5)}
    nodes = [conv("x", "a", "wa", "ba"), conv("x", "b", "wb", "bb"),
             node("Concat", ["a", "b"], ["c"], name="cat", axis=1), node("Relu", ["c"], ["r"], name="relu"),
             conv("r", "y", "wy", "by")]
    return model(nodes, {"x": (16, 3, 6, 6)}, {"y": None}, w)


def run_pass(m, feeds, **options):
    graph = gs.import_onnx(m)
    record = PassManager([PruneChannels(**options)]).run(graph, PassContext(feeds=feeds, from_data=True))[0]
    return graph, record.result


def relative_error(m, graph, feeds) -> float:
    ref, out = ort.run(m, feeds)["y"], ort.run(graph, feeds)["y"]
    return float(np.sum((out - ref) ** 2) / np.sum(ref ** 2))


@pytest.mark.parametrize("method", ["thinet", "lasso"])
def test_concat_groups_are_chosen_and_refit_better_than_by_weights(method):
    m, feeds = two_branch_model(), {"x": rng_array((16, 3, 6, 6), 9)}
    graph, result = run_pass(m, feeds, ratio=0.5, method=method)
    weights_only, _ = run_pass(m, feeds, ratio=0.5, method="l1")
    assert {tuple(d["channels"]) for d in result.decisions.values()} == {(6, 3), (8, 4)}
    assert {d["method"] for d in result.decisions.values()} == {method}
    measured = relative_error(m, graph, feeds)
    cut, refit = result.stats["refit"]["y"]["error"]
    # The recorded error is the consumer's output error over all calibration rows: onnxruntime agrees.
    assert measured == pytest.approx(refit, rel=1e-2) and refit < cut
    assert measured < 0.5 * relative_error(m, weights_only, feeds)


def test_sequential_is_group_by_group_on_the_model_pruned_so_far():
    w = {"wa": rng_array((8, 3, 3, 3)), "wb": rng_array((8, 8, 3, 3), 1), "wy": rng_array((4, 8, 3, 3), 2)}
    nodes = [conv("x", "a", "wa"), node("Relu", ["a"], ["ra"], name="ra"), conv("ra", "b", "wb"),
             node("Relu", ["b"], ["rb"], name="rb"), conv("rb", "y", "wy")]
    m, feeds = model(nodes, {"x": (16, 3, 6, 6)}, {"y": None}, w), {"x": rng_array((16, 3, 6, 6), 3)}
    graph, result = run_pass(m, feeds, ratio=0.5, sequential=True)
    assert set(result.stats["refit"]) == {"b", "y"}
    by_hand = gs.import_onnx(m)
    PassManager([PruneChannels(ratio=0.5, include=("a",)), PruneChannels(ratio=0.5, include=("b",))]).run(
        by_hand, PassContext(feeds=feeds, from_data=True))
    np.testing.assert_allclose(ort.run(graph, feeds)["y"], ort.run(by_hand, feeds)["y"], rtol=1e-5, atol=1e-5)
    one_shot, _ = run_pass(m, feeds, ratio=0.5)
    assert relative_error(m, graph, feeds) < relative_error(m, one_shot, feeds)


def test_a_group_read_by_a_conv_transpose_is_chosen_by_its_weights_and_says_why():
    w = {"wa": rng_array((8, 3, 3, 3)), "wt": rng_array((8, 2, 2, 2), 1)}
    nodes = [conv("x", "a", "wa"), node("ConvTranspose", ["a", "wt"], ["y"], name="up", strides=[2, 2])]
    m = model(nodes, {"x": (4, 3, 4, 4)}, {"y": None}, w)
    _, result = run_pass(m, {"x": rng_array((4, 3, 4, 4))}, ratio=0.5, method="thinet")
    decision = result.decisions["a"]
    assert decision["channels"] == [8, 4] and decision["method"] == "l1"
    assert "ConvTranspose 'up' cannot be reconstructed" in decision["why"]
