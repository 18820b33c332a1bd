import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from hypothesis import given, settings, strategies as st

from graphopt import codegen
from graphopt.ir import io, ort
from graphopt.ir.errors import PipelineError
from graphopt.ir.graph import infer_shapes
from graphopt.optimize import optimize
from graphopt.passes.base import PassContext
from graphopt.passes.manager import PassManager
from graphopt.passes.prune.channels import PruneChannels, select
from graphopt.report import summarize
from graphopt.testing import builders
from graphopt.testing.check import check_pass, refusals, rng_array
from graphopt.testing.tiny import model, node

ROOT = Path(__file__).resolve().parents[3]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
DIGITS_TEST = ROOT / "models" / "digits_test.npz"
DIGITS_CALIB = ROOT / "models" / "digits_calib.npz"
BUILDERS = {"resnet": builders.resnet, "bottleneck": lambda: builders.resnet(bottleneck=True),
            "mobilenet": builders.mobilenet, "mlp": builders.mlp, "transformer": builders.transformer}
BOUND = PruneChannels.info.semantics.bound


def cost(graph_or_model) -> tuple[int, int]:
    graph = graph_or_model if isinstance(graph_or_model, gs.Graph) else gs.import_onnx(graph_or_model)
    s = summarize(infer_shapes(graph))
    return s["macs"], s["params"]


def conv(x, y, w, name=None, **attrs):
    return node("Conv", [x, w], [y], name=name or y, pads=[1, 1, 1, 1], **attrs)


def pruned(result) -> list[dict]:
    return [g for g in result.decisions.values() if g["channels"][1] < g["channels"][0]]


