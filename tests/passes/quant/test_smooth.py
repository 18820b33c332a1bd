"""SmoothQuant before quantize: exact in float, and what it buys on activations with outlier channels."""
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from graphopt.ir import fidelity, ort
from graphopt.ir.data import input_specs, random_feeds
from graphopt.ir.errors import PipelineError
from graphopt.optimize import optimize
from graphopt.passes.base import EXACT
from graphopt.passes.quant import smooth
from graphopt.passes.quant.calibrate import channel_statistics
from graphopt.testing import builders
from graphopt.testing.check import ops
from graphopt.testing.tiny import model, node, with_dims

K, N = 32, 48
OUTLIERS = (3, 17)


def outlier_model(residual: bool = False, seed: int = 0) -> onnx.ModelProto:
    """LayerNormalization whose gamma makes channels 3 and 17 30x larger (the outliers SmoothQuant
    targets), then MatMul -> Add -> Relu -> MatMul; with `residual`, the LN output is also added
    to the result, so that it cannot absorb the scale."""
    rng = np.random.default_rng(seed)
    gamma = np.ones(K, np.float32)
    gamma[list(OUTLIERS)] = 30.0
    nodes = [node("LayerNormalization", ["x", "gamma", "beta"], ["h"], name="ln", axis=-1),
             node("MatMul", ["h", "w1"], ["m1"], name="fc1"), node("Add", ["m1", "b1"], ["a1"]),
             node("Relu", ["a1"], ["r1"]), node("MatMul", ["r1", "w2"], ["y" if not residual else "m2"], name="fc2")]
    if residual:
        nodes.append(node("Add", ["m2", "h"], ["y"]))
    weights = {"gamma": gamma, "beta": (0.1 * rng.standard_normal(K)).astype(np.float32),
               "w1": (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32),
               "b1": (0.1 * rng.standard_normal(N)).astype(np.float32),
               "w2": (rng.standard_normal((N, K)) / np.sqrt(N)).astype(np.float32)}
    return with_dims(model(nodes, {"x": (16, 8, K)}, {"y": None}, weights), ["batch", 8, K])


def feeds_for(m, batch=16, seed=0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((batch, 8, K)).astype(np.float32)}


def smoothed(m, setting="on", activation="int8") -> tuple[gs.Graph, dict]:
    graph = gs.import_onnx(m)
    layers = [n for n in graph.nodes if n.op in ("MatMul", "Gemm")]
    return graph, smooth.smooth(graph, layers, feeds_for(m), setting, 0.5, activation, per_channel=True)


def assert_exact(before, after, feeds):
    ref, got = ort.run(before, feeds), ort.run(after, feeds)
    for name in ref:
        assert EXACT.violation(ref[name], got[name]) is None, EXACT.violation(ref[name], got[name])


def test_folds_into_layernorm_and_the_previous_layer_exactly():
    m = outlier_model()
    graph, stats = smoothed(m)
    assert_exact(m, graph, feeds_for(m, seed=1))
    assert "Mul" not in ops(graph)  # both groups folded: LN gamma/beta, fc1's columns and bias
    assert {g["applied"] for g in stats["groups"].values()} == {"folded into the producer"}
    gamma = next(n for n in graph.nodes if n.op == "LayerNormalization").inputs[1].values
    # The outlier channels' gain is cut the most: they were divided by the largest s.
    assert set(np.argsort(gamma)[:2]) == set(OUTLIERS) or gamma[list(OUTLIERS)].max() < 30.0


def test_inserts_a_mul_when_the_activation_has_other_readers():
    m = outlier_model(residual=True)
    graph, stats = smoothed(m)
    assert_exact(m, graph, feeds_for(m, seed=1))
    muls = [n for n in graph.nodes if n.op == "Mul"]
    assert len(muls) == 1 and muls[0].outputs[0].outputs[0].name == "fc1"  # the residual still reads h
    assert stats["groups"]["h"]["applied"].startswith("inserted Mul ('h' is also read by Add")


