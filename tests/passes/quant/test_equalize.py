"""Cross-layer equalization before quantize: exact in float, and per-tensor int8 on depthwise stacks."""
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from graphopt.ir import fidelity, ort
from graphopt.ir.data import input_specs, random_feeds
from graphopt.ir.errors import PipelineError
from graphopt.optimize import optimize
from graphopt.passes.base import EXACT
from graphopt.passes.quant import equalize
from graphopt.passes.quant.insert_qdq import Quantize
from graphopt.testing import builders
from graphopt.testing.check import check_pass, ops
from graphopt.testing.tiny import model, node, with_dims


def depthwise_stack(seed: int = 0, clip_opset: int = 17) -> onnx.ModelProto:
    """Conv 1x1 -> Relu6 -> depthwise 3x3 -> Relu6 -> MaxPool -> Conv 1x1, with per-channel weight
    ranges spread over 100x, as folding trained BatchNorms into the convolutions leaves them."""
    rng = np.random.default_rng(seed)
    spread = rng.permutation(np.logspace(-1, 1, 16)).astype(np.float32)
    w1 = rng.standard_normal((16, 8, 1, 1)).astype(np.float32) * 0.3 * spread[:, None, None, None]
    dw = rng.standard_normal((16, 1, 3, 3)).astype(np.float32) * 0.3 * rng.permutation(spread)[:, None, None, None]
    w3 = (rng.standard_normal((8, 16, 1, 1)) * 0.25).astype(np.float32)
    six = {"lo": np.float32(0), "hi": np.float32(6)}
    nodes = [node("Conv", ["x", "w1", "b1"], ["c1"], name="expand"), node("Clip", ["c1", "lo", "hi"], ["r1"]),
             node("Conv", ["r1", "dw", "b2"], ["c2"], name="depthwise", group=16, pads=[1, 1, 1, 1]),
             node("Clip", ["c2", "lo", "hi"], ["r2"]),
             node("MaxPool", ["r2"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             node("Conv", ["p", "w3"], ["y"], name="project")]
    weights = {"w1": w1, "b1": (0.2 * spread).astype(np.float32), "dw": dw,
               "b2": (0.1 * rng.standard_normal(16)).astype(np.float32), "w3": w3, **six}
    m = model(nodes, {"x": (8, 8, 12, 12)}, {"y": None}, weights, opset=clip_opset)
    return with_dims(m, ["batch", 8, 12, 12])


def inputs(batch: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((batch, 8, 12, 12)).astype(np.float32)}


def equalized(m: onnx.ModelProto) -> tuple[gs.Graph, dict]:
    graph = gs.import_onnx(m)
    return graph, equalize.equalize(graph, [n for n in graph.nodes if n.op == "Conv"])


def test_exact_in_float():
    m = depthwise_stack()
    graph, stats = equalized(m)
    for seed in (1, 2):
        ref, got = ort.run(m, inputs(seed=seed))["y"], ort.run(graph, inputs(seed=seed))["y"]
        assert EXACT.violation(ref, got) is None, EXACT.violation(ref, got)
    assert list(stats["pairs"]) == ["expand -> depthwise", "depthwise -> project"]
    # Clip(0, 6) became Relu then Min with a bound per channel; MaxPool commutes as it was.
    assert ops(graph).count("Min") == 2 and "Clip" not in ops(graph) and "MaxPool" in ops(graph)
    assert all(p["range_ratio_after"] < p["range_ratio_before"] / 3 for p in stats["pairs"].values()), stats


def test_ranges_equalized():
    graph, _ = equalized(depthwise_stack())
    w = {n.name: n.inputs[1].values for n in graph.nodes if n.op == "Conv"}
    # The depthwise layer sits in two pairs; once settled, each shared channel has one range on both sides.
    np.testing.assert_allclose(equalize.output_ranges(w["expand"]), equalize.input_ranges(w["depthwise"], 16),
                               rtol=1e-3)
    np.testing.assert_allclose(equalize.output_ranges(w["depthwise"]), equalize.input_ranges(w["project"], 1),
                               rtol=1e-3)


@pytest.mark.parametrize("build", ["mobilenet", "resnet"])
def test_builders_exact_and_quantize_within_bound(build):
    m = builders.__dict__[build]()
    folded = optimize(gs.import_onnx(m), "canonicalize", latency=False).graph
    graph = folded.copy()
    stats = equalize.equalize(graph, [n for n in graph.nodes if n.op == "Conv"])
    assert stats["pairs"]
    feeds = random_feeds(input_specs(folded), seed=0, batch=1)
    ref, got = ort.run(folded, feeds)["output"], ort.run(graph, feeds)["output"]
    assert EXACT.violation(ref, got) is None
    _, result, worst = check_pass(folded, Quantize(equalize="on", per_channel=False))
    assert min(worst.values()) >= Quantize.info.semantics.bound and result.stats["equalize"]["pairs"]


def sqnr(m: onnx.ModelProto, spec: str) -> tuple[float, dict]:
    result = optimize(gs.import_onnx(m), spec, data=inputs(batch=64), latency=False)
    held = inputs(batch=32, seed=9)
    out = ort.run(result.graph, held)["y"]
    stats = next(p for p in result.report["passes"] if p["name"].startswith("quantize"))["stats"]
    return float(fidelity.measure(ort.run(m, held)["y"], out).sqnr_db), stats


def test_int8_better_equalized():
    """A layer whose channel ranges spread 100x loses its small channels to per-tensor weights, and
    the activation after it to its per-tensor scale; equalization gives them back, and bias
    correction keeps what it gained."""
    m = depthwise_stack()
    off, _ = sqnr(m, "quantize(per_channel=false,equalize=off,rounding=nearest)")
    on, _ = sqnr(m, "quantize(per_channel=false,equalize=on,rounding=nearest)")
    corrected, _ = sqnr(m, "quantize(per_channel=false,equalize=on,rounding=nearest,bias_correction=true)")
    channel_off, _ = sqnr(m, "quantize(equalize=off,rounding=nearest)")
    channel_auto, stats = sqnr(m, "quantize(rounding=nearest)")
    print(f"int8 SQNR: per tensor: equalize off {off:.2f} dB, on {on:.2f} dB, + bias correction {corrected:.2f} dB; "
          f"per channel: off {channel_off:.2f} dB, auto {channel_auto:.2f} dB")
    assert on > off + 6.0 and corrected > on - 0.5
    # With data, auto measures both ways: the activation gains here even with per-channel weights.
    assert stats["equalize"]["chosen"] and channel_auto > channel_off + 6.0


def test_auto_without_data_follows_per_channel_with_data_measures():
    m = depthwise_stack()
    for per_channel in (True, False):
        result = optimize(gs.import_onnx(m), f"quantize(per_channel={per_channel})", latency=False)
        stats = next(p for p in result.report["passes"] if p["name"].startswith("quantize"))["stats"]
        assert ("equalize" in stats) == (not per_channel)
    # Dynamic mode: smaller stakes either way; auto's choice, measured on calibration samples, holds
    # on held-out data within half a dB of the better one.
    auto, stats = sqnr(m, "quantize(mode=dynamic,rounding=nearest)")
    best = max(sqnr(m, f"quantize(mode=dynamic,rounding=nearest,equalize={e})")[0] for e in ("on", "off"))
    assert "dB" in stats["equalize"]["reason"] and auto > best - 0.5
    with pytest.raises(PipelineError, match="equalize="):
        optimize(gs.import_onnx(m), "quantize(equalize=yes)", latency=False)


def test_old_opset_clip_attributes():
    """Clip with min/max attributes (opset < 11) is recognised as well."""
    rng = np.random.default_rng(1)
    m = model([node("Conv", ["x", "w1"], ["c1"], name="a"), node("Clip", ["c1"], ["r"], min=0.0, max=6.0),
               node("Conv", ["r", "w2"], ["y"], name="b")], {"x": (2, 4, 5, 5)}, {"y": (2, 4, 5, 5)},
              {"w1": rng.standard_normal((6, 4, 1, 1)).astype(np.float32) * np.logspace(-1, 1, 6)[:, None, None, None]
               .astype(np.float32), "w2": rng.standard_normal((4, 6, 1, 1)).astype(np.float32)}, opset=10)
    graph, stats = equalized(m)
    feeds = {"x": rng.standard_normal((2, 4, 5, 5)).astype(np.float32) * 3}
    assert list(stats["pairs"]) == ["a -> b"]
    assert EXACT.violation(ort.run(m, feeds)["y"], ort.run(graph, feeds)["y"]) is None
