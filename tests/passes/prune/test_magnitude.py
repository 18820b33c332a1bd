import gzip
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from graphopt.ir import io, ort
from graphopt.ir.errors import PipelineError
from graphopt.optimize import optimize
from graphopt.passes.pipeline import Pipeline
from graphopt.passes.prune.magnitude import PruneMagnitude, budget_counts, global_counts, select_layers, zero_smallest
from graphopt.testing import builders
from graphopt.testing.check import check_pass, refusals, rng_array
from graphopt.testing.tiny import model, node

ROOT = Path(__file__).resolve().parents[3]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
DIGITS_TEST = ROOT / "models" / "digits_test.npz"
DIGITS_CALIB = ROOT / "models" / "digits_calib.npz"
BUILDERS = {"resnet": builders.resnet, "mobilenet": builders.mobilenet, "mlp": builders.mlp,
            "transformer": builders.transformer}
BOUND = PruneMagnitude.info.semantics.bound


def weights(graph: gs.Graph) -> dict[str, np.ndarray]:
    return {t.name: t.values for t in graph.tensors().values() if isinstance(t, gs.Constant)}


def zero_fraction(values: np.ndarray) -> float:
    return 1 - np.count_nonzero(values) / values.size


@pytest.mark.parametrize("builder", BUILDERS)
def test_builders_at_half_sparsity_within_the_declared_bound(builder):
    graph, result, worst = check_pass(BUILDERS[builder](), PruneMagnitude(sparsity=0.5))
    assert min(worst.values()) >= BOUND
    sparsities = [layer["sparsity"] for layer in result.stats["layers"].values()]
    assert sparsities and all(abs(s - 0.5) < 0.01 for s in sparsities)
    assert result.stats["params_zeroed"] > 0 and result.stats["refused"] == []


@pytest.mark.parametrize("builder", BUILDERS)
def test_sparsity_zero_is_identical(builder):
    m = BUILDERS[builder]()
    graph, result, _ = check_pass(m, PruneMagnitude(sparsity=0.0), expect_modified=False)
    feeds = {"input": rng_array([d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim])}
    before, after = ort.run(m, feeds), ort.run(graph, feeds)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert result.stats["params_zeroed"] == 0


def test_global_scope_hits_the_target_overall_with_uneven_layers():
    graph, result, worst = check_pass(builders.resnet(), PruneMagnitude(sparsity=0.5, scope="global"))
    layers = result.stats["layers"]
    total = sum(layer["params"] for layer in layers.values())
    zeroed = sum(round(layer["sparsity"] * layer["params"]) for layer in layers.values())
    assert abs(zeroed - 0.5 * total) <= len(layers)  # per-layer sparsities are rounded in stats
    sparsities = [layer["sparsity"] for layer in layers.values()]
    assert max(sparsities) - min(sparsities) > 0.1
    assert min(worst.values()) >= BOUND


def test_sensitivity_allocation_meets_the_budget_and_is_idempotent():
    # check_pass runs the pass twice: the second run finds the budget met and changes nothing.
    graph, result, worst = check_pass(builders.mlp(), PruneMagnitude(sparsity=0.5, allocation="sensitivity"))
    stats = result.stats
    total = sum(layer["params"] for layer in stats["layers"].values())
    assert round(stats["sparsity"] * total) == round(0.5 * total)
    assert set(stats["allocated"]) == set(stats["layers"])
    assert [layer["name"] for layer in stats["sensitivity"]["layers"]] == list(stats["layers"])
    assert min(worst.values()) >= BOUND


def test_options_choose_layers_and_bias():
    m = builders.resnet()
    first, last = "Conv_0", "Gemm_0"
    graph, result, _ = check_pass(m, PruneMagnitude(sparsity=0.5, skip_first=True, skip_last=True,
                                                    exclude=("Conv_2",), prune_bias=True))
    skipped = {s["node"]: s["reason"] for s in result.stats["skipped"]}
    assert skipped == {first: "first layer (skip_first)", last: "last layer (skip_last)", "Conv_2": "excluded"}
    after = weights(graph)
    assert zero_fraction(after[f"{first}.weight"]) == 0 and zero_fraction(after[f"{last}.weight"]) == 0
    assert zero_fraction(after["Conv_1.weight"]) > 0.4
    only_gemm = PruneMagnitude(sparsity=0.5, include=("Gemm",), prune_bias=True)
    graph, result, _ = check_pass(builders.mlp(), only_gemm)
    assert list(result.stats["layers"]) == ["Gemm_0"] and zero_fraction(weights(graph)["Gemm_0.bias"]) > 0


def shared_weight_model():
    w = {"w": rng_array((8, 3, 3, 3), 2), "v": rng_array((8, 3, 3, 3), 3)}
    nodes = [node("Conv", ["x", "w"], ["a"], name="conv_a"), node("Conv", ["x", "w"], ["b"], name="conv_b"),
             node("Conv", ["x", "v"], ["c"], name="conv_c")]
    return model(nodes, {"x": (1, 3, 6, 6)}, {"a": None, "b": None, "c": None}, w)


