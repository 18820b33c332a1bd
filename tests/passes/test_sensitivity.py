import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from graphopt.ir import io
from graphopt.ir.data import input_specs, random_feeds
from graphopt.ir.errors import PipelineError
from graphopt.optimize import optimize
from graphopt.passes.prune.magnitude import PruneMagnitude
from graphopt.passes.sensitivity import Layer, Point, Table, allocate, analyze, analyze_pass
from graphopt.report import format_sensitivity
from graphopt.report_html import sensitivity_html, write_html
from graphopt.testing import builders
from graphopt.testing.check import as_graph

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
DIGITS_TEST = ROOT / "models" / "digits_test.npz"


def table(errors: dict[str, list[float]], sizes: dict[str, int], ratios=(0.5, 1.0)) -> Table:
    layers = [Layer(name, "Conv", sizes[name]) for name in errors]
    points = {name: [Point(r, 1 - e, 0.0) for r, e in zip(ratios, errs)] for name, errs in errors.items()}
    return Table(layers, points)


def removed(t: Table, ratios: dict[str, float]) -> float:
    return sum(layer.size * ratios[layer.name] for layer in t.layers) / sum(layer.size for layer in t.layers)


def test_allocate_takes_the_cheapest_steps_and_meets_the_budget_exactly():
    t = table({"robust": [0.001, 0.002], "fragile": [0.1, 0.5]}, {"robust": 100, "fragile": 100})
    ratios = allocate(t, 0.5)
    assert ratios == {"robust": 1.0, "fragile": 0.0}
    ratios = allocate(t, 0.6)  # the fragile layer's first step, taken in part
    assert ratios["robust"] == 1.0 and ratios["fragile"] == pytest.approx(0.2)
    assert removed(t, ratios) == pytest.approx(0.6)


def test_allocate_weighs_error_per_unit_of_size():
    # Same error, but the big layer removes ten times as much for it.
    t = table({"small": [0.01, 0.02], "big": [0.01, 0.02]}, {"small": 10, "big": 100})
    ratios = allocate(t, 0.4)
    assert ratios["small"] == 0.0 and removed(t, ratios) == pytest.approx(0.4)


def test_allocate_edges():
    t = table({"a": [0.1, 0.2], "b": [0.1, 0.3]}, {"a": 10, "b": 0})
    assert allocate(t, 0.0) == {"a": 0.0, "b": 0.0}
    assert allocate(t, 1.0) == {"a": 1.0, "b": 0.0}  # a layer of size 0 takes no part
    short = table({"a": [0.1]}, {"a": 10}, ratios=(0.5,))
    with pytest.raises(PipelineError, match=r"largest measured ratios remove \(0.500\); add a larger ratio"):
        allocate(short, 0.8)
    with pytest.raises(PipelineError, match="needs labels"):
        allocate(t, 0.5, metric="accuracy")
    with pytest.raises(PipelineError, match="fraction"):
        allocate(t, 1.5)


def test_analyze_measures_each_layer_alone():
    graph = as_graph(builders.mlp())
    feeds = random_feeds(input_specs(graph), seed=0)
    pass_ = PruneMagnitude()
    labels = np.zeros(8, np.int64)
    t = analyze_pass(graph, pass_, (0.9, 0.3), feeds, labels)
    assert t.ratios == [0.3, 0.9] and [layer.name for layer in t.layers] == ["MatMul_0", "MatMul_1", "Gemm_0"]
    for layer in t.layers:
        low, high = t.points[layer.name]
        assert 1 > low.cosine > high.cosine and low.accuracy is not None
    assert 0 <= t.baseline_accuracy <= 1
    assert all(np.count_nonzero(v.values) == v.values.size for v in graph.tensors().values()
               if hasattr(v, "values") and v.name.endswith("weight"))  # the graph itself is untouched
    untouched = analyze(graph, t.layers[:1], lambda g, layer, r: None, (0.5,), feeds)
    assert untouched.points["MatMul_0"][0].cosine == pytest.approx(1.0)
    with pytest.raises(PipelineError, match="ratios must be in"):
        analyze(graph, t.layers, pass_.apply_layer, (0.0, 0.5), feeds)


def test_table_renders_as_text_json_and_html():
    t = table({"conv0": [0.01, 0.2]}, {"conv0": 144})
    t.baseline_accuracy = 0.98
    t.points["conv0"] = [Point(p.ratio, p.cosine, float("inf"), 0.97) for p in t.points["conv0"]]
    d = json.loads(json.dumps(t.as_dict()))
    assert d["layers"][0]["points"][0] == {"ratio": 0.5, "cosine": 0.99, "sqnr_db": None, "accuracy": 0.97}
    text = format_sensitivity(d)
    assert "baseline accuracy 0.9800" in text and "cos@0.5" in text and "acc@1" in text and "conv0" in text
    html = sensitivity_html(d)
    assert html.startswith("<svg") and "<polyline" in html and "accuracy @ 0.5" in html


def test_optimize_with_sensitivity_allocation_reports_the_table(tmp_path):
    result = optimize(io.load(DIGITS), "prune-magnitude(sparsity=0.5,allocation='sensitivity',ratios=(0.5,0.9))",
                      data=DIGITS_TEST, latency=False)
    stats = result.report["passes"][0]["stats"]
    assert stats["sensitivity"]["ratios"] == [0.5, 0.9] and len(stats["sensitivity"]["layers"]) == 5
    assert sum(stats["allocated"].values()) > 0
    write_html(dict(result.report, model="digits"), tmp_path / "report.html")
    html = (tmp_path / "report.html").read_text()
    assert "<h2>Sensitivity: prune-magnitude</h2>" in html and "<svg" in html and "compressed_bytes" in html


def graphopt(*args):
    return subprocess.run([sys.executable, "-m", "graphopt.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_cli_prints_the_table_with_accuracy():
    r = graphopt("sensitivity", DIGITS, "--data", DIGITS_TEST, "--ratios", "0.5,0.75")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "baseline accuracy 0.9889"
    assert "cos@0.5" in lines[1] and "acc@0.75" in lines[1]
    assert [line.split()[0] for line in lines[2:]] == ["conv0", "conv3", "conv7", "gemm12", "gemm14"]


def test_cli_json_and_errors():
    r = graphopt("sensitivity", DIGITS, "--ratios", "0.5", "--json", "--pass", "prune-magnitude(prune_bias=true)")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["baseline_accuracy"] is None and d["layers"][0]["size"] == 144 + 16  # weight and bias
    r = graphopt("sensitivity", DIGITS, "--pass", "prune-n-m")
    assert r.returncode == 2 and "works per layer (prune-magnitude" in r.stderr
    r = graphopt("sensitivity", DIGITS, "--ratios", "0.5,1.5")
    assert r.returncode == 2 and "ratios must be in (0, 1]" in r.stderr
