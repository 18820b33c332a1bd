from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphopt.ir import io, ort
from graphopt.ir.errors import PipelineError
from graphopt.ir.graph import export
from graphopt.optimize import optimize
from graphopt.ir.ops import WINOGRAD_TILES
from graphopt.passes.base import TOLERANCE, PassContext, Refused, option_help
from graphopt.passes.conv import winograd
from graphopt.passes.conv import winograd_transforms as wt
from graphopt.passes.conv.winograd import BOUNDS, Winograd
from graphopt.passes.manager import PassManager
from graphopt.passes.pipeline import Pipeline
from graphopt.testing.check import check_pass, refusals, rng_array
from graphopt.testing.tiny import model, node

ROOT = Path(__file__).resolve().parents[3]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
DIGITS_TEST = ROOT / "models" / "digits_test.npz"


def conv3x3(cin: int, cout: int, height: int, width: int, pads=(1, 1, 1, 1), bias: bool = True,
            batch="N", seed: int = 0) -> onnx.ModelProto:
    # He-scaled weights keep outputs O(1), the scale the bounds are stated for.
    weights = {"w": rng_array((cout, cin, 3, 3), seed) * np.float32(np.sqrt(2 / (9 * cin)))}
    inputs = ["x", "w"]
    if bias:
        weights["b"] = rng_array((cout,), seed + 1) * np.float32(0.1)
        inputs.append("b")
    conv = node("Conv", inputs, ["y"], name="conv", kernel_shape=[3, 3], pads=list(pads))
    return model([conv], {"x": (batch, cin, height, width)}, {"y": None}, weights)


def convs_3x3(m: gs.Graph | onnx.ModelProto) -> int:
    proto = m if isinstance(m, onnx.ModelProto) else export(m)
    return sum(1 for n in proto.graph.node if n.op_type == "Conv"
               and [list(a.ints) for a in n.attribute if a.name == "kernel_shape"] == [[3, 3]])


def test_cook_toom_matrices_compute_a_correlation_exactly():
    rng = np.random.default_rng(0)
    for m in wt.TILES:
        at, g, bt = wt.cook_toom(m)
        d, w = rng.standard_normal(m + 2), rng.standard_normal(3)
        reference = np.array([w @ d[i:i + 3] for i in range(m)])
        np.testing.assert_allclose(at @ ((g @ w) * (bt @ d)), reference, atol=1e-12)
        assert np.all(bt == np.round(bt))  # the input transform adds small integers only


@pytest.mark.parametrize("tile", wt.TILES)
@given(cin=st.integers(1, 16), cout=st.integers(1, 16), height=st.integers(3, 15), width=st.integers(3, 15),
       pads=st.tuples(*[st.integers(0, 1)] * 4), bias=st.booleans(), batch=st.sampled_from(["N", 3]),
       seed=st.integers(0, 99))
@settings(max_examples=10, deadline=None)
def test_outputs_within_the_variants_bound(tile, cin, cout, height, width, pads, bias, batch, seed):
    m = conv3x3(cin, cout, height, width, pads, bias, batch, seed)
    graph, result, _ = check_pass(m, Winograd(tile=tile))
    assert result.decisions["conv"]["variant"] == wt.variant(tile)
    assert convs_3x3(graph) == 0 and result.refused == []


