import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
TEST_DATA = ROOT / "models" / "digits_test.npz"


def graphopt(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "graphopt.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def accuracy(path):
    data = np.load(TEST_DATA)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return (sess.run(None, {"x": data["x"]})[0].argmax(1) == data["y"]).mean()


def test_optimize_then_verify_digits(tmp_path):
    out = tmp_path / "out"
    r = graphopt("optimize", DIGITS, "-o", out)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["canonicalize"]
    for key in ("params", "size_bytes", "macs", "ops"):
        assert key in report["before"] and key in report["after"]
    assert report["before"]["ops"]["BatchNormalization"] == 3 and "BatchNormalization" not in report["after"]["ops"]
    assert report["after"]["macs"] == report["before"]["macs"] > 0
    assert report["fidelity"]["outputs"]["logits"]["cosine"] > 0.999999
    assert "[1/1] canonicalize" in r.stderr
    html = (out / "report.html").read_text()
    assert "<h2>Passes</h2>" in html and "canonicalize" in html and "fold-batchnorm" in html

    v = graphopt("verify", DIGITS, out / "model.opt.onnx", "--data", TEST_DATA, "--min-cosine", 0.999999)
    assert v.returncode == 0, v.stderr
    assert "cosine=1.000000" in v.stdout
    assert accuracy(out / "model.opt.onnx") == accuracy(DIGITS)
    assert "accuracy: original=0.9889 optimized=0.9889" in v.stdout


def test_optimize_with_spec_quiet_and_explain(tmp_path):
    r = graphopt("optimize", DIGITS, "-o", tmp_path, "--passes", "fold-bn,eliminate-noops", "--quiet",
                 "--data", ROOT / "models" / "digits_calib.npz")
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
    report = json.loads((tmp_path / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["fold-batchnorm", "eliminate-noops"]
    assert report["fidelity"]["inputs"] == "data"


def test_bad_pass_spec_exits_2_and_writes_nothing(tmp_path):
    r = graphopt("optimize", DIGITS, "-o", tmp_path / "out", "--passes", "fold-constnts")
    assert r.returncode == 2 and "did you mean fold-constants" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_refuses_to_overwrite_input(tmp_path):
    model = tmp_path / "model.opt.onnx"
    model.write_bytes(DIGITS.read_bytes())
    r = graphopt("optimize", model, "-o", tmp_path)
    assert r.returncode != 0 and "overwrite the input" in r.stderr
    assert model.read_bytes() == DIGITS.read_bytes()


def test_inspect_table_and_json():
    r = graphopt("inspect", DIGITS)
    assert r.returncode == 0 and "MACs" in r.stdout and "BatchNormalization x3" in r.stdout
    summary = json.loads(graphopt("inspect", DIGITS, "--json").stdout)
    assert summary["params"] == 47851
    assert summary["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["N", 1, 8, 8]}]
    conv_macs = [layer["macs"] for layer in summary["layers"] if layer["op"] == "Conv"]
    assert conv_macs == [1 * 16 * 8 * 8 * 9, 16 * 32 * 8 * 8 * 9, 32 * 32 * 4 * 4 * 9]
    assert summary["macs"] == sum(layer["macs"] for layer in summary["layers"])


def test_passes_lists_every_pass_with_semantics():
    r = graphopt("passes")
    for name in ("canonicalize", "fold-constants", "fold-batchnorm", "eliminate-noops", "fuse-matmul-add",
                 "eliminate-dead"):
        assert name in r.stdout
    assert "EXACT" in r.stdout and "max_growth_bytes=" in r.stdout


def test_passes_name_prints_one_pass_with_option_help():
    r = graphopt("passes", "quantize")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("quantize    [LOSSY")
    assert "Matches:" in r.stdout and "prune-magnitude" not in r.stdout
    for name in ("calibration", "include", "exclude", "keep_float"):  # each option, its default, its help
        assert re.search(rf"^  {name}=\S+\s+\w", r.stdout, re.M), name
    unknown = graphopt("passes", "quantise")
    assert unknown.returncode == 2 and "did you mean quantize" in unknown.stderr


def test_a_pass_that_crashes_is_named(tmp_path, monkeypatch, capsys):
    from graphopt import cli
    from graphopt.passes.cleanup.eliminate_dead import EliminateDead

    monkeypatch.setattr(EliminateDead, "run", lambda self, graph, ctx: [][0])
    code = cli.main(["optimize", str(DIGITS), "-o", str(tmp_path / "out"), "--passes", "fold-bn,dce", "-q"])
    err = capsys.readouterr().err
    assert code == 3 and not (tmp_path / "out").exists()
    assert err.strip() == ("graphopt: error: pass 'eliminate-dead' failed (after fold-batchnorm): "
                           "IndexError: list index out of range")


def test_include_that_matches_nothing_is_an_error_on_every_layer_pass(tmp_path):
    for spec in ("prune-magnitude(include=nosuchlayer)", "prune-n-m(include=nosuchlayer)",
                 "prune-channels(ratio=0.3,include=nosuchlayer)", "factorize-svd(energy=0.9,include=nosuchlayer)",
                 "factorize-tucker(energy=0.9,exclude=nosuchlayer)", "quantize(include=nosuchlayer)",
                 "winograd(include=nosuchlayer)"):
        r = graphopt("optimize", DIGITS, "-o", tmp_path / "out", "--passes", f"canonicalize,{spec}",
                     "--data", ROOT / "models" / "digits_calib.npz")
        assert r.returncode == 2, (spec, r.stderr)
        assert "nosuchlayer matches no layer" in r.stderr and "Traceback" not in r.stderr, spec
        assert not (tmp_path / "out").exists()
