"""-o OUTDIR: checked before any work, never lands on the input, all outputs or none."""
import errno
import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from graphopt import cli
from graphopt.cli import jobs

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"


def run(capsys, *args):
    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def no_work(monkeypatch):
    """Fail the test if the job gets as far as the passes."""
    monkeypatch.setattr(jobs, "optimize", lambda *a, **k: pytest.fail("the job started before checking -o"))


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("name", ["report.json", "report.html", "model.opt.onnx"])
def test_an_output_never_replaces_the_input(tmp_path, capsys, monkeypatch, name):
    model = tmp_path / name
    model.write_bytes(DIGITS.read_bytes())
    no_work(monkeypatch)
    code, _, err = run(capsys, "optimize", model, "-o", tmp_path)
    assert code == 2 and err == (f"graphopt: error: {model}: -o {tmp_path} would overwrite the input with {name}; "
                                 f"choose another folder\n")
    assert model.read_bytes() == DIGITS.read_bytes() and os.listdir(tmp_path) == [name]


def test_through_a_symlink_or_a_hard_link(tmp_path, capsys, monkeypatch):
    model = tmp_path / "in.onnx"
    model.write_bytes(DIGITS.read_bytes())
    no_work(monkeypatch)
    (tmp_path / "linked").mkdir()
    os.link(model, tmp_path / "linked" / "model.opt.onnx")
    (tmp_path / "symlinked").mkdir()
    (tmp_path / "symlinked" / "report.json").symlink_to(model)
    (tmp_path / "dir-link").symlink_to(tmp_path / "linked")
    for out, name in (("linked", "model.opt.onnx"), ("symlinked", "report.json"), ("dir-link", "model.opt.onnx")):
        code, _, err = run(capsys, "optimize", model, "-o", tmp_path / out)
        assert code == 2 and f"would overwrite the input with {name}" in err, err
    assert model.read_bytes() == DIGITS.read_bytes()


def test_compile_checks_the_library_and_manifest_names(tmp_path, capsys, monkeypatch):
    no_work(monkeypatch)
    for name in ("model.x86-64.so", "manifest.json", "report.html"):
        model = tmp_path / name
        model.write_bytes(DIGITS.read_bytes())
        code, _, err = run(capsys, "compile", model, "--target", "x86-64", "-o", tmp_path)
        assert code == 2 and f"would overwrite the input with {name}" in err, err
        model.unlink()


@pytest.mark.parametrize("args, message", [
    (("-o", ""), "argument -o/--output: an empty name"),
    (("-o", "{tmp}/file"), "{tmp}/file: -o names a file; give a folder for the outputs"),
    (("-o", "{tmp}/file/sub"), "{tmp}/file/sub: cannot write the outputs there (Not a directory)"),
    (("-o", "{tmp}/out", "--target", ""), "argument --target: an empty name"),
    (("-o", "{tmp}/out", "--target", "riscv"), "unknown target 'riscv'"),
    (("-o", "{tmp}/out", "--tune"), "--tune needs --target"),
    (("-o", "{tmp}/out", "--cuda-arch", "sm_80"), "--cuda-arch needs --target cuda"),
    (("-o", "{tmp}/out", "--trials", "0", "--target", "x86"), "argument --trials: '0': give at least 1"),
])
def test_bad_arguments_exit_2_before_any_work(tmp_path, capsys, monkeypatch, args, message):
    (tmp_path / "file").write_text("")
    no_work(monkeypatch)
    args = [a.format(tmp=tmp_path) for a in args]
    try:
        code, _, err = run(capsys, "optimize", DIGITS, *args)
    except SystemExit as e:  # argparse's own usage errors
        code, err = e.code, capsys.readouterr().err
    assert code == 2 and message.format(tmp=tmp_path) in err and "Traceback" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_an_unwritable_place_fails_before_the_work(tmp_path, capsys, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    no_work(monkeypatch)
    monkeypatch.setattr(jobs.tempfile, "mkdtemp", read_only)
    code, _, err = run(capsys, "optimize", DIGITS, "-o", tmp_path / "a" / "b" / "out")
    assert code == 2 and err == f"graphopt: error: {tmp_path}/a/b/out: cannot write the outputs there " \
                                "(Read-only file system)\n"
    assert os.listdir(tmp_path) == []  # the parents it made are gone again


def old_outdir(out: Path) -> dict[str, bytes]:
    out.mkdir()
    files = {"model.opt.onnx": b"old model", "report.json": b"{}", "report.html": b"old", "mine.txt": b"mine"}
    for name, data in files.items():
        (out / name).write_bytes(data)
    return files


def contents(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir()}


def test_a_full_disk_is_one_line_and_leaves_outdir_as_it_was(tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "out"
    old = old_outdir(out)
    monkeypatch.setattr(jobs, "write_html", full)
    code, _, err = run(capsys, "optimize", DIGITS, "-o", out, "-q")
    assert code == 1 and err == (f"graphopt: error: {out}: writing the outputs failed (No space left on device); "
                                 f"{out} is unchanged\n")
    assert contents(out) == old and leftovers(tmp_path) == []


def test_a_failed_move_puts_the_old_outputs_back(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    old = old_outdir(out)
    real_rename, calls = os.rename, []

    def third_fails(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError(errno.EIO, "Input/output error")
        real_rename(src, dst)

    monkeypatch.setattr(jobs.os, "rename", third_fails)
    code, _, err = run(capsys, "optimize", DIGITS, "-o", out, "-q")
    assert code == 1 and "writing the outputs failed (Input/output error)" in err
    assert contents(out) == old and leftovers(tmp_path) == []


def test_a_new_run_replaces_its_outputs_and_keeps_the_rest(tmp_path, capsys):
    out = tmp_path / "out"
    old_outdir(out)
    code, _, err = run(capsys, "optimize", DIGITS, "-o", out, "-q")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["written"] == ["model.opt.onnx", "report.html", "report.json"]
    assert (out / "mine.txt").read_bytes() == b"mine" and (out / "model.opt.onnx").stat().st_size > 1000
    assert leftovers(tmp_path) == [] and leftovers(out) == []
    fresh = tmp_path / "new" / "deeper"
    code, _, err = run(capsys, "optimize", DIGITS, "-o", fresh, "-q")
    assert code == 0 and sorted(os.listdir(fresh)) == ["model.opt.onnx", "report.html", "report.json"]
    assert fresh.stat().st_mode & 0o777 == 0o777 & ~_umask()  # not mkdtemp's 0700


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_compile_for_a_batch_of_4_keeps_the_other_targets_library(tmp_path, capsys):
    """--input-shape x=4,1,8,8 builds a library that takes batches of 4; a second target's build
    into the same folder keeps the first one's library and manifest entry."""
    from graphopt import codegen

    out = tmp_path / "b4"
    for target in ("x86-64", "x86"):
        code, _, err = run(capsys, "compile", DIGITS, "--target", target, "--input-shape", "x=4,1,8,8", "-o", out,
                           "-q")
        assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"][0]["shape"] == [4, 1, 8, 8] and manifest["outputs"][0]["shape"] == [4, 10]
    assert sorted(manifest["libraries"]) == ["model.x86-64.so", "model.x86.so"]
    report = json.loads((out / "report.json").read_text())
    assert report["written"] == ["manifest.json", "model.x86.so", "report.html", "report.json"]
    x = np.load(ROOT / "models" / "digits_test.npz")["x"][:4]
    ref = ort.InferenceSession(str(DIGITS), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = codegen.load(out / "model.x86.so")(x)
    assert got.shape == (4, 10) and np.allclose(got, ref, atol=1e-4)
