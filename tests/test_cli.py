import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from graphopt.testing.tiny import with_dims

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
TEST_DATA = ROOT / "models" / "digits_test.npz"
CALIB = ROOT / "models" / "digits_calib.npz"


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
    assert r.returncode == 2 and r.stderr == (f"graphopt: error: {model}: -o {tmp_path} would overwrite the input "
                                              f"with model.opt.onnx; choose another folder\n")
    assert model.read_bytes() == DIGITS.read_bytes()


def test_help_has_the_exit_code_table_and_loads_nothing_heavy():
    code = ("import sys\nfrom graphopt.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n"
            "    assert e.code == 0\nheavy = ('numpy', 'onnx', 'onnxruntime', 'onnx_graphsurgeon', 'numba', 'tvm')\n"
            "print('loaded:', *sorted(m for m in heavy if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "loaded:", r.stdout + r.stderr
    for row in ("0    success", "1    the work failed", "2    bad input or usage", "3    internal error",
                "4    the quality gate", "130  interrupted by Ctrl-C (SIGINT); 143 by SIGTERM", "141  stdout"):
        assert f"\n  {row}" in r.stdout, row


def test_every_argument_of_the_jobs_has_help():
    import argparse

    from graphopt.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name in ("optimize", "compile", "tune"):
        for action in commands[name]._actions:
            assert action.help, (name, action.dest)
        text = commands[name].format_help()
        assert "--time-budget T" in text and "--tune-seconds" not in text and "exit codes:" in text


def test_tune_seconds_is_a_deprecated_alias_of_time_budget(capsys):
    from graphopt.cli import build_parser

    args = build_parser().parse_args(["compile", "m.onnx", "--target", "x86", "-o", "o", "--tune-seconds", "2m"])
    assert args.time_budget == 120
    assert capsys.readouterr().err == "graphopt: warning: --tune-seconds is deprecated; use --time-budget\n"
    assert build_parser().parse_args(["tune", "m", "--target", "x86", "--db", "d", "--time-budget", "90"]).time_budget == 90


@pytest.mark.parametrize("seed, expected", [("0", 0), ("-1", 2**32 - 1), (str(2**32 + 5), 5), ("7", 7)])
def test_any_integer_seed_is_taken_modulo_2_32(seed, expected):
    from graphopt.cli import build_parser

    for command in (["optimize", "m", "-o", "o"], ["compile", "m", "--target", "x86", "-o", "o"],
                    ["verify", "a", "b"], ["sensitivity", "m"], ["quant-debug", "m"]):
        assert build_parser().parse_args([*command, "--seed", seed]).seed == expected


def test_a_negative_seed_runs(tmp_path, capsys):
    code, _, err = run_cli(capsys, "optimize", DIGITS, "--seed", "-1", "-o", tmp_path / "out", "-q")
    assert code == 0 and err == ""


def test_a_closed_stdout_ends_quietly():
    """`graphopt inspect MODEL --json | head -1`: exit 141 as a shell reports SIGPIPE, nothing on stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "graphopt.cli", "inspect", str(DIGITS), "--json"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader has gone before the first write
    assert proc.wait(timeout=120) == 141
    assert proc.stderr.read() == b""


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


def symbolic_digits(tmp_path, dims=("N", 1, "H", "W"), name="digits_sym.onnx"):
    """The digits CNN with its input dims replaced (str: symbolic), as a dynamic-shape exporter writes it."""
    model = with_dims(onnx.load(DIGITS), dims)
    if not isinstance(dims[0], str):
        model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = dims[0]
    onnx.save(model, tmp_path / name)
    return tmp_path / name


def run_cli(capsys, *args):
    from graphopt import cli

    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_symbolic_dims_count_the_static_models_macs_given_data_or_input_shape(tmp_path, capsys):
    static = symbolic_digits(tmp_path, (1, 1, 8, 8), "static.onnx")
    dynamic = symbolic_digits(tmp_path)
    macs = {}
    for key, model, extra in (("static", static, ()), ("data", dynamic, ("--data", CALIB)),
                              ("shape", dynamic, ("--input-shape", "x=1,1,8,8"))):
        code, out, err = run_cli(capsys, "optimize", model, "-o", tmp_path / key, "-q", *extra)
        assert code == 0, err
        macs[key] = json.loads((tmp_path / key / "report.json").read_text())["before"]["macs"]
    assert macs == {"static": 484_992, "data": 484_992, "shape": 484_992}
    code, out, err = run_cli(capsys, "inspect", dynamic, "--input-shape", "x=1,1,8,8")
    assert code == 0 and "MACs        484,992  at x=1,1,8,8" in out
    assert re.search(r"^conv3\s+Conv\s+[\d,]+\s+294,912 ", out, re.M)  # 16 -> 32 channels, 8x8, 3x3
    code, out, err = run_cli(capsys, "inspect", dynamic)
    assert "symbolic dims H, W counted as 1: give --input-shape" in out


@pytest.mark.parametrize("spec, message", [
    ("x=1,1,a,8", "graphopt: error: --input-shape 'x=1,1,a,8': dims must be integers separated by commas"),
    ("image=1,1,8,8", "graphopt: error: {model}: --input-shape image: the model has no input 'image' (inputs: x)"),
    ("x=1,8,8", "graphopt: error: {model}: --input-shape x=1,8,8: input 'x' has rank 4 [N, 1, H, W], not 3"),
    ("x=1,3,8,8", "graphopt: error: {model}: --input-shape x=1,3,8,8: input 'x' has dim 1 fixed at 1 [N, 1, H, W]"),
])
def test_a_bad_input_shape_exits_2_with_one_line(tmp_path, capsys, spec, message):
    model = symbolic_digits(tmp_path)
    for command in (("optimize", model, "-o", tmp_path / "out"), ("inspect", model),
                    ("compile", model, "--target", "x86", "-o", tmp_path / "out")):
        code, _, err = run_cli(capsys, *command, "--input-shape", spec)
        assert code == 2 and err.strip() == message.format(model=model), err
    assert not (tmp_path / "out").exists()


def test_a_bad_input_shape_from_the_shell(tmp_path):
    r = graphopt("optimize", DIGITS, "-o", tmp_path / "out", "--input-shape", "x=1,1,0,8")
    assert r.returncode == 2 and r.stderr == "graphopt: error: --input-shape 'x=1,1,0,8': every dim must be positive\n"


def test_static_writes_the_concrete_dims_and_lets_winograd_see_them(tmp_path, capsys):
    dynamic = symbolic_digits(tmp_path)
    code, out, err = run_cli(capsys, "optimize", dynamic, "-o", tmp_path / "dyn", "--data", CALIB,
                             "--passes", "canonicalize,winograd")
    assert code == 0, err
    assert re.search(r"^winograd: changed nothing: 0 of 3 layers; refused 3 x input '.*' has dynamic channels "
                     r"or spatial dims", out, re.M), out
    kept = onnx.load(tmp_path / "dyn" / "model.opt.onnx").graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in kept] == ["N", 1, "H", "W"]
    code, out, err = run_cli(capsys, "optimize", dynamic, "-o", tmp_path / "static", "--data", CALIB,
                             "--passes", "canonicalize,winograd", "--static", "--input-shape", "x=1,1,8,8")
    assert code == 0, err
    assert "winograd:" not in out  # every conv rewritten: nothing to report
    model = onnx.load(tmp_path / "static" / "model.opt.onnx")
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [1, 1, 8, 8]
    assert [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == [1, 10]
    report = json.loads((tmp_path / "static" / "report.json").read_text())
    assert report["passes"][1]["stats"]["rewritten"] == 3 and report["static"] is True
    data = np.load(CALIB)["x"][:1]
    ref = ort.InferenceSession(str(DIGITS), providers=["CPUExecutionProvider"]).run(None, {"x": data})[0]
    got = ort.InferenceSession(str(tmp_path / "static" / "model.opt.onnx"),
                               providers=["CPUExecutionProvider"]).run(None, {"x": data})[0]
    assert np.allclose(got, ref, atol=1e-3)


def test_a_pipeline_that_changes_nothing_says_so(tmp_path, capsys):
    code, out, err = run_cli(capsys, "optimize", DIGITS, "-o", tmp_path, "--passes", "eliminate-dead,fuse-matmul-add")
    assert code == 0, err
    lines = out.splitlines()
    assert "eliminate-dead: changed nothing: nothing it rewrites is in the model" in lines
    assert "fuse-matmul-add: changed nothing: nothing it rewrites is in the model" in lines
    assert "no pass changed the model" in lines


def test_pass_outcome_groups_reasons_by_their_text_without_names():
    from graphopt.report import pass_outcome

    refused = [{"node": f"conv{i}", "reason": "stride [2, 2] is not 1"} for i in range(9)]
    refused += [{"node": f"dw{i}", "reason": f"'dw{i}.weight' is shared"} for i in range(3)]
    record = {"name": "winograd", "modified": False, "refused": refused, "skipped": [], "decisions": {}}
    assert pass_outcome(record) == ("winograd: changed nothing: 0 of 12 layers; refused 9 x stride [2, 2] is not 1, "
                                    "3 x 'dw0.weight' is shared")
    skipped = {"name": "quantize", "modified": False, "refused": [], "decisions": {},
               "skipped": [{"node": "", "reason": "opset 11 outside the pass's range 13..28"}]}
    assert pass_outcome(skipped) == "quantize: skipped: opset 11 outside the pass's range 13..28"
    partly = {"name": "quantize", "modified": True, "refused": [], "decisions": {"a": {}, "b": {}, "c": {}},
              "skipped": [{"node": "c", "reason": "not in include"}]}
    assert pass_outcome(partly) == "quantize: 2 of 3 layers; skipped 1 x not in include"
    assert pass_outcome({"name": "fold-batchnorm", "modified": True, "refused": [], "skipped": []}) is None


def test_static_needs_dims_to_write(tmp_path, capsys):
    model = symbolic_digits(tmp_path)
    code, _, err = run_cli(capsys, "optimize", model, "-o", tmp_path / "out", "--static")
    assert code == 2 and err.strip() == (f"graphopt: error: {model}: --static needs the dims of input 'x': "
                                         f"give --input-shape NAME=D0,D1,... or --data")


def test_a_scalar_input_and_a_batch_from_data(tmp_path, capsys):
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Mul", ["h", "s"], ["y"])],
                              "scalar", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
                                         helper.make_tensor_value_info("s", TensorProto.FLOAT, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "scalar.onnx")
    np.savez(tmp_path / "d.npz", x=np.ones((32, 4), np.float32), s=np.float32(2))
    code, out, err = run_cli(capsys, "optimize", tmp_path / "scalar.onnx", "--data", tmp_path / "d.npz", "-o",
                             tmp_path / "out", "--passes", "prune-magnitude")
    assert code == 0, err
    before = json.loads((tmp_path / "out" / "report.json").read_text())["before"]
    assert before["macs"] == 4 * 3 and before["input_shapes"] == {"x": [1, 4], "s": []}
    np.savez(tmp_path / "bad.npz", x=np.ones((32, 5), np.float32), s=np.float32(2))
    code, _, err = run_cli(capsys, "optimize", tmp_path / "scalar.onnx", "--data", tmp_path / "bad.npz", "-o",
                             tmp_path / "out2")
    assert code == 2 and err.strip() == f"graphopt: error: {tmp_path / 'bad.npz'}: input 'x': dim 1 is 5, the model wants 4"


def test_opset_upgrades_the_model_before_the_passes(tmp_path, capsys):
    code, _, err = run_cli(capsys, "optimize", DIGITS, "-o", tmp_path / "out", "--opset", "18", "-q",
                             "--passes", "fold-batchnorm")
    assert code == 0, err
    model = onnx.load(tmp_path / "out" / "model.opt.onnx")
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [18]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["opset"] == 18