@pytest.mark.parametrize("build", ["transformer", "mlp"])
def test_builders_exact_in_float(build):
    m = getattr(builders, build)()
    graph = gs.import_onnx(m)
    layers = [n for n in graph.nodes if n.op in ("MatMul", "Gemm")]
    feeds = random_feeds(input_specs(graph), seed=0, batch=2)
    stats = smooth.smooth(graph, layers, feeds, "on", 0.5, "int8", per_channel=True)
    assert stats["groups"]
    assert_exact(m, graph, random_feeds(input_specs(graph), seed=1, batch=2))


def test_smoothing_scales_formula():
    m = outlier_model()
    graph = gs.import_onnx(m)
    fc1 = next(n for n in graph.nodes if n.name == "fc1")
    group = smooth.Group(fc1.inputs[0], [fc1], [fc1], [])
    stats = channel_statistics(graph, {"h": -1}, feeds_for(m))
    s = smooth.smoothing_scales(stats["h"], group, alpha=0.5)
    x = ort.run(smooth_outputs(graph), feeds_for(m))["h"].reshape(-1, K)
    expected = np.sqrt(np.abs(x).max(0)) / np.sqrt(np.abs(fc1.inputs[1].values).max(1))
    np.testing.assert_allclose(s, expected, rtol=1e-5)


def smooth_outputs(graph: gs.Graph) -> gs.Graph:
    copy = graph.copy()
    copy.outputs.append(copy.tensors()["h"])
    return copy


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_outliers_quantize_better_smoothed(mode, residual):
    """Calibrated on data, smooth=auto (the default) smooths the outlier groups and lowers the
    quantized model's output error; without data it is off."""
    m = outlier_model(residual=residual)
    data = feeds_for(m, batch=64)
    held = feeds_for(m, batch=32, seed=5)
    reference = ort.run(m, held)["y"]

    def sqnr(spec: str) -> tuple[float, dict]:
        result = optimize(gs.import_onnx(m), spec, data=data, latency=False)
        out = ort.run(result.graph, held)["y"]
        stats = next(p for p in result.report["passes"] if p["name"].startswith("quantize"))["stats"]
        return float(fidelity.measure(reference, out).sqnr_db), stats
    off, _ = sqnr(f"quantize(mode={mode},smooth=off)")
    auto, stats = sqnr(f"quantize(mode={mode})")
    print(f"{mode} residual={residual}: SQNR smooth=off {off:.2f} dB, auto {auto:.2f} dB")
    assert stats["smooth"]["groups"]["h"]["smoothed"]
    assert auto > off + 2.0
    without_data = optimize(gs.import_onnx(m), f"quantize(mode={mode})", latency=False)
    assert "smooth" not in next(p for p in without_data.report["passes"] if p["name"].startswith("quantize"))["stats"]


@pytest.mark.parametrize("spec, name", [("quantize(smooth=maybe)", "smooth"),
                                        ("quantize(smooth_alpha=1.5)", "smooth_alpha")])
def test_bad_options(spec, name):
    with pytest.raises(PipelineError, match=f"{name}="):
        optimize(gs.import_onnx(outlier_model()), spec, latency=False)


def test_channel_statistics_against_numpy():
    m = outlier_model()
    graph = gs.import_onnx(m)
    feeds = feeds_for(m, batch=40)
    stats = channel_statistics(smooth_outputs(graph), {"h": -1, "r1": -1}, feeds, batch_size=16)
    x = ort.run(smooth_outputs(graph), feeds)["h"].reshape(-1, K).astype(np.float64)
    np.testing.assert_allclose(stats["h"].lo, x.min(0), rtol=1e-6)
    np.testing.assert_allclose(stats["h"].hi, x.max(0), rtol=1e-6)
    np.testing.assert_allclose(stats["h"].mean_square, (x * x).mean(0), rtol=1e-6)
    assert stats["r1"].lo.min() >= 0 and stats["r1"].lo.shape == (N,)  # after Relu, per channel
