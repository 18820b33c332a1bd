"""report.json is strict JSON; report.html is one self-contained page with SVG plots, headline
ratios, regressions marked and every model-supplied name escaped; and it renders in a headless
browser without a console error."""
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import graphopt
from graphopt.report import strict_json, write_json
from graphopt.report_html import headline, pareto_front, write_html

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
HOSTILE = "<script>alert('x')</script>&\"conv\""


def strict_load(path: Path):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(path.read_text(), parse_constant=refuse)


def a_report(**extra) -> dict:
    """A report as graphopt.optimize writes it, with a hostile layer name and op type, an EXACT
    pass (SQNR inf), a slower model and an accuracy drop of 0.2 points."""
    exact = {"logits": {"max_abs": 0.0, "cosine": 1.0, "sqnr_db": math.inf}}
    lossy = {"logits": {"max_abs": 0.1, "cosine": 0.9995, "sqnr_db": np.float32(31.5)}}
    ops_before = {"Conv": 3, "BatchNormalization": 3, "Gemm": 2, HOSTILE: 1}
    ops_after = {"Conv": 3, "Gemm": 2, "QuantizeLinear": 5, HOSTILE: 1}
    return {
        "model": f"models/{HOSTILE}.onnx", "pipeline": "canonicalize,prune-magnitude,quantize",
        "before": {"params": 1000, "size_bytes": 370_000, "compressed_bytes": 300_000, "sparsity": 0.0,
                   "macs": 5000, "nodes": 9, "ops": ops_before},
        "after": {"params": 1000, "size_bytes": 100_000, "compressed_bytes": 310_000, "sparsity": 0.5,
                  "macs": 5000, "nodes": 11, "ops": ops_after},
        "passes": [
            {"name": "canonicalize", "modified": True, "seconds": 0.1, "stats": {"rounds": 2},
             "refused": [], "skipped": [], "decisions": {}, "fidelity": exact, "top1": 100.0},
            {"name": "prune-magnitude", "modified": True, "seconds": 2.5, "stats": {"scope": "layer"},
             "refused": [{"node": HOSTILE, "reason": f"weight '{HOSTILE}' is shared"}], "skipped": [],
             "decisions": {"conv0": {"op": "Conv", "sparsity": 0.5}, HOSTILE: {"op": "Gemm", "sparsity": 0.25}},
             "fidelity": lossy, "top1": 99.0},
            {"name": "quantize", "modified": True, "seconds": 1.5, "stats": {"mode": "static", "nan": math.nan},
             "refused": [], "skipped": [], "fidelity": lossy, "top1": 99.0,
             "decisions": {"conv0": {"weight_sqnr_db": 47.8, "output_sqnr_db": math.inf}}},
        ],
        "fidelity": {"inputs": "data", "outputs": lossy},
        "accuracy": {"metric": "top-1 accuracy", "before": 98.0, "after": 97.8, "samples": 128},
        "latency_ms": {"onnxruntime": {"before": 1.0, "after": 2.1, "spread_pct": {"before": 3.0, "after": 12.0}}},
        **extra,
    }


def test_report_json_is_strict_json_with_non_finite_values_as_null(tmp_path):
    write_json(a_report(), tmp_path / "report.json")
    report = strict_load(tmp_path / "report.json")
    assert report["passes"][0]["fidelity"]["logits"]["sqnr_db"] is None  # inf
    assert report["passes"][2]["stats"]["nan"] is None
    assert report["passes"][2]["decisions"]["conv0"]["output_sqnr_db"] is None
    assert report["fidelity"]["outputs"]["logits"]["sqnr_db"] == pytest.approx(31.5)


def test_strict_json_converts_numpy_and_keeps_finite_values():
    value = strict_json({"a": np.float32(-np.inf), "b": np.int64(3), "c": np.array([1.0, np.nan]), 4: (1, 2),
                         "d": np.bool_(True), "e": 0.5})
    assert value == {"a": None, "b": 3, "c": [1.0, None], "4": [1, 2], "d": True, "e": 0.5}
    assert json.dumps(value, allow_nan=False)


def test_an_exact_pipeline_writes_strict_json(tmp_path):
    """A real report whose SQNR is inf (eliminate-noops is EXACT: identical outputs)."""
    result = graphopt.optimize(graphopt.load(DIGITS), "eliminate-noops", latency=False)
    assert math.isinf(result.report["fidelity"]["outputs"]["logits"]["sqnr_db"])
    write_json(result.report, tmp_path / "report.json")
    assert strict_load(tmp_path / "report.json")["fidelity"]["outputs"]["logits"]["sqnr_db"] is None
    write_html(dict(result.report, model="digits"), tmp_path / "report.html")
    assert "<svg" in (tmp_path / "report.html").read_text()