@pytest.mark.parametrize("tile", wt.TILES)
def test_output_sizes_the_tile_does_not_divide_are_cropped(tile):
    graph, result, _ = check_pass(conv3x3(5, 7, 12, 14, pads=(0, 1, 1, 0)), Winograd(tile=tile))
    out_h, out_w = 11, 13
    assert result.decisions["conv"]["tiles"] == [-(-out_h // tile), -(-out_w // tile)]
    assert "Slice" in [n.op for n in graph.nodes]


def test_each_instance_declares_its_tiles_bound():
    assert Winograd.info.semantics == BOUNDS[6]
    assert [Winograd(tile=t).info.semantics for t in wt.TILES] == [BOUNDS[2], BOUNDS[4], BOUNDS[6]]
    assert Winograd(select="measure").info.idempotent is False
    assert Winograd(select="measure").info.needs_latency and not Winograd().info.needs_latency
    assert wt.TILES == WINOGRAD_TILES and set(wt.POINTS) == set(WINOGRAD_TILES)  # one contract, ir.ops
    assert all(help_ for _, _, help_ in option_help(Winograd.Options))
    with pytest.raises(PipelineError, match="tile=3"):
        Winograd(tile=3)
    assert str(Pipeline.parse("winograd(tile=2,emit=tvm)")) == "winograd(tile=2,emit='tvm')"


def test_refuses_convs_it_cannot_rewrite():
    w3, w1 = rng_array((4, 4, 3, 3), 1), rng_array((4, 4, 1, 1), 2)
    nodes = [node("Conv", ["x", "w_s"], ["a"], name="strided", kernel_shape=[3, 3], strides=[2, 2]),
             node("Conv", ["x", "w1"], ["b"], name="pointwise", kernel_shape=[1, 1]),
             node("Conv", ["x", "w_d"], ["c"], name="dilated", kernel_shape=[3, 3], dilations=[2, 2]),
             node("Conv", ["x", "w_g"], ["d"], name="grouped", kernel_shape=[3, 3], group=2),
             node("Conv", ["x", "shared"], ["e"], name="shared_a", kernel_shape=[3, 3]),
             node("Conv", ["x", "shared"], ["f"], name="shared_b", kernel_shape=[3, 3]),
             node("Conv", ["x", "t"], ["g"], name="runtime_weight", kernel_shape=[3, 3])]
    weights = {"w_s": w3, "w1": w1, "w_d": w3, "w_g": rng_array((4, 2, 3, 3), 3), "shared": w3}
    m = model(nodes, {"x": (1, 4, 9, 9), "t": (4, 4, 3, 3)}, {k: None for k in "abcdefg"}, weights)
    _, result, _ = check_pass(m, Winograd(), expect_modified=False)
    assert {r.node: r.reason for r in result.refused} == {
        "strided": "stride [2, 2] is not 1", "pointwise": "kernel is 1x1, not 3x3",
        "dilated": "dilation [2, 2] is not 1",
        "grouped": "group=2: grouped and depthwise convs are not rewritten",
        "shared_a": "weight 'shared' is shared with another node",
        "shared_b": "weight 'shared' is shared with another node", "runtime_weight": "'t' is not a constant"}


def test_refuses_negative_pads():
    m = model([node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[3, 3], pads=[1, -1, 1, 1])],
              {"x": (1, 2, 5, 5)}, {"y": (1, 3, 5, 3)}, {"w": rng_array((3, 2, 3, 3))})
    graph = gs.import_onnx(m)
    with pytest.raises(Refused, match=r"negative pads \[1, -1, 1, 1\]"):
        winograd.examine(graph.nodes[0], graph)


def test_refuses_dynamic_spatial_dims_a_runtime_bias_and_other_types():
    m = model([node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
              {"x": ("N", 2, "H", "W")}, {"y": None}, {"w": rng_array((3, 2, 3, 3))})
    _, result, _ = check_pass(m, Winograd(), expect_modified=False)
    assert refusals(result) == ["input 'x' has dynamic channels or spatial dims ['N', 2, 'H', 'W']"]
    m = model([node("Conv", ["x", "w", "b"], ["y"], name="conv", kernel_shape=[3, 3])],
              {"x": (1, 2, 5, 5), "b": (3,)}, {"y": None}, {"w": rng_array((3, 2, 3, 3))})
    _, result, _ = check_pass(m, Winograd(), expect_modified=False)
    assert refusals(result) == ["bias 'b' is computed at run time"]
    m = model([node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[3, 3])], {"x": (1, 2, 5, 5)},
              {"y": None}, {"w": rng_array((3, 2, 3, 3), dtype=np.float64)}, dtype=onnx.TensorProto.DOUBLE)
    record = PassManager([Winograd()]).run(gs.import_onnx(m))[0]  # onnxruntime has no float64 Conv
    assert refusals(record.result) == ["'x' is float64: only float32 convs are rewritten"]


def two_named_convs() -> onnx.ModelProto:
    w = {"w1": rng_array((4, 4, 3, 3), 1), "w2": rng_array((4, 4, 3, 3), 2)}
    nodes = [node("Conv", ["x", "w1"], ["h"], name="first", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             node("Conv", ["h", "w2"], ["y"], name="second", kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    return model(nodes, {"x": (1, 4, 6, 6)}, {"y": None}, w)


@pytest.mark.parametrize("emit", ["onnx", "tvm"])
@pytest.mark.parametrize("option, reason", [({"exclude": ("first",)}, "excluded"),
                                            ({"include": ("second",)}, "not in include"),
                                            ({"include": ("s*",)}, "not in include"),
                                            ({"exclude": ("f?rst", "nothing*")}, None)])
def test_include_and_exclude_pick_convs_by_name_pattern(emit, option, reason):
    # check_pass runs the pass twice: the rewritten conv keeps its name, so the patterns still match.
    if reason is None:
        with pytest.raises(PipelineError, match=r"winograd: exclude=nothing\* matches no layer .*first, second"):
            PassManager([Winograd(emit=emit, **option)]).run(gs.import_onnx(two_named_convs()))
        return
    graph, result, _ = check_pass(two_named_convs(), Winograd(emit=emit, **option))
    assert list(result.decisions) == ["second"] and convs_3x3(graph) == 1
    assert [(s.node, s.reason) for s in result.skipped] == [("first", reason)]


def test_include_by_op_type_and_a_pattern_matching_no_conv_is_an_error():
    graph, result, _ = check_pass(two_named_convs(), Winograd(include=("Conv",)))
    assert list(result.decisions) == ["first", "second"] and result.skipped == []
    with pytest.raises(PipelineError, match="include=nosuchlayer matches no layer"):
        PassManager([Winograd(include=("nosuchlayer",))]).run(gs.import_onnx(two_named_convs()))


def digits_accuracy(graph) -> float:
    data = np.load(DIGITS_TEST)
    return float(np.mean(ort.run(graph, {"x": data["x"]})["logits"].argmax(1) == data["y"]))


@pytest.mark.parametrize("tile", [2, 4])
def test_digits_keeps_its_accuracy(tile):
    result = optimize(DIGITS, f"canonicalize,winograd(tile={tile})", latency=False)
    assert digits_accuracy(result.graph) == digits_accuracy(onnx.load(DIGITS))
    assert convs_3x3(onnx.load(DIGITS)) == 3 and convs_3x3(result.graph) == 0
    assert result.report["passes"][1]["stats"]["rewritten"] == 3


def test_emit_tvm_marks_convs_with_a_function_onnxruntime_runs(tmp_path):
    graph = io.load(DIGITS)
    original = export(graph)
    PassManager([Winograd(emit="tvm", tile=6)]).run(graph, PassContext())
    markers = [n for n in graph.nodes if n.op == "WinogradConv"]
    assert len(markers) == 3 and convs_3x3(graph) == 0
    conv0 = markers[0]
    assert (conv0.domain, conv0.name, conv0.attrs) == ("ai.graphopt", "conv0", {"pads": [1, 1, 1, 1], "tile": 6})
    assert [t.name for t in conv0.inputs] == ["x", "conv0.weight", "conv0.bias"]
    path = io.save(graph, tmp_path / "marked.onnx")
    loaded = io.load_model(path)
    onnx.checker.check_model(loaded, full_check=True)
    (function,) = loaded.functions
    assert (function.domain, function.name) == ("ai.graphopt", "WinogradConv")
    assert list(function.attribute) == ["pads", "tile"] and function.node[0].op_type == "Conv"
    assert {o.domain: o.version for o in loaded.opset_import}["ai.graphopt"] == 1
    x = np.load(DIGITS_TEST)["x"][:64]
    np.testing.assert_allclose(ort.run(loaded, {"x": x})["logits"], ort.run(original, {"x": x})["logits"],
                               rtol=1e-6, atol=1e-6)
    reloaded = io.load(path)
    again = PassManager([Winograd(emit="tvm")]).run(reloaded, PassContext())[0]
    assert not again.modified and len(export(reloaded).functions) == 1


def test_emit_tvm_without_bias_keeps_two_inputs():
    graph, result, _ = check_pass(conv3x3(3, 5, 7, 7, pads=(0, 1, 1, 0), bias=False), Winograd(emit="tvm"))
    (marker,) = graph.nodes
    assert marker.op == "WinogradConv" and len(marker.inputs) == 2 and marker.attrs["pads"] == [0, 1, 1, 0]


def two_convs() -> onnx.ModelProto:
    w = {"w1": rng_array((8, 3, 3, 3), 1) * np.float32(0.3), "w2": rng_array((8, 8, 3, 3), 2) * np.float32(0.2)}
    nodes = [node("Conv", ["x", "w1"], ["h"], name="first", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             node("Relu", ["h"], ["r"]),
             node("Conv", ["r", "w2"], ["y"], name="second", kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    return model(nodes, {"x": ("N", 3, 12, 12)}, {"y": None}, w)


def fake_latency(fastest: int | None):
    """A timer under which the F(fastest) variant (None: the direct conv) is the fastest, by reading
    the tile off the model: the stride of the input transform, or the marker's attribute."""
    def latency(model: onnx.ModelProto, feeds: dict) -> float:
        tile = None
        for n in model.graph.node:
            for a in n.attribute:
                if (a.name == "strides" and a.ints[0] > 1) or a.name == "tile":
                    tile = a.ints[0] if a.name == "strides" else a.i
        return 1.0 if tile == fastest else 10.0 if tile is None else 2.0 + tile
    return latency


def test_measure_records_a_choice_timings_and_errors_per_conv():
    # onnxruntime's timings decide, so any choice is valid; the outputs must hold the bound anyway.
    _, result, _ = check_pass(two_convs(), Winograd(select="measure"), expect_modified=None)
    for name in ("first", "second"):
        layer = result.decisions[name]
        assert layer["chosen"] in ("direct", *map(wt.variant, wt.TILES)) and layer["reason"]
        assert set(layer["max_abs_error"]) == set(map(wt.variant, wt.TILES))
        assert layer["timings_ms"]["direct"] > 0 and layer["chosen"] in layer["timings_ms"]


@pytest.mark.parametrize("fastest", [2, 6, None])
def test_measure_keeps_the_fastest(fastest):
    graph = gs.import_onnx(two_convs())
    record = PassManager([Winograd(select="measure")]).run(graph, PassContext(latency=fake_latency(fastest)))[0]
    chosen = wt.variant(fastest) if fastest else "direct"
    assert [record.decisions[n]["chosen"] for n in ("first", "second")] == [chosen, chosen]
    assert convs_3x3(graph) == (2 if fastest is None else 0)


def test_measure_skips_a_variant_over_its_bound(monkeypatch):
    pass_ = Winograd(select="measure", emit="tvm")
    monkeypatch.setitem(winograd.BOUNDS, 6, TOLERANCE(0.0, 0.0))
    graph = gs.import_onnx(two_convs())
    record = PassManager([pass_]).run(graph, PassContext(latency=fake_latency(6)))[0]
    layer = record.decisions["second"]
    assert layer["chosen"] == "F(2x2,3x3)" and "F(6x6,3x3)" not in layer["timings_ms"]
    assert "rejected F(6x6,3x3)" in layer["reason"]
    assert {n.attrs["tile"] for n in graph.nodes if n.op == "WinogradConv"} == {2}


def test_measure_for_tvm_without_a_target_timer_marks_with_the_tile():
    graph = gs.import_onnx(two_convs())
    record = PassManager([Winograd(select="measure", emit="tvm", tile=2)]).run(graph, PassContext())[0]
    assert record.stats["select"].startswith("all: no timer for the target")
    assert [n.attrs["tile"] for n in graph.nodes if n.op == "WinogradConv"] == [2, 2]
