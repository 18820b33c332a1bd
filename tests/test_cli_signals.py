"""Ctrl-C (SIGINT) or SIGTERM at any moment of `graphopt optimize`: exit 130 (SIGINT) or 143
(SIGTERM), one line and no traceback, OUTDIR either as it was or with every new output (never a
mix), and no staging folder left behind."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
CALIB = ROOT / "models" / "digits_calib.npz"
# Runs graphopt's entry point as the console script does, after telling the test that its module
# is loaded: the delays count from there, not from the interpreter's start-up and the import
# (0.1-0.3 s here, seconds on a loaded machine without .pyc files; a signal then is Python's own
# traceback or default action, before any graphopt code can handle it).
LAUNCH = ("import sys; from graphopt.cli import main; sys.stdout.write('R'); sys.stdout.flush(); "
          "sys.exit(main())")
OLD_REPORT = '{"old": true}'
CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


def old_outdir(out: Path) -> dict[str, bytes]:
    """A complete earlier run's OUTDIR, and a file of the user's that every run must keep."""
    out.mkdir()
    files = {"model.opt.onnx": DIGITS.read_bytes(), "report.json": OLD_REPORT.encode(),
             "report.html": b"<html>old</html>", "notes.txt": b"mine"}
    for name, data in files.items():
        (out / name).write_bytes(data)
    return files


def interrupt(out: Path, sig: int, delay: float) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", LAUNCH, "optimize", str(DIGITS), "-o", str(out), "--passes",
           "canonicalize,quantize", "--data", str(CALIB)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.read(1) == "R"
    time.sleep(delay)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.mark.parametrize("sig, delay, existing", [
    (signal.SIGTERM, 0.05, False), (signal.SIGINT, 0.05, True), (signal.SIGINT, 0.3, False),
    (signal.SIGTERM, 1.0, True), (signal.SIGTERM, 2.0, False), (signal.SIGINT, 3.0, True),
])
def test_a_signal_leaves_the_old_outdir_or_the_complete_new_one(tmp_path, sig, delay, existing):
    out = tmp_path / "out"
    old = old_outdir(out) if existing else None
    r = interrupt(out, sig, delay)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode in (0, CODES[sig]), (r.returncode, r.stderr)
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert not left and not list(out.glob(".graphopt.*")), left
    finished = r.returncode == 0 or f"interrupted after writing {out}" in r.stderr
    if not finished:
        assert r.stderr.strip().splitlines()[-1] == f"graphopt: interrupted; {out} unchanged", r.stderr
        if old is None:
            assert not out.exists()
        else:
            assert {p.name: p.read_bytes() for p in out.iterdir()} == old
        return
    report = json.loads((out / "report.json").read_text())
    assert report["passes"][-1]["name"] == "quantize"
    assert set(report["written"]) == {"model.opt.onnx", "report.json", "report.html"}
    assert b"QuantizeLinear" in (out / "model.opt.onnx").read_bytes()
    assert "<html>old</html>" not in (out / "report.html").read_text()
    if old is not None:
        assert (out / "notes.txt").read_bytes() == b"mine"


def test_the_console_entry_point_handles_sigterm(tmp_path):
    """`python -m graphopt.cli`, as started from a shell, a second into the run."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "graphopt.cli", "optimize", str(DIGITS), "-o", str(out),
                             "--passes", "canonicalize,quantize", "--data", str(CALIB)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == f"graphopt: interrupted; {out} unchanged"
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_a_signal_during_the_move_is_acted_on_after_it(tmp_path, monkeypatch, capsys):
    """Signals are held off while the outputs move into OUTDIR: the move completes, then the
    run ends as interrupted, saying OUTDIR was written."""
    import os

    from graphopt import cli
    from graphopt.cli import jobs

    real_rename = os.rename

    def rename_then_signal(src, dst):
        real_rename(src, dst)
        os.kill(os.getpid(), signal.SIGTERM)

    out = tmp_path / "out"
    old_outdir(out)
    monkeypatch.setattr(jobs.os, "rename", rename_then_signal)
    handler = signal.getsignal(signal.SIGTERM)
    code = cli.main(["optimize", str(DIGITS), "-o", str(out), "-q"])
    err = capsys.readouterr().err
    assert code == 143 and err.strip() == f"graphopt: interrupted after writing {out}"
    assert json.loads((out / "report.json").read_text())["written"] == ["model.opt.onnx", "report.html",
                                                                         "report.json"]
    assert (out / "notes.txt").read_bytes() == b"mine"
    assert not list(tmp_path.glob(".out.*"))
    assert signal.getsignal(signal.SIGTERM) is handler  # main put the handlers back
