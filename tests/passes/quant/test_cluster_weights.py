"""cluster-weights (Deep Compression's weight sharing) and its k-means kernel, against onnxruntime.

Measured on digits (python3 -m pytest -q tests/passes/quant/test_cluster_weights.py -s): fp32
98.89%; bits=4 98.89% (data weighting) / 99.07% (none); bits=3 99.07%; bits=2 94.63%;
prune-magnitude(0.5) then bits=4 98.70%.
"""
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from graphopt.ir import ort
from graphopt.ir.errors import PipelineError
from graphopt.ir.graph import export
from graphopt.kernels.kmeans import kmeans_1d
from graphopt.optimize import optimize
from graphopt.passes import activations
from graphopt.passes.base import PassContext
from graphopt.passes.manager import PassManager
from graphopt.passes.quant.calibrate import with_outputs
from graphopt.passes.quant.cluster_weights import ClusterWeights, cluster, diag_importance, weighted_error
from graphopt.passes.quant.codebook import coded
from graphopt.testing import builders
from graphopt.testing.check import check_pass, rng_array
from graphopt.testing.tiny import model, node

ROOT = Path(__file__).resolve().parents[3]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
DIGITS_TEST = ROOT / "models" / "digits_test.npz"
DIGITS_CALIB = ROOT / "models" / "digits_calib.npz"


def accuracy(graph_or_path) -> float:
    test = np.load(DIGITS_TEST)
    m = export(graph_or_path) if isinstance(graph_or_path, gs.Graph) else onnx.load(graph_or_path)
    return float((ort.run(m, {"x": test["x"].astype(np.float32)})["logits"].argmax(1) == test["y"]).mean())


def decoded_weights(graph: gs.Graph) -> dict[str, np.ndarray]:
    """Each coded layer's weight as onnxruntime computes it (the Gather/Mul output), by layer name."""
    layers = {n.name: n.inputs[1].name for n in graph.nodes if len(n.inputs) > 1 and coded(n.inputs[1])}
    feeds = {t.name: np.zeros([d if isinstance(d, int) else 1 for d in t.shape], t.dtype) for t in graph.inputs}
    out = ort.run(with_outputs(graph, list(layers.values())), feeds)
    return {name: out[tensor] for name, tensor in layers.items()}


def digits(spec: str):
    return optimize(DIGITS, spec, data=DIGITS_CALIB, latency=False, min_cosine=0.0)


# -- the kernel ------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["linear", "density", "random"])
def test_kmeans_converges_to_known_clusters(init):
    rng = np.random.default_rng(0)
    means = np.array([-2.0, 0.5, 3.0])
    x = rng.permutation(np.concatenate([rng.normal(m, 0.05, 300) for m in means]))
    centroids, labels = kmeans_1d(x, 3, init=init, seed=1)
    np.testing.assert_allclose(centroids, means, atol=0.02)
    assert np.all(np.diff(centroids) > 0)
    # Every value carries its nearest centroid, and each centroid is its cluster's mean.
    assert (labels == np.abs(x[:, None] - centroids[None]).argmin(1)).all()
    np.testing.assert_allclose([x[labels == j].mean() for j in range(3)], centroids, rtol=1e-12)


def test_kmeans_from_a_start_never_raises_the_objective():
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal(2000), rng.exponential(size=2000)

    def objective(c, labels):
        return float(np.sum(w * (x - c[labels]) ** 2))
    plain = kmeans_1d(x, 8)
    weighted = kmeans_1d(x, 8, weights=w, start=plain[0])
    assert objective(*weighted) <= objective(*plain)


def test_kmeans_weights_pull_the_centroid():
    x = np.array([0.0, 1.0, 10.0, 11.0])
    c, _ = kmeans_1d(x, 2, weights=np.array([1.0, 3.0, 1.0, 1.0]))
    np.testing.assert_allclose(c, [0.75, 10.5])
    c1, labels = kmeans_1d(x, 1, weights=np.array([1.0, 1.0, 2.0, 0.0]))
    np.testing.assert_allclose(c1, [5.25])
    assert labels.shape == x.shape and (labels == 0).all()