def test_refuses_a_shared_weight():
    graph, result, _ = check_pass(shared_weight_model(), PruneMagnitude(sparsity=0.5))
    assert refusals(result.stats) == ["weight 'w' is shared with another node"] * 2
    assert list(result.stats["layers"]) == ["conv_c"] and zero_fraction(weights(graph)["w"]) == 0


def test_refuses_a_weight_that_is_a_graph_output():
    w = rng_array((4, 6), 2)
    m = model([node("MatMul", ["x", "w"], ["y"], name="mm")], {"x": (2, 4)}, {"y": None}, {"w": w})
    m.graph.output.append(onnx.helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [4, 6]))
    graph, result, _ = check_pass(m, PruneMagnitude(sparsity=0.5), expect_modified=False)
    assert refusals(result.stats) == ["weight 'w' is a graph output"]
    assert np.array_equal(weights(graph)["w"], w)


def test_refuses_integer_weights_and_skips_activation_products():
    w = np.arange(24, dtype=np.int32).reshape(4, 6)
    nodes = [node("MatMul", ["x", "w"], ["y"], name="mm"), node("MatMul", ["x", "t"], ["z"], name="act")]
    m = model(nodes, {"x": (2, 4), "t": (4, 3)}, {"y": None, "z": None}, {"w": w}, dtype=onnx.TensorProto.INT32)
    selection = select_layers(gs.import_onnx(m))
    assert selection.layers == [] and [r["node"] for r in selection.refused] == ["mm"]
    assert "int32, not floating point" in selection.refused[0]["reason"]


def test_bad_options_are_actionable():
    with pytest.raises(PipelineError, match="sparsity=1.5"):
        PruneMagnitude(sparsity=1.5)
    with pytest.raises(PipelineError, match="scope='layer'"):
        PruneMagnitude(scope="global", allocation="sensitivity")
    with pytest.raises(PipelineError, match="no prunable layer or op named Conv_9"):
        check_pass(builders.resnet(), PruneMagnitude(exclude=("Conv_9",)))
    assert str(Pipeline.parse("prune-magnitude(sparsity=0.8,include=Conv|Gemm)")) == \
        "prune-magnitude(sparsity=0.8,include=('Conv', 'Gemm'))"


def test_kernels_count_exactly():
    values = np.array([[0.5, -0.125, 0.0], [2.0, -0.375, 0.25]], np.float32)
    pruned, changed = zero_smallest(values, 3)
    assert changed and pruned.tolist() == [[0.5, 0, 0], [2.0, -0.375, 0]]
    assert zero_smallest(pruned, 3)[1] is False  # idempotent: the smallest three are the zeros
    assert budget_counts([10, 10, 5], [0.25, 0.55, 0.5], 10) == [3, 5, 2]
    assert budget_counts([7, 3], [3 / 7, 1.0], 6) == [3, 3]


def test_global_counts_follow_one_threshold():
    graph = gs.import_onnx(shared_weight_model())
    layers = select_layers(graph).layers
    assert sum(global_counts(layers, 0.5)) == round(0.5 * sum(layer.size for layer in layers))


def digits_accuracy(graph) -> float:
    data = np.load(DIGITS_TEST)
    return float(np.mean(ort.run(graph, {"x": data["x"]})["logits"].argmax(1) == data["y"]))


def test_digits_half_sparsity_keeps_accuracy_and_compresses(tmp_path):
    original = io.load(DIGITS)
    result = optimize(original, "prune-magnitude(sparsity=0.5)", data=DIGITS_CALIB, latency=False)
    assert digits_accuracy(result.graph) >= digits_accuracy(original) - 0.01
    assert result.report["fidelity"]["outputs"]["logits"]["cosine"] >= BOUND
    before, after = result.report["before"], result.report["after"]
    assert after["compressed_bytes"] < 0.7 * before["compressed_bytes"] and after["size_bytes"] == before["size_bytes"]
    assert after["sparsity"] > 0.45 and before["sparsity"] < 0.01
    io.save(result.graph, tmp_path / "pruned.onnx")
    size = {p: len(gzip.compress(Path(p).read_bytes())) for p in (DIGITS, tmp_path / "pruned.onnx")}
    assert size[tmp_path / "pruned.onnx"] < 0.7 * size[DIGITS]


@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_digits_sensitivity_allocation_beats_uniform(sparsity):
    original = io.load(DIGITS)
    acc = {alloc: digits_accuracy(optimize(original, f"prune-magnitude(sparsity={sparsity},allocation='{alloc}')",
                                           data=DIGITS_CALIB, latency=False).graph)
           for alloc in ("uniform", "sensitivity")}
    assert acc["sensitivity"] >= digits_accuracy(original) - 0.01
    assert acc["sensitivity"] >= acc["uniform"]