def test_headline_ratios_and_regressions():
    assert headline(a_report()) == [("3.7x smaller", False), ("2.1x slower", True), ("accuracy −0.2 pt", True)]
    faster = a_report(latency_ms={"onnxruntime": {"before": 2.1, "after": 1.0}})
    faster["accuracy"]["after"] = 98.0
    assert headline(faster)[1:] == [("2.1x faster", False), ("accuracy unchanged", False)]


def test_html_has_plots_headline_regressions_and_escapes_names(tmp_path):
    write_html(a_report(), tmp_path / "report.html")
    html = (tmp_path / "report.html").read_text()
    assert html.count("<svg") >= 3  # seconds per pass, SQNR per pass, sparsity per layer, SQNR per layer
    assert '<span class="bad">2.1x slower</span>' in html and '<span class="bad">accuracy −0.2 pt</span>' in html
    assert '<span class="good">3.7x smaller</span>' in html
    assert '<span class="bad">310,000</span>' in html  # compressed_bytes grew
    assert '<span class="bad">2.1000 ms ±12%</span>' in html
    assert "sparsity per layer" in html and "SQNR per quantized layer" in html
    assert "<tr class=changed><td>BatchNormalization</td><td>3</td><td>0</td>" in html
    assert "<script" not in html and "alert('x')" not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;&quot;conv&quot;" in html
    assert "<h2>Search</h2>" not in html


def test_search_section_draws_the_pareto_front(tmp_path):
    candidates = [{"spec": "quantize", "size_bytes": 50, "accuracy": 97.0},
                  {"spec": "prune", "size_bytes": 80, "accuracy": 98.5},
                  {"spec": HOSTILE, "size_bytes": 90, "accuracy": 98.0},  # dominated by prune
                  {"spec": "none", "size_bytes": 200, "accuracy": 99.0}]
    assert [p["spec"] for p in pareto_front(candidates, "size_bytes", "accuracy")] == ["quantize", "prune", "none"]
    write_html(a_report(search={"candidates": candidates}), tmp_path / "report.html")
    html = (tmp_path / "report.html").read_text()
    search = html[html.index("<h2>Search</h2>"):]
    assert "4 candidates" in search and len(re.findall(r'<circle[^>]*r="5"', search)) == 3
    assert "<script" not in html


def browser() -> str | None:
    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(browser() is None, reason="no chromium, chromium-browser or google-chrome on PATH "
                                               "(Debian: apt-get install chromium; .ci/run installs it)")
def test_report_renders_in_a_headless_browser_without_console_errors(tmp_path):
    write_html(a_report(search={"candidates": [{"spec": "a", "size_bytes": 1, "accuracy": 1.0},
                                               {"spec": "b", "size_bytes": 2, "accuracy": 2.0}]}),
               tmp_path / "report.html")
    shot = tmp_path / "report.png"
    r = subprocess.run([browser(), "--headless", "--disable-gpu", "--no-sandbox", f"--screenshot={shot}",
                        "--window-size=1200,1600", "--enable-logging=stderr", "--v=0",
                        (tmp_path / "report.html").as_uri()], capture_output=True, text=True, timeout=120)
    print(f"screenshot: {shot}")
    artifacts = os.environ.get("GRAPHOPT_ARTIFACTS")
    if artifacts and shot.exists():
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(artifacts) / "report.png")
        print(f"screenshot copied to {Path(artifacts) / 'report.png'}")
    assert shot.exists() and shot.stat().st_size > 10_000, r.stderr[-2000:]
    # Only the page's own console lines count; chromium's D-Bus and GPU chatter without a desktop does not.
    page = [line for line in r.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not page, "\n".join(page)


@pytest.mark.parametrize("quantize", ["quantize", "quantize,lower-int8"])
def test_sparsity_counts_quantized_weights_at_their_zero_point(quantize):
    # Pruned weights quantize to the zero point: the report's sparsity must not fall to 0 after
    # quantize (DequantizeLinear's int8 weights) or lower-int8 (QLinearConv / QLinearMatMul).
    pruned = graphopt.optimize(str(DIGITS), "canonicalize,prune-magnitude(sparsity=0.5)", latency=False)
    both = graphopt.optimize(str(DIGITS), f"canonicalize,prune-magnitude(sparsity=0.5),{quantize}", latency=False)
    assert pruned.report["after"]["sparsity"] > 0.45
    assert abs(both.report["after"]["sparsity"] - pruned.report["after"]["sparsity"]) < 0.02


def test_per_layer_latency_from_onnxruntime_profiler_is_plotted(tmp_path):
    result = graphopt.optimize(str(DIGITS), "canonicalize")
    layers = result.report["latency_ms"]["onnxruntime"]["layers"]
    assert layers["before"] and layers["after"]
    assert all(ms >= 0 for side in layers.values() for ms in side.values())
    # What the profiler saw covers the run: its node times add up to no more than a timed run plus slack.
    assert sum(layers["after"].values()) < 20 * result.report["latency_ms"]["onnxruntime"]["after"]
    write_html(result.report, tmp_path / "report.html")
    assert "slowest nodes" in (tmp_path / "report.html").read_text()