@pytest.mark.parametrize("builder", BUILDERS)
def test_builders_shrink_and_still_run(builder):
    m = BUILDERS[builder]()
    graph, result, _ = check_pass(m, PruneChannels(ratio=0.5))  # check_pass: same output shapes in ORT
    (macs0, params0), (macs1, params1) = cost(m), cost(graph)
    assert macs1 < 0.8 * macs0 and params1 < 0.8 * params0
    assert result.stats["macs"][1] < result.stats["macs"][0] and result.stats["params"] == [params0, params1]
    assert all(g["channels"][1] == g["channels"][0] - g["channels"][0] // 2 for g in pruned(result))


@pytest.mark.parametrize("builder", [*BUILDERS, "digits"])
def test_default_ratio_keeps_the_declared_bound(builder):
    if builder == "digits":
        _, _, worst = check_pass(io.load(DIGITS), PruneChannels(), inputs=[{"x": np.load(DIGITS_TEST)["x"]}])
    else:
        _, _, worst = check_pass(BUILDERS[builder](), PruneChannels())
    assert min(worst.values()) >= BOUND


def test_ratio_zero_is_identical():
    m = builders.resnet()
    graph, result, _ = check_pass(m, PruneChannels(ratio=0.0), expect_modified=False)
    feeds = {"input": rng_array((1, 3, 32, 32))}
    assert np.array_equal(ort.run(m, feeds)["output"], ort.run(graph, feeds)["output"])
    assert pruned(result) == [] and result.stats["macs"][0] == result.stats["macs"][1]


def test_residual_branches_lose_the_same_channels():
    graph, result, _ = check_pass(builders.resnet(blocks=(2, 1)), PruneChannels(ratio=0.5))
    coupled = [g for g in pruned(result) if len(g["layers"]) == 3]
    assert coupled and coupled[0]["channels"] == [16, 8]  # the stem and both blocks' last convs
    for add in (n for n in graph.nodes if n.op == "Add"):
        assert add.inputs[0].shape == add.inputs[1].shape and add.inputs[0].shape[1] in (8, 16)  # of 16, 32


def test_depthwise_group_follows():
    graph, _, _ = check_pass(builders.mobilenet(), PruneChannels(ratio=0.5))
    depthwise = [n for n in graph.nodes if n.op == "Conv" and n.attrs.get("group", 1) > 1]
    assert depthwise and all(n.attrs["group"] == n.inputs[1].shape[0] == n.inputs[0].shape[1] for n in depthwise)


def test_concat_offsets_and_gemm_rows():
    w = {"wa": rng_array((4, 3, 3, 3)), "wb": rng_array((6, 3, 3, 3), 1),
         "k": rng_array((1, 13, 1, 1), 3), "g": rng_array((5, 208), 4)}
    # The graph input in the middle keeps its 3 channels; b's channels move to a new offset.
    nodes = [conv("x", "a", "wa"), conv("x", "b", "wb"),
             node("Concat", ["a", "x", "b"], ["c"], name="cat", axis=1),
             node("Add", ["c", "k"], ["d"], name="shift"), node("Relu", ["d"], ["r"], name="relu"),
             node("Flatten", ["r"], ["f"], name="flat"), node("Gemm", ["f", "g"], ["y"], name="gemm", transB=1)]
    graph, result, _ = check_pass(model(nodes, {"x": (2, 3, 4, 4)}, {"y": None}, w), PruneChannels(ratio=0.5))
    assert [g["channels"] for g in pruned(result)] == [[4, 2], [6, 3]]
    gemm = next(n for n in graph.nodes if n.op == "Gemm")
    assert gemm.inputs[1].shape == (5, (2 + 3 + 3) * 16)


def test_a_broadcast_constant_shared_by_two_groups_is_sliced_for_each():
    w = {"wa": rng_array((8, 3, 3, 3)), "wb": rng_array((8, 3, 3, 3), 1), "k": rng_array((8, 1, 1), 2),
         "wc": rng_array((2, 8, 3, 3), 3), "wd": rng_array((2, 8, 3, 3), 4)}
    nodes = [conv("x", "a", "wa"), node("Mul", ["a", "k"], ["ma"], name="mul_a"), conv("ma", "y", "wc"),
             conv("x", "b", "wb"), node("Mul", ["b", "k"], ["mb"], name="mul_b"), conv("mb", "z", "wd")]
    graph, result, _ = check_pass(model(nodes, {"x": (1, 3, 4, 4)}, {"y": None, "z": None}, w),
                                  PruneChannels(ratio=0.5))
    scales = [n.inputs[1] for n in graph.nodes if n.op == "Mul"]
    assert len(pruned(result)) == 2 and all(t.shape == (4, 1, 1) for t in scales) and scales[0] is not scales[1]


def test_kept_rows_of_the_gemm_are_those_of_the_kept_channels():
    """Channel c of a flattened NCHW tensor owns Gemm columns c*H*W..(c+1)*H*W-1 exactly."""
    wa = rng_array((4, 3, 3, 3))
    wa[[1, 2]] *= 0.01  # the two weakest filters go
    g = rng_array((5, 64), 4)
    nodes = [conv("x", "a", "wa"), node("Flatten", ["a"], ["f"], name="flat"),
             node("Gemm", ["f", "g"], ["y"], name="gemm", transB=1)]
    graph, _, _ = check_pass(model(nodes, {"x": (2, 3, 4, 4)}, {"y": None}, {"wa": wa, "g": g}),
                             PruneChannels(ratio=0.5))
    gemm = next(n for n in graph.nodes if n.op == "Gemm")
    assert np.array_equal(gemm.inputs[1].values, np.concatenate([g[:, 0:16], g[:, 48:64]], axis=1))


def test_reshape_target_and_grouped_conv_and_conv_transpose():
    w = {"wa": rng_array((8, 3, 3, 3)), "wg": rng_array((8, 4, 3, 3), 1), "wt": rng_array((8, 6, 2, 2), 2),
         "bt": rng_array((6,), 3), "shape": np.array([2, 96], np.int64), "g": rng_array((96, 3), 4)}
    nodes = [conv("x", "a", "wa"), conv("a", "gc", "wg", group=2),
             node("ConvTranspose", ["gc", "wt", "bt"], ["t"], name="up", strides=[2, 2]),
             node("Reshape", ["t", "shape"], ["f"], name="flat"), node("Gemm", ["f", "g"], ["y"], name="gemm")]
    graph, result, _ = check_pass(model(nodes, {"x": (2, 3, 2, 2)}, {"y": None}, w), PruneChannels(ratio=0.5))
    channels = {g["layers"][0]: g["channels"] for g in result.decisions.values()}
    assert channels == {"gc": [8, 4], "up": [6, 3]}
    assert {r.node for r in result.refused} == {"a", "gemm"}  # left whole: 8 and 3 channels
    layers = {n.name: n for n in graph.nodes}
    assert layers["a"].inputs[1].shape[0] == 8 and layers["gemm"].inputs[1].shape[1] == 3
    target = next(n for n in graph.nodes if n.op == "Reshape").inputs[1].values
    assert target.tolist() == [2, 48]


def test_round_to_and_min_channels():
    _, result, _ = check_pass(builders.resnet(width=32), PruneChannels(ratio=0.3, round_to=8))
    kept = [g["channels"] for g in result.decisions.values()]
    assert kept and all(after % 8 == 0 and after >= before * 0.7 for before, after in kept)
    _, result, _ = check_pass(builders.resnet(), PruneChannels(ratio=0.9, min_channels=6))
    assert {tuple(g["channels"]) for g in pruned(result)} == {(16, 6), (32, 6)}


@given(ratio=st.floats(0.0, 0.95), round_to=st.sampled_from([1, 4, 8]), min_channels=st.integers(1, 12),
       builder=st.sampled_from(["resnet", "mobilenet", "mlp"]))
@settings(max_examples=12, deadline=None)
def test_any_options_give_a_valid_model_with_the_promised_counts(ratio, round_to, min_channels, builder):
    _, result, _ = check_pass(BUILDERS[builder](), PruneChannels(ratio=ratio, round_to=round_to,
                                                                 min_channels=min_channels), expect_modified=None)
    for before, after in (g["channels"] for g in pruned(result)):
        assert after % round_to == 0 and after >= min(before, min_channels)
        assert after >= before - int(before * ratio + 1e-9)


def test_include_exclude_and_criteria():
    m = builders.resnet()
    _, result, _ = check_pass(m, PruneChannels(include=("Conv_3",)))
    assert [g["layers"] for g in pruned(result)] == [["Conv_3"]]
    _, result, _ = check_pass(m, PruneChannels(exclude=("Conv_[0-2]",)))
    assert result.skipped and {s.reason for s in result.skipped} == {"excluded"}
    assert all({"Conv_0", "Conv_1", "Conv_2"} & set(s.node.split("+")) for s in result.skipped)
    assert pruned(result) and not {"Conv_0", "Conv_1", "Conv_2"} & {n for g in pruned(result) for n in g["layers"]}
    _, result, _ = check_pass(builders.mlp(), PruneChannels(criterion="bn_gamma"), expect_modified=False)
    assert "criterion bn_gamma: no BatchNormalization scales these channels" in refusals(result)
    for criterion in ("l2", "bn_gamma"):
        check_pass(m, PruneChannels(criterion=criterion))


def test_importance_sums_over_coupled_layers():
    w = {"wa": rng_array((4, 3, 3, 3)), "wb": rng_array((4, 3, 3, 3), 1), "wc": rng_array((2, 4, 3, 3), 2)}
    w["wa"][0] *= 0.01  # weak in one branch, strong in the other: the sum decides
    w["wb"][0] *= 30
    w["wb"][3] *= 0.01
    nodes = [conv("x", "a", "wa"), conv("x", "b", "wb"), node("Add", ["a", "b"], ["s"], name="add"),
             conv("s", "y", "wc")]
    graph, _, _ = check_pass(model(nodes, {"x": (1, 3, 4, 4)}, {"y": None}, w), PruneChannels(ratio=0.25))
    kept_b = next(n for n in graph.nodes if n.name == "b").inputs[1].values
    assert np.array_equal(kept_b, w["wb"][[0, 1, 2]])


def test_include_exclude_are_shell_patterns_over_the_group_layers():
    m = builders.resnet(blocks=(2, 1))
    # Including one layer of a coupled group prunes the whole group; excluding one leaves it whole.
    _, result, _ = check_pass(m, PruneChannels(ratio=0.5, include=("Conv_0",)))
    assert [sorted(g["layers"]) for g in pruned(result)] == [["Conv_0", "Conv_2", "Conv_4"]]
    assert {s.reason for s in result.skipped} == {"not in include"}
    _, result, _ = check_pass(m, PruneChannels(ratio=0.5, exclude=("Conv_4",)))
    assert {"Conv_0", "Conv_2", "Conv_4"} in [set(s.node.split("+")) for s in result.skipped]
    _, result, _ = check_pass(m, PruneChannels(ratio=0.5, include=("Gemm",)), expect_modified=False)
    assert result.decisions == {} and [r.node for r in result.refused] == ["Gemm_0"]  # a graph output


@pytest.mark.parametrize("options", [{"include": ("nosuchlayer",)}, {"exclude": ("Relu",)}])
def test_a_pattern_that_matches_no_layer_is_an_error(options):
    with pytest.raises(PipelineError, match="prune-channels: .* matches no layer this pass works on"):
        PassManager([PruneChannels(ratio=0.3, **options)]).run(gs.import_onnx(builders.resnet()))


def refusing_model():
    """Groups refused for a shared weight, a graph output and an unknown op, and two prunable ones."""
    w = {"wa": rng_array((8, 3, 3, 3)), "shared": rng_array((8, 8, 3, 3), 1), "wo": rng_array((8, 3, 3, 3), 2),
         "wu": rng_array((8, 3, 3, 3), 3), "wc": rng_array((4, 8, 3, 3), 4), "wd": rng_array((4, 8, 3, 3), 5),
         "we": rng_array((8, 3, 3, 3), 6), "wf": rng_array((4, 8, 3, 3), 7),
         "wg": rng_array((16, 3, 3, 3), 8), "wh": rng_array((4, 16, 3, 3), 9)}
    nodes = [conv("x", "a", "wa"), conv("a", "p", "shared"), conv("p", "q", "shared"),  # shared weight
             conv("x", "o", "wo"), node("Relu", ["o"], ["out1"], name="relu"), conv("o", "c", "wc"),  # output
             conv("x", "u", "wu"), node("LRN", ["u"], ["l"], name="lrn", size=3), conv("l", "d", "wd"),
             conv("x", "e", "we"), conv("e", "f", "wf"), conv("x", "g", "wg"), conv("g", "h", "wh")]  # prunable
    outputs = {"q": None, "out1": None, "c": None, "d": None, "f": None, "h": None}
    return model(nodes, {"x": (1, 3, 4, 4)}, outputs, w)


def test_refusals_are_listed_and_the_rest_is_pruned():
    _, result, _ = check_pass(refusing_model(), PruneChannels(ratio=0.5))
    reasons = refusals(result)
    assert "weight 'shared' is shared with another node" in reasons
    assert "the channels reach graph output 'out1'" in reasons
    assert "the channels are read by LRN 'lrn', an op prune-channels does not follow" in reasons
    assert [g["layers"] for g in pruned(result)] == [["e"], ["g"]]


def test_options_are_checked():
    with pytest.raises(PipelineError, match="ratio"):
        PruneChannels(ratio=1.0)
    with pytest.raises(PipelineError, match="criterion"):
        PruneChannels(criterion="l3")
    with pytest.raises(PipelineError, match="allocation"):
        PruneChannels(allocation="global")
    with pytest.raises(PipelineError, match="budget_metric"):
        PruneChannels(budget_metric="flops")
    with pytest.raises(PipelineError, match="ratios must be in"):
        PruneChannels(ratios=(0.5, 1.5))
    with pytest.raises(PipelineError, match="method='obs' must be one of l1, thinet, lasso"):
        PruneChannels(method="obs")
    with pytest.raises(PipelineError, match="criterion='l2' ranks channels for method='l1' only"):
        PruneChannels(method="thinet", criterion="l2")
    with pytest.raises(PipelineError, match="ridge"):
        PruneChannels(ridge=-1.0)


@given(st.integers(1, 4), st.integers(1, 5))
@settings(max_examples=20, deadline=None)
def test_select_takes_the_same_number_from_each_block(divisions, per_block):
    scores = np.random.default_rng(divisions * 7 + per_block).random(divisions * 6)
    kept = select(scores, divisions * per_block, divisions)
    assert np.all(np.diff(kept) > 0)
    assert np.array_equal(np.bincount(kept // 6, minlength=divisions), [per_block] * divisions)
    for b in range(divisions):
        block = scores[6 * b:6 * b + 6]
        assert set(kept[kept // 6 == b] - 6 * b) == set(np.argsort(-block)[:per_block])


def test_digits_cnn_accuracy_and_macs(record_property):
    data = np.load(DIGITS_TEST)
    base = optimize(DIGITS, [], latency=False)
    accuracy = {0.0: float((ort.run(base.graph, {"x": data["x"]})["logits"].argmax(1) == data["y"]).mean())}
    for ratio in (0.25, 0.5):
        graph, result, _ = check_pass(io.load(DIGITS), PruneChannels(ratio=ratio), inputs=[{"x": data["x"][:32]}])
        logits = ort.run(graph, {"x": data["x"]})["logits"]
        accuracy[ratio] = float((logits.argmax(1) == data["y"]).mean())
        macs = result.stats["macs"]
        record_property(f"ratio {ratio}", f"accuracy {accuracy[ratio]:.4f}, MACs {macs[1] / macs[0]:.3f}x")
        assert macs[1] < (0.6 if ratio == 0.25 else 0.3) * macs[0]
    assert accuracy[0.0] > 0.97 and accuracy[0.25] > 0.5  # no fine-tuning: the drop is expected


def test_cli_pipeline_cuts_digits_macs():
    report = optimize(DIGITS, "prune-channels(ratio=0.3)", latency=False).report
    assert report["after"]["macs"] < 0.85 * report["before"]["macs"]
    assert report["after"]["params"] < report["before"]["params"]


def test_pruned_model_compiles_with_tvm(tmp_path):
    graph, _, _ = check_pass(builders.resnet(), PruneChannels(ratio=0.5))
    result = codegen.compile(graph, "x86", tmp_path)
    feeds = {"input": rng_array((1, 3, 32, 32))}
    out = codegen.load(result.library)(feeds["input"])
    np.testing.assert_allclose(out, ort.run(graph, feeds)["output"], rtol=1e-3, atol=1e-3)


# -- allocation="sensitivity": `ratio` is a budget of prunable MACs spread by measured sensitivity --
def rounding_slack(result, round_to: int) -> float:
    """The most one rounding step of one group can move the removed cost: its size per unit
    ratio times the fraction of its channels one step is."""
    channels = {"+".join(g["layers"]): g["channels"][0] for g in result.decisions.values()}
    return max(layer["size"] * round_to / channels[layer["name"]] for layer in result.stats["sensitivity"]["layers"])


@pytest.mark.parametrize("builder,round_to", [("resnet", 1), ("resnet", 8), ("mobilenet", 1), ("mobilenet", 8),
                                              ("mlp", 1), ("transformer", 8)])
def test_sensitivity_allocation_meets_the_mac_budget(builder, round_to):
    m = BUILDERS[builder]()
    # check_pass: the model passes the checker and runs in onnxruntime with its outputs' shapes unchanged.
    graph, result, _ = check_pass(m, PruneChannels(ratio=0.5, allocation="sensitivity", round_to=round_to))
    stats, budget = result.stats, result.stats["budget"]
    assert budget["removed"] == stats["macs"][0] - stats["macs"][1]  # the cost model is exact
    assert budget["target"] == pytest.approx(0.5 * budget["prunable"], abs=1)
    assert abs(budget["removed"] - budget["target"]) <= rounding_slack(result, round_to)
    assert all(after % round_to == 0 for _, after in (g["channels"] for g in pruned(result)))
    assert len(stats["sensitivity"]["layers"]) == len(result.decisions)


def test_sensitivity_allocation_by_params():
    _, result, _ = check_pass(builders.resnet(), PruneChannels(ratio=0.3, allocation="sensitivity",
                                                               budget_metric="params"))
    stats, budget = result.stats, result.stats["budget"]
    assert budget["metric"] == "params" and budget["removed"] == stats["params"][0] - stats["params"][1]
    assert abs(budget["removed"] - budget["target"]) <= rounding_slack(result, 1)


def test_sensitivity_allocation_never_prunes_a_refused_group():
    m = refusing_model()
    graph, result, _ = check_pass(m, PruneChannels(ratio=0.6, allocation="sensitivity"))
    assert [layer["name"] for layer in result.stats["sensitivity"]["layers"]] == ["e", "g"]
    assert {layer for g in pruned(result) for layer in g["layers"]} <= {"e", "g"}
    assert set(result.decisions) == {"e", "g"}  # the refused groups are left whole:
    before = {n.name: n.inputs[1].shape[0] for n in gs.import_onnx(m).nodes if n.op == "Conv"}
    assert {n.name: n.inputs[1].shape[0] for n in graph.nodes if n.op == "Conv" and n.name not in ("e", "g")} == \
        {name: c for name, c in before.items() if name not in ("e", "g")}


def test_sensitivity_allocation_edges():
    _, result, _ = check_pass(builders.resnet(), PruneChannels(ratio=0.0, allocation="sensitivity"),
                              expect_modified=False)
    assert "sensitivity" not in result.stats and result.stats["budget"]["removed"] == 0
    with pytest.raises(PipelineError, match="add a larger one to `ratios`"):
        check_pass(builders.mlp(), PruneChannels(ratio=0.9, allocation="sensitivity", ratios=(0.25,)))


def digits_run(**options) -> tuple[float, float]:
    """Test accuracy and the fraction of prunable MACs removed, with the calibration set as the
    user's data (the pass alone, after canonicalize, so no fidelity gate stops a ruinous option)."""
    data = np.load(DIGITS_TEST)
    graph = optimize(DIGITS, "canonicalize", latency=False).graph
    ctx = PassContext(feeds={"x": np.load(DIGITS_CALIB)["x"]}, from_data=True)
    result = PassManager([PruneChannels(**options)]).run(graph, ctx)[0].result
    budget = result.stats["budget"]
    logits = ort.run(graph, {"x": data["x"]})["logits"]
    return float((logits.argmax(1) == data["y"]).mean()), budget["removed"] / budget["prunable"]


@pytest.mark.parametrize("round_to", [1, 8])
def test_digits_sensitivity_allocation_vs_uniform_at_the_same_macs(round_to, record_property):
    """Weights-only (l1): at the MACs that uniform pruning of 25% and 50% of the channels removes,
    allocation by sensitivity; without a refit, 50% of the channels (about 75% of the MACs) leaves
    both near chance, and there the additive-error model behind the allocation does not hold."""
    for ratio in (0.25, 0.5):
        uniform, macs = digits_run(ratio=ratio, round_to=round_to, method="l1")
        sensitive, sensitive_macs = digits_run(ratio=round(macs, 4), round_to=round_to, allocation="sensitivity",
                                               method="l1")
        record_property(f"channels {ratio}", f"uniform {uniform:.4f} at {macs:.3f} of the MACs, "
                                             f"sensitivity {sensitive:.4f} at {sensitive_macs:.3f}")
        assert abs(sensitive_macs - macs) < 0.05
        if ratio == 0.25:
            assert sensitive >= uniform - 0.01


# -- method="thinet" | "lasso": chosen by the consumers' reconstruction error, then refit ----------
DIGITS_ACCURACY = 0.9889  # of models/digits_cnn.onnx on models/digits_test.npz


@pytest.mark.parametrize("ratio,allowed", [(0.3, 0.01), (0.5, 0.02)])
def test_digits_mac_targets(ratio, allowed, record_property):
    """Issue 14's targets: 30% of the MACs removed within 1 point, 50% within 2 points."""
    accuracy, removed = digits_run(ratio=ratio, method="thinet", allocation="sensitivity")
    record_property(f"thinet {ratio} of the MACs", f"accuracy {accuracy:.4f}")
    assert abs(removed - ratio) < 0.05 and accuracy >= DIGITS_ACCURACY - allowed


@pytest.mark.parametrize("method", ["thinet", "lasso"])
def test_digits_reconstruction_keeps_accuracy_where_the_weights_alone_lose_it(method, record_property):
    """30% of the channels (about 47% of the MACs): within 1 point; the weights alone lose 60."""
    accuracy, _ = digits_run(ratio=0.3, method=method)
    weights_only, _ = digits_run(ratio=0.3, method="l1")
    record_property(f"{method} 0.3 of the channels", f"accuracy {accuracy:.4f}, l1 {weights_only:.4f}")
    assert accuracy >= DIGITS_ACCURACY - 0.01 and accuracy > weights_only + 0.2


def test_digits_with_data_defaults_to_thinet():
    """The acceptance run: `canonicalize,prune-channels(ratio=0.3)` with --data loses at most 1 point."""
    data = np.load(DIGITS_TEST)
    result = optimize(DIGITS, "canonicalize,prune-channels(ratio=0.3)", data=DIGITS_CALIB, latency=False)
    stats = result.report["passes"][-1]["stats"]
    assert stats["method"] == "thinet" and stats["macs"][1] < 0.6 * stats["macs"][0]
    assert all(r["error"][1] < r["error"][0] for r in stats["refit"].values())  # the refit helps every consumer
    accuracy = float((ort.run(result.graph, {"x": data["x"]})["logits"].argmax(1) == data["y"]).mean())
    assert accuracy >= DIGITS_ACCURACY - 0.01
    assert optimize(DIGITS, "canonicalize,prune-channels(ratio=0.3)", latency=False).report["passes"][-1][
        "stats"]["method"] == "l1"  # random inputs: the weights-only method


def test_digits_sequential_helps_at_high_ratios():
    one_shot, _ = digits_run(ratio=0.7)
    sequential, _ = digits_run(ratio=0.7, sequential=True)
    assert sequential >= one_shot and sequential > 0.9


@pytest.mark.parametrize("builder", ["resnet", "bottleneck", "mobilenet", "transformer"])
def test_reconstruction_on_builders_beats_the_weights_alone(builder):
    """Residual groups (several consumers chosen jointly), depthwise Convs, MatMuls; calibrated on
    random inputs as check_pass's are."""
    _, result, worst = check_pass(BUILDERS[builder](), PruneChannels(ratio=0.5, method="thinet"))
    _, _, weights_only = check_pass(BUILDERS[builder](), PruneChannels(ratio=0.5, method="l1"))
    assert {d["method"] for d in result.decisions.values()} == {"thinet"}
    assert min(worst.values()) > min(weights_only.values()) + 0.05


def test_cli_sensitivity_takes_prune_channels():
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", "sensitivity", DIGITS, "--pass", "prune-channels",
                        "--ratios", "0.5", "--data", DIGITS_TEST], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [line.split()[0] for line in lines[2:]] == ["conv0", "conv3", "conv7", "gemm12"]
    assert int(lines[2].split()[2].replace(",", "")) == 16 * 64 * 9 + 32 * 16 * 64 * 9  # conv0's and conv3's MACs
