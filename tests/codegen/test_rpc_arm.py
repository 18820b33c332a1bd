"""ARM end to end without hardware (issue 18): `graphopt farm up --arm` starts an RPC server in the
emulated aarch64 Python of tools/arm_env.py; `--target arm` is tuned through it, and the library
is measured there and agrees with onnxruntime. Needs `python tools/arm_env.py setup`; run with
`pytest -m arm_emulated`. Times under emulation are qemu's, which the outputs say."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from graphopt import farm as farms

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
KERNELS = 8


def _ready() -> bool:
    try:
        farms._arm_env()
    except farms.FarmError:
        return False
    return True


pytestmark = [pytest.mark.arm_emulated,
              pytest.mark.skipif(not _ready(), reason="no emulated aarch64 environment (python tools/arm_env.py "
                                                      "setup)")]


def graphopt(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graphopt.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def arm_farm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("armfarm")
    r = graphopt("farm", "up", "--arm", "--servers", 1, "--port", _free_port(), "--dir", folder)
    assert r.returncode == 0, r.stderr
    assert "--target arm" in r.stdout and "emulation speed" in r.stdout
    address = re.search(r"--rpc (\S+) --rpc-key arm-qemu", r.stdout).group(1)
    pids = [p["pid"] for p in json.loads((folder / farms.STATE).read_text())["processes"]]
    yield address
    assert graphopt("farm", "down", "--dir", folder).returncode == 0
    assert not any(_group(pid) for pid in pids)


def _group(pgid: int) -> list:
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if p.pid and os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (OSError, psutil.Error):
            pass
    return found


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_arm_is_tuned_and_measured_on_the_emulated_device(arm_farm, tmp_path):
    db = tmp_path / "db"
    r = graphopt("tune", DIGITS, "--target", "arm", "--db", db, "--trials", KERNELS, "--rpc", arm_farm,
                 "--rpc-key", "arm-qemu", "-q")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["trials_total"] == KERNELS and "emulat" in result["rpc"]["emulated"]
    r = graphopt("compile", DIGITS, "--target", "arm", "--db", db, "-o", tmp_path / "out", "-q")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["libraries"]["model.arm.so"]["database"]["tuned"] == KERNELS
    r = graphopt("measure", tmp_path / "out", "--data", ROOT / "models" / "digits_test.npz", "--rpc", arm_farm,
                 "--rpc-key", "arm-qemu", "--repeat", 3, "--json")
    assert r.returncode == 0, r.stderr
    measured = json.loads(r.stdout)
    assert measured["fidelity"]["logits"]["cosine"] > 0.99999 and measured["fidelity"]["logits"]["max_abs"] < 1e-4
    assert "qemu" in measured["emulated"]