# -- the pass on synthetic graphs --------------------------------------------------------------
def conv_gemm(zeros: bool = False) -> onnx.ModelProto:
    w = rng_array((8, 3, 3, 3))
    if zeros:
        w[np.abs(w) < 0.6] = 0.0
    return model([node("Conv", ["x", "w", "b"], ["c"], name="conv", kernel_shape=[3, 3]), node("Relu", ["c"], ["r"]),
                  node("Flatten", ["r"], ["f"]), node("Gemm", ["f", "w2"], ["y"], name="fc", transB=1)],
                 {"x": (2, 3, 6, 6)}, {"y": (2, 5)},
                 {"w": w, "b": rng_array((8,), 1), "w2": rng_array((5, 128), 2)})


@pytest.mark.parametrize("bits, index_type", [(4, onnx.TensorProto.UINT4), (6, onnx.TensorProto.UINT8)])
def test_codebook_form_runs_in_onnxruntime(bits, index_type):
    pass_ = ClusterWeights(bits=bits)
    graph, result, worst = check_pass(conv_gemm(), pass_)
    assert min(worst.values()) >= pass_.info.semantics.bound
    assert set(result.decisions) == {"conv", "fc"}
    proto = export(graph)
    assert next(o.version for o in proto.opset_import if o.domain == "") >= (21 if bits <= 4 else 1)
    kinds = {i.name: i.data_type for i in proto.graph.initializer}
    assert sorted(n.op_type for n in proto.graph.node).count("Gather") == 2
    for n in proto.graph.node:
        if n.op_type == "Cast":
            assert kinds[n.input[0]] == index_type
    for name, w in decoded_weights(graph).items():
        assert len(np.unique(w)) <= 2 ** bits, name
        d = result.decisions[name]
        assert d["bits"] == bits and d["centroids_used"] == len(np.unique(w)) and d["bytes_after"] < d["bytes_before"]
        assert d["weight_sqnr_db"] > 4.5 * bits  # ~6 dB a bit less what the Gaussian's tails cost
    assert result.stats["bytes_before"] == sum(d["bytes_before"] for d in result.decisions.values())


