"""Bad model files through the command line: one `graphopt: error:` line naming the file, a
non-zero exit, no traceback and nothing written; the input model is never overwritten."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


def _truncated(model, path):
    data = model.SerializeToString()
    path.write_bytes(data[:len(data) // 2])


def _outside(model, path):
    (path.parent.parent / "secret.bin").write_bytes(b"\0" * 48)
    w = model.graph.initializer[0]
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    w.external_data.add(key="location", value="../secret.bin")
    path.write_bytes(model.SerializeToString())


def _cycle(model, path):
    model.graph.node[1].input[1] = "y"
    path.write_bytes(model.SerializeToString())


def _unknown_domain(model, path):
    model.opset_import.append(helper.make_opsetid("com.example.nobody", 1))
    model.graph.node[2].domain = "com.example.nobody"
    path.write_bytes(model.SerializeToString())


def _short_raw_data(model, path):
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:-4]
    path.write_bytes(model.SerializeToString())


def _short_constant(model, path):
    value = numpy_helper.from_array(np.ones(4, dtype=np.float32))
    value.raw_data = value.raw_data[:8]
    del model.graph.initializer[1]
    model.graph.node.insert(0, helper.make_node("Constant", [], ["B"], name="const_b", value=value))
    path.write_bytes(model.SerializeToString())


# name -> (how to write the bad file, what the error line must say besides the file name)
BAD = {
    "random": (lambda m, p: p.write_bytes(np.random.default_rng(0).bytes(2048)), "not an ONNX model"),
    "text": (lambda m, p: p.write_text("just some text\n"), "not an ONNX model"),
    "empty": (lambda m, p: p.write_bytes(b""), "empty"),
    "missing": (lambda m, p: None, "no such file"),
    "truncated": (_truncated, "truncated"),
    "outside": (_outside, "outside the model's folder"),
    "cycle": (_cycle, "cycle"),
    "unknown_domain": (_unknown_domain, "node 'relu': op Relu is in unknown opset domain 'com.example.nobody'"),
    "short_raw_data": (_short_raw_data, "initializer 'W'"),
    "short_constant": (_short_constant, "node 'const_b'"),
}


def run_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GRAPHOPT_DEBUG"}
    return subprocess.run([sys.executable, "-m", "graphopt.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def assert_one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphopt: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


@pytest.mark.parametrize("command", ["optimize", "inspect"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_model(model, tmp_path, case, command):
    folder = tmp_path / "models"
    folder.mkdir()
    path = folder / f"{case}.onnx"
    write, fragment = BAD[case]
    write(model, path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    args = ["optimize", str(path), "-o", str(tmp_path / "out")] if command == "optimize" else ["inspect", str(path)]
    result = run_cli(*args, cwd=tmp_path)
    assert_one_error_line(result, f"{case}.onnx", fragment)
    assert result.stdout == ""
    assert not (tmp_path / "out").exists()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("spelling", ["{d}/model.opt.onnx", "{d}/../{d}/./model.opt.onnx"])
def test_output_would_overwrite_input(model, tmp_path, spelling):
    folder = tmp_path / "out"
    folder.mkdir()
    source = folder / "model.opt.onnx"
    onnx.save(model, source)
    data, mtime = source.read_bytes(), source.stat().st_mtime_ns
    result = run_cli("optimize", spelling.format(d="out"), "-o", "out", cwd=tmp_path)
    assert_one_error_line(result, "overwrite")
    assert source.read_bytes() == data and source.stat().st_mtime_ns == mtime
    assert os.listdir(folder) == ["model.opt.onnx"]


def test_output_symlink_to_input_is_refused(model, tmp_path):
    onnx.save(model, tmp_path / "m.onnx")
    (tmp_path / "out").mkdir()
    os.symlink(tmp_path / "m.onnx", tmp_path / "out" / "model.opt.onnx")
    data = (tmp_path / "m.onnx").read_bytes()
    result = run_cli("optimize", "m.onnx", "-o", "out", cwd=tmp_path)
    assert_one_error_line(result, "overwrite")
    assert (tmp_path / "m.onnx").read_bytes() == data


def test_valid_external_data_model_optimizes(model, tmp_path):
    weights = np.arange(1024, dtype=np.float32).reshape(256, 4)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(weights, "W"))
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 256]))
    onnx.save_model(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.data",
                    size_threshold=0)
    result = run_cli("optimize", "m.onnx", "-o", "out", "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["model.opt.onnx", "report.html", "report.json"]
    out = onnx.load(str(tmp_path / "out" / "model.opt.onnx"))
    by_name = {t.name: t for t in out.graph.initializer}
    np.testing.assert_array_equal(numpy_helper.to_array(by_name["W"]), weights)


def test_opset_11_model_is_upgraded_for_quantize_and_keeps_its_metadata(tmp_path):
    # Paddle writes opset 11 and keeps its recognizer's character dictionary in metadata_props.
    from test_opset import exporter_model  # pytest puts this folder on sys.path

    onnx.save(exporter_model(11), tmp_path / "m.onnx")
    result = run_cli("optimize", "m.onnx", "--passes", "canonicalize,quantize", "-o", "out", "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    quantize = next(p for p in report["passes"] if p["name"] == "quantize")
    assert quantize["modified"] and quantize["stats"]["opset"] == "11 -> 13"
    out = onnx.load(str(tmp_path / "out" / "model.opt.onnx"))
    assert [(o.domain, o.version) for o in out.opset_import] == [("", 13)]
    assert [(p.key, p.value) for p in out.metadata_props] == [("character", "0123456789abc")]
    assert out.producer_name == "paddle2onnx"
