"""Deep Compression's staged table (issue 19): `graphopt optimize` with a codebook pass reports the
model's bytes and top-1 at each stage (original, pruned, clustered, packed as .gopt) in
report.json, the console and report.html; the packed stage is what `graphopt pack` writes."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from graphopt.cli import main
from graphopt.optimize import optimize

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
# Labelled: the held-aside half gives top-1 per pass (digits_calib.npz has no labels).
TEST = ROOT / "models" / "digits_test.npz"
SPEC = "canonicalize,prune-magnitude(sparsity=0.5),cluster-weights(bits=4)"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("deep") / "out"
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        assert main(["optimize", str(DIGITS), "--passes", SPEC, "--data", str(TEST), "-o", str(out)]) == 0
    return out, json.loads((out / "report.json").read_text()), console.getvalue()


def test_every_stage_is_reported_in_order_and_each_is_no_larger(run):
    _, report, _ = run
    stages = report["deep_compression"]["stages"]
    assert [s["stage"] for s in stages] == ["original", "pruned", "clustered", "packed"]
    assert stages[1]["after"] == "prune-magnitude" and stages[2]["after"] == "cluster-weights"
    sizes = [s["bytes"] for s in stages]
    assert sizes[0] == report["before"]["size_bytes"]
    assert sizes[2] == report["after"]["size_bytes"]  # nothing after cluster-weights changed the model
    # Pruning leaves dense float weights (zeros are stored too): no larger, folding BN makes it smaller.
    assert sizes[1] <= sizes[0]
    assert sizes[2] < sizes[1] / 4 and sizes[3] < sizes[2]
    for s in stages:
        assert s["ratio"] == round(sizes[0] / s["bytes"], 2)
    assert stages[3]["ratio"] > 10  # measured 11.2x on digits at these settings


def test_the_packed_stage_is_what_graphopt_pack_writes(run, tmp_path):
    out, report, _ = run
    gopt = tmp_path / "model.gopt"
    assert main(["pack", str(out / "model.opt.onnx"), "-o", str(gopt)]) == 0
    assert report["deep_compression"]["stages"][-1]["bytes"] == gopt.stat().st_size
    assert report["after"]["file_bytes"] == report["deep_compression"]["stages"][2]["bytes"]


def test_top1_is_reported_at_every_stage(run):
    _, report, _ = run
    stages = {s["stage"]: s for s in report["deep_compression"]["stages"]}
    records = {r["name"]: r for r in report["passes"]}
    assert stages["original"]["top1"] == report["accuracy"]["before"]
    assert stages["pruned"]["top1"] == records["prune-magnitude"]["top1"]
    assert stages["clustered"]["top1"] == records["cluster-weights"]["top1"]
    assert stages["packed"]["top1"] == report["accuracy"]["after"]  # packing is lossless
    assert report["accuracy"]["before"] - stages["packed"]["top1"] <= 2.0


def test_the_console_and_report_html_show_the_table(run):
    out, report, console = run
    packed = report["deep_compression"]["stages"][-1]
    lines = console.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("Deep Compression"))
    table = lines[head:head + 5]
    assert [line.split()[0] for line in table[1:]] == ["original", "pruned", "clustered", "packed"]
    assert f"{packed['bytes']:,}" in table[4] and f"{packed['ratio']:.1f}x" in table[4]
    assert f"{packed['top1']:.2f}%" in table[4]
    html = (out / "report.html").read_text()
    assert "Deep Compression, stage by stage" in html
    assert f"<td>{packed['bytes']:,}</td>" in html


def test_no_table_without_a_codebook_pass():
    result = optimize(DIGITS, "canonicalize,prune-magnitude(sparsity=0.5)", data=TEST, latency=False)
    assert "deep_compression" not in result.report


def test_a_low_rank_factor_counts_as_the_pruned_stage():
    """factorize-svd cuts parameters before weight sharing as pruning does: the pruned stage names
    both passes and has the size after the last of them (digits: 20% of the Gemm parameters kept)."""
    from graphopt.optimize import optimize

    spec = "canonicalize,factorize-svd(ratio=0.2),prune-magnitude(sparsity=0.5,include=Conv),cluster-weights(bits=4)"
    report = optimize(DIGITS, spec, data=TEST, latency=False, min_cosine=-1.0).report
    stages = {s["stage"]: s for s in report["deep_compression"]["stages"]}
    assert stages["pruned"]["after"] == "factorize-svd, prune-magnitude"
    assert stages["pruned"]["bytes"] < 0.6 * stages["original"]["bytes"]  # the Gemms hold most of the weights
    assert stages["packed"]["ratio"] > 15