@pytest.mark.parametrize("build", ["resnet", "mobilenet", "mlp", "transformer"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_builders_within_the_declared_bound(build, bits):
    pass_ = ClusterWeights(bits=bits)
    _, result, worst = check_pass(getattr(builders, build)(), pass_)
    assert min(worst.values()) >= pass_.info.semantics.bound, worst
    assert result.decisions


def test_zeros_stay_exactly_zero():
    m = conv_gemm(zeros=True)
    before = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}["w"]
    assert (before == 0).mean() > 0.3
    graph, result, _ = check_pass(m, ClusterWeights(bits=3))
    after = decoded_weights(graph)["conv"]
    assert ((after == 0) == (before == 0)).all()
    assert result.decisions["conv"]["zeros_kept"] == int((before == 0).sum())
    book = cluster(before, 3)
    assert book.values[0] == 0 and (book.indices[before != 0] > 0).all()


def test_refusals_are_named():
    w = rng_array((6, 6))
    m = model([node("MatMul", ["x", "w"], ["a"], name="first"), node("MatMul", ["a", "w"], ["b"], name="second"),
               node("Gemm", ["b", "small"], ["y"], name="tiny")], {"x": (2, 6)}, {"y": (2, 2)},
              {"w": w, "small": rng_array((6, 2), 1)})
    # modified: the manager upgrades the opset for UINT4 indices even though no layer changes.
    _, result, _ = check_pass(m, ClusterWeights(bits=4), expect_modified=None)
    reasons = {r.node: r.reason for r in result.refused}
    assert "shared with another node" in reasons["first"] and "shared" in reasons["second"]
    assert "12 values, fewer than the codebook's 16" in reasons["tiny"]


def test_non_float32_weight_is_refused():
    graph = gs.import_onnx(conv_gemm())
    fc = next(n for n in graph.nodes if n.name == "fc")
    fc.inputs[1] = gs.Constant("w16", fc.inputs[1].values.astype(np.float16))
    # bits=6: UINT8 indices, so no opset upgrade is needed outside the manager.
    result = ClusterWeights(bits=6).run(graph, PassContext())
    assert [(r.node, "float16: cluster-weights takes float32" in r.reason) for r in result.refused] == [("fc", True)]


def test_second_run_skips_coded_layers_and_options_are_checked():
    graph, _, _ = check_pass(conv_gemm(), ClusterWeights(bits=4, include=("conv",)))
    again = PassManager([ClusterWeights(bits=4, include=("conv", "fc"))]).run(graph, PassContext())[0].result
    assert {s.node: s.reason for s in again.skipped}["conv"] == "weight already stored as a codebook"
    assert set(again.decisions) == {"fc"}
    for bad in ({"bits": 9}, {"init": "kmeans++"}, {"weighting": "hessian"}):
        with pytest.raises(PipelineError, match=next(iter(bad))):
            ClusterWeights(**bad)
    assert ClusterWeights(weighting=None).options.weighting == "none"  # how the parser reads 'none'


# -- digits: accuracy, pruning, data weighting ---------------------------------------------------
def test_digits_bits4_within_a_point_and_refuses_what_is_too_small():
    fp32 = accuracy(DIGITS)
    result = digits("canonicalize,cluster-weights(bits=4)")
    acc = accuracy(result.graph)
    print(f"digits fp32 {fp32:.4f} cluster-weights(bits=4) {acc:.4f}")
    assert acc >= fp32 - 0.01
    layers = next(p for p in result.report["passes"] if p["name"].startswith("cluster-weights"))
    assert layers["stats"]["weighting"] == "data" and layers["stats"]["ratio"] > 7
    for w in decoded_weights(result.graph).values():
        assert len(np.unique(w)) <= 16
    # conv0 has 144 weights: fewer than 2^8 centroids.
    big = digits("canonicalize,cluster-weights(bits=8)")
    refused = next(p for p in big.report["passes"] if p["name"].startswith("cluster-weights"))["refused"]
    assert [r["node"] for r in refused] == ["conv0"]


def test_digits_pruned_zeros_stay_zero():
    pruned = digits("canonicalize,prune-magnitude(sparsity=0.5)").graph
    zeros = {n.name: n.inputs[1].values == 0 for n in pruned.nodes if n.op in ("Conv", "Gemm")}
    graph = pruned.copy()
    PassManager([ClusterWeights(bits=4)]).run(graph, PassContext(feeds=dict(np.load(DIGITS_CALIB)), from_data=True))
    decoded = decoded_weights(graph)
    assert set(decoded) == set(zeros)
    for name, w in decoded.items():
        assert ((w == 0) == zeros[name]).all(), name
    # Sensitivity allocation (the default with data) spreads 50% unevenly over the layers.
    assert sum(z.sum() for z in zeros.values()) / sum(z.size for z in zeros.values()) >= 0.45
    acc = accuracy(graph)
    print(f"digits prune-magnitude(0.5) {accuracy(pruned):.4f} + cluster-weights(bits=4) {acc:.4f}")
    assert acc >= accuracy(DIGITS) - 0.01


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_data_weighting_lowers_the_hessian_weighted_error(bits):
    graph = gs.import_onnx(onnx.load(DIGITS))
    layers = [n for n in graph.nodes if n.op in ("Conv", "Gemm")]
    stats = activations.statistics(graph, layers, {"x": np.load(DIGITS_CALIB)["x"]})
    plain = data = 0.0
    for n in layers:
        w = n.inputs[1].values
        h = diag_importance(n, stats[n.name].hessian, 0.01)
        e_plain = weighted_error(w, cluster(w, bits).decoded(), h)
        e_data = weighted_error(w, cluster(w, bits, h).decoded(), h)
        # Weighted Lloyd starts from plain k-means' centroids and only lowers its objective.
        assert e_data <= e_plain * (1 + 1e-9), (n.name, e_data, e_plain)
        plain, data = plain + e_plain, data + e_data
    print(f"bits={bits}: diag-H weighted error plain {plain:.4g} data {data:.4g}")
    assert data < plain * 0.999


@pytest.mark.parametrize("bits", [2, 3])
def test_compensated_choice_lowers_the_output_error_and_keeps_zeros(bits):
    """GPTQ's column walk with the centroids refit to it: the layer's output error on the
    calibration rows, tr(ΔW H ΔWᵀ), is below nearest-centroid's in total, every layer keeps at most
    2^bits values, and pruned zeros stay zero."""
    from graphopt.passes.quant.cluster_weights import compensated
    from graphopt.passes.quant.gptq import output_error

    graph = digits("canonicalize,prune-magnitude(sparsity=0.5)").graph
    layers = [n for n in graph.nodes if n.op in ("Conv", "Gemm")]
    stats = activations.statistics(graph, layers, {"x": np.load(DIGITS_CALIB)["x"]})
    nearest = walked = 0.0
    for n in layers:
        w = n.inputs[1].values
        book = cluster(w, bits, diag_importance(n, stats[n.name].hessian, 0.01))
        better = compensated(n, book, stats[n.name], 0.01)
        assert better.values.size == 1 << bits and ((better.decoded() == 0) == (w == 0)).all(), n.name
        for g, h in enumerate(stats[n.name].hessian):
            as_matrix = [activations.weight_matrix(n, v)[g] for v in (w, book.decoded(), better.decoded())]
            nearest += output_error(as_matrix[0], as_matrix[1], h)
            walked += output_error(as_matrix[0], as_matrix[2], h)
    print(f"bits={bits}: output error nearest {nearest:.4g}, compensated {walked:.4g}")
    assert walked < 0.9 * nearest


def test_refit_centroids_is_the_least_squares_optimum():
    """For fixed labels, the refit centroids solve the output-error least squares built explicitly
    (the decoded weight as a design matrix in the centroids), and a kept zero stays out of it."""
    from graphopt.passes.quant.cluster_weights import refit_centroids

    rng = np.random.default_rng(0)
    w = rng.normal(size=(1, 6, 10))
    x = rng.normal(size=(200, 10)) * np.linspace(0.2, 2, 10)
    h = (x.T @ x / len(x))[None]
    labels = rng.integers(-1, 4, size=w.shape)
    fitted = refit_centroids(w, labels, h, np.zeros(4), ridge=0.0)
    # Output of row i on sample s is Σ_k c_k Σ_{j: L_ij = k} x_sj: one column per centroid.
    design = np.stack([np.concatenate([x @ (labels[0, i] == k) for i in range(6)]) for k in range(4)], axis=1)
    target = np.concatenate([x @ w[0, i] for i in range(6)])
    expected = np.linalg.lstsq(design, target, rcond=None)[0]
    np.testing.assert_allclose(fitted, expected, rtol=1e-8, atol=1e-10)


def test_cli_prune_then_cluster(tmp_path):
    out = tmp_path / "out"
    spec = "canonicalize,prune-magnitude(sparsity=0.5),cluster-weights(bits=4)"
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", "optimize", str(DIGITS), "--passes", spec, "--data",
                        str(DIGITS_CALIB), "-o", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    saved = onnx.load(out / "model.opt.onnx")
    assert any(i.data_type == onnx.TensorProto.UINT4 for i in saved.graph.initializer)
    assert accuracy(str(out / "model.opt.onnx")) >= accuracy(DIGITS) - 0.01


def test_uint4_indices_match_the_numpy_decoding():
    graph, _, _ = check_pass(conv_gemm(), ClusterWeights(bits=2))
    proto = export(graph)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    gather = next(n for n in proto.graph.node if n.op_type == "Gather" and "w2" in n.input[0])
    cast = next(n for n in proto.graph.node if n.output[0] == gather.input[1])
    assert inits[cast.input[0]].dtype == ml_dtypes.uint4
    np.testing.assert_array_equal(inits[gather.input[0]][inits[cast.input[0]].astype(np.int64)],
                                  decoded_weights(graph)["fc"])
