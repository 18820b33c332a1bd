"""The quality gate (issue 14): data split into calibration and held-aside halves, top-1 accuracy
before and after, --max-drop / --min-cosine stop a pipeline with exit 4 and write nothing, a LOSSY
pass is held to its own bound unless the user set a gate, and quantize without data warns."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from graphopt import optimize
from graphopt.cli import main
from graphopt.ir.data import InputSpec, hold_aside
from graphopt.ir.errors import GateError, PipelineError
from graphopt.passes.gate import Gate

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
TEST_DATA = ROOT / "models" / "digits_test.npz"
# Half of digits' channels, chosen by weights alone: far below the pass's own bound and any 1-point gate.
RUINOUS = "canonicalize,prune-channels(ratio=0.5,method=l1)"


def test_held_aside_half_is_disjoint_from_calibration_and_keeps_its_labels():
    x = np.arange(20, dtype=np.float32).reshape(20, 1)
    y = np.arange(20) * 10
    split = hold_aside({"x": x}, [InputSpec("x", np.dtype(np.float32), ("N", 1))], y, seed=3)
    held, calib = split.held["x"].ravel(), split.calibration["x"].ravel()
    assert len(held) == len(calib) == 10 and not set(held) & set(calib)
    assert (split.labels == held * 10).all() and not split.shared


def test_too_few_samples_are_shared_and_said_so():
    x = np.ones((3, 1), np.float32)
    split = hold_aside({"x": x}, [InputSpec("x", np.dtype(np.float32), ("N", 1))], None)
    assert split.shared and split.held is split.calibration


def test_accuracy_before_and_after_is_reported_on_held_aside_samples():
    result = optimize(str(DIGITS), "canonicalize", data=str(TEST_DATA), latency=False)
    acc, data = result.report["accuracy"], result.report["data"]
    assert acc["metric"] == "top-1 accuracy" and acc["before"] == acc["after"] > 95
    assert data["held_aside_samples"] == acc["samples"] == 270 and data["calibration_samples"] == 270


def test_max_drop_stops_the_pass_that_crosses_it():
    with pytest.raises(GateError, match=r"pass 'prune-channels' drops top-1 accuracy from .* more than --max-drop 1%"):
        optimize(str(DIGITS), RUINOUS, data=str(TEST_DATA), latency=False, max_drop=1.0)
    # a gate the pass stays within lets it through
    optimize(str(DIGITS), "canonicalize,quantize", data=str(TEST_DATA), latency=False, max_drop=1.0)


def test_a_lossy_pass_below_its_own_bound_is_stopped_unless_the_user_lowers_it():
    with pytest.raises(GateError, match="below the pass's declared bound 0.75"):
        optimize(str(DIGITS), RUINOUS, data=str(TEST_DATA), latency=False)
    result = optimize(str(DIGITS), RUINOUS, data=str(TEST_DATA), latency=False, min_cosine=0.0)
    assert result.report["gate"] == {"min_cosine": 0.0}
    with pytest.raises(GateError, match="below --min-cosine 0.99"):
        optimize(str(DIGITS), RUINOUS, data=str(TEST_DATA), latency=False, min_cosine=0.99)


def test_max_drop_without_labels_measures_agreement_and_needs_a_classifier():
    x = np.load(TEST_DATA)["x"]
    with pytest.raises(GateError, match="top-1 agreement with the original"):
        optimize(str(DIGITS), RUINOUS, data={"x": x}, latency=False, max_drop=1.0)
    with pytest.raises(PipelineError, match="--min-cosine"):
        Gate({"y": np.ones((4, 3, 5), np.float32)}, max_drop=1.0)


def test_cli_gate_exits_4_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["optimize", str(DIGITS), "--passes", RUINOUS, "--data", str(TEST_DATA), "--max-drop", "1%",
               "-o", str(out), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 4 and not out.exists()
    assert len(err) == 1 and "prune-channels" in err[0] and "points" in err[0]


def test_cli_prints_accuracy_and_warns_of_random_calibration(tmp_path, capsys):
    assert main(["optimize", str(DIGITS), "--passes", "canonicalize", "--data", str(TEST_DATA), "-o",
                 str(tmp_path / "a")]) == 0
    assert "top-1 accuracy:" in capsys.readouterr().out
    assert main(["optimize", str(DIGITS), "--passes", "canonicalize,quantize", "-o", str(tmp_path / "q")]) == 0
    out = capsys.readouterr().out
    assert "warning: quantize:" in out and "random inputs" in out
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    assert report["data"]["source"] == "random"
