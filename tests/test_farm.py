"""`graphopt farm up|status|down` and `graphopt tune --rpc` through it: a TVM RPC tracker and
servers on 127.0.0.1 (random free ports), tuning the digits CNN with a small budget."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from graphopt import farm as farms
from graphopt.codegen import tune_db

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
KERNELS = 8  # the digits CNN's kernels: the first 8 trials are their default schedules
SESSION = re.compile(r"connected from")


def graphopt(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graphopt.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, check=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group(pid: int) -> list[psutil.Process]:
    """The live processes of the process group `pid` leads."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != 0 and os.getpgid(p.pid) == pid and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (OSError, psutil.Error):
            pass
    return found


def started(folder: Path) -> dict:
    return json.loads((folder / farms.STATE).read_text())


def sessions(folder: Path) -> list[int]:
    """Sessions each server served, from its log."""
    return [len(SESSION.findall(Path(p["log"]).read_text())) for p in started(folder)["processes"]
            if p["role"] == "server"]


def up(folder: Path, servers: int, key: str) -> str:
    r = graphopt("farm", "up", "--servers", servers, "--port", free_port(), "--key", key, "--dir", folder)
    assert r.returncode == 0, r.stderr
    return re.search(r"--rpc (\S+) --rpc-key", r.stdout).group(1)


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    """A farm of two servers under key `pair`, stopped at the end with nothing left running."""
    folder = tmp_path_factory.mktemp("farm")
    address = up(folder, 2, "pair")
    pids = [p["pid"] for p in started(folder)["processes"]]
    yield folder, address
    assert graphopt("farm", "down", "--dir", folder).returncode == 0
    assert not any(group(pid) for pid in pids)


def test_up_registers_every_server_and_status_lists_them(farm):
    folder, address = farm
    r = graphopt("farm", "status", "--dir", folder)
    assert r.returncode == 0 and f"tracker {address}" in r.stdout
    assert re.search(r"^pair\s+2\s+2\s+0$", r.stdout, re.MULTILINE), r.stdout
    summary = json.loads(graphopt("farm", "status", "--dir", folder, "--json").stdout)
    assert sorted(s["key"] for s in summary["server_info"]) == ["server:pair", "server:pair"]
    assert all(s["addr"][0] == "127.0.0.1" for s in summary["server_info"])


def test_a_second_farm_in_the_same_folder_is_refused(farm):
    r = graphopt("farm", "up", "--servers", 1, "--dir", farm[0])
    assert r.returncode == 2 and "already up" in r.stderr and "farm down" in r.stderr


@pytest.mark.slow  # over a minute on 2 cores: four tracker round trips
def test_tuning_through_two_servers_gives_a_database_that_compile_applies(farm, tmp_path):
    """A budget of one trial per kernel: their default schedules, measured at once on both servers.
    (MetaSchedule's search through the tracker is tested, slowly, below.)"""
    folder, address = farm
    before = sessions(folder)
    db = tmp_path / "db"
    r = graphopt("tune", DIGITS, "--target", "x86", "--db", db, "--trials", KERNELS, "--rpc", address,
                 "--rpc-key", "pair")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["trials_total"] == KERNELS and result["tasks"] == KERNELS
    assert result["rpc"] == {"tracker": address, "key": "pair"}
    assert all(after > b for after, b in zip(sessions(folder), before))  # both servers measured
    records = [json.loads(line) for line in (db / "database_tuning_record.json").read_text().splitlines()]
    assert len(records) == KERNELS and all(tune_db.seconds(r[1][1]) < 1 for r in records)
    assert applied(db, tmp_path / "out") == KERNELS

    # A line cut short by a killed run: the next run drops it, keeps every whole record, and finds
    # the budget met.
    with open(db / "database_tuning_record.json", "a") as f:
        f.write(json.dumps(records[0])[:100])
    r = graphopt("tune", DIGITS, "--target", "x86", "--db", db, "--trials", KERNELS, "--rpc", address,
                 "--rpc-key", "pair", "-q")
    assert r.returncode == 0 and json.loads(r.stdout)["trials"] == 0, r.stderr

    # What MetaSchedule records for a candidate that failed (1e10 s) is no time: never applied.
    for record in records:
        record[1][1] = [tune_db.FAILED]
    (db / "database_tuning_record.json").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert applied(db, tmp_path / "failed") == 0


def applied(db: Path, out: Path) -> int:
    """How many kernels `graphopt compile --db` scheduled from the database."""
    r = graphopt("compile", DIGITS, "--target", "x86", "--db", db, "-o", out, "-q")
    assert r.returncode == 0, r.stderr
    return json.loads((out / "manifest.json").read_text())["libraries"]["model.x86.so"]["database"]["tuned"]


def test_a_key_without_servers_is_one_error_line(farm, tmp_path):
    r = graphopt("tune", DIGITS, "--target", "x86", "--db", tmp_path / "db", "--rpc", farm[1], "--rpc-key", "none")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        f"graphopt: error: the RPC tracker at {farm[1]} has no server under key 'none' (keys there: pair)"]


def test_an_unreachable_tracker_is_one_error_line(tmp_path):
    start = time.monotonic()
    r = graphopt("tune", DIGITS, "--target", "x86", "--db", tmp_path / "db", "--rpc", f"127.0.0.1:{free_port()}",
                 "--rpc-key", "k", timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "cannot reach the RPC tracker at 127.0.0.1:" in r.stderr and time.monotonic() - start < 30
    assert not (tmp_path / "db").exists()


@pytest.mark.parametrize("args, message", [
    (["--rpc", "127.0.0.1:9190"], "--rpc needs --rpc-key"), (["--rpc-key", "k"], "--rpc-key needs --rpc"),
])
def test_rpc_options_come_together(args, message, tmp_path):
    r = graphopt("tune", DIGITS, "--target", "x86", "--db", tmp_path, *args)
    assert r.returncode == 2 and message in r.stderr


def test_down_stops_every_process_and_forgets_the_farm(tmp_path):
    address = up(tmp_path, 1, "solo")
    processes = started(tmp_path)["processes"]
    assert all(group(p["pid"]) for p in processes)
    r = graphopt("farm", "down", "--dir", tmp_path)
    assert r.returncode == 0 and f"stopped the tracker {address} and 1 server(s)" in r.stdout
    assert not any(group(p["pid"]) for p in processes) and not (tmp_path / farms.STATE).exists()
    assert (tmp_path / "server-0.log").exists()  # the logs stay
    assert "no farm was up" in graphopt("farm", "down", "--dir", tmp_path).stdout
    r = graphopt("farm", "status", "--dir", tmp_path)
    assert r.returncode == 2 and "no farm is up" in r.stderr


def test_arm_servers_need_the_emulated_environment(tmp_path):
    env = {**os.environ, "GRAPHOPT_ARM_ENV": str(tmp_path / "no-env")}
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", "farm", "up", "--arm", "--dir", tmp_path / "farm"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60, env=env, check=False)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("graphopt: error: no emulated aarch64")
    assert "tools/arm_env.py setup" in r.stderr
    assert not (tmp_path / "farm" / farms.STATE).exists()


def test_a_library_measured_on_a_device_agrees_with_onnxruntime(farm, tmp_path):
    r = graphopt("compile", DIGITS, "--target", "x86", "-o", tmp_path / "out", "-q")
    assert r.returncode == 0, r.stderr
    r = graphopt("measure", tmp_path / "out", "--data", ROOT / "models" / "digits_test.npz", "--rpc", farm[1],
                 "--rpc-key", "pair", "--repeat", 5, "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["device"] == f"pair@{farm[1]}" and result["emulated"] is False and result["latency_ms"] > 0
    assert result["model"] == str(DIGITS) and result["fidelity"]["logits"]["cosine"] > 0.99999
    # against another model's outputs (the last layer's weights reversed) it fails, with exit 1
    import onnx
    from onnx import numpy_helper

    other = onnx.load(DIGITS)
    weight = next(t for t in other.graph.initializer if t.name == "gemm14.weight")  # [classes, features]
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight)[::-1].copy(), weight.name))
    onnx.save(other, tmp_path / "other.onnx")
    r = graphopt("measure", tmp_path / "out", "--model", tmp_path / "other.onnx", "--data",
                 ROOT / "models" / "digits_test.npz", "--rpc", farm[1], "--rpc-key", "pair", "--repeat", 1)
    assert r.returncode == 1 and "is below --min-cosine 0.999" in r.stderr


@pytest.mark.slow  # a minute on 2 cores; test_compile_tunes_on_the_devices_with_rpc tunes through the farm by default
def test_two_models_tune_as_one_set_of_kernels(farm, tmp_path):
    import onnx

    from graphopt.testing import builders

    mlp = tmp_path / "mlp.onnx"
    onnx.save(builders.mlp(), mlp)
    db = tmp_path / "db"
    alone = json.loads(graphopt("tune", mlp, "--target", "x86", "--db", tmp_path / "alone", "--trials", 1,
                                "-q").stdout)["tasks"]
    r = graphopt("tune", DIGITS, mlp, DIGITS, "--target", "x86", "--db", db, "--trials", KERNELS + alone,
                 "--rpc", farm[1], "--rpc-key", "pair", "-q")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["tasks"] == KERNELS + alone and result["trials_total"] == KERNELS + alone  # digits counted once
    assert applied(db, tmp_path / "out") == KERNELS


def test_compile_tunes_on_the_devices_with_rpc(farm, tmp_path):
    r = graphopt("compile", DIGITS, "--target", "x86", "--tune", "--trials", KERNELS, "--rpc", farm[1],
                 "--rpc-key", "pair", "-o", tmp_path / "out", "-q")
    assert r.returncode == 0, r.stderr
    tuning = json.loads((tmp_path / "out" / "report.json").read_text())["tuning"]
    assert tuning["rpc"] == {"tracker": farm[1], "key": "pair"} and tuning["trials_total"] == KERNELS


@pytest.mark.parametrize("command", ["compile", "optimize"])
def test_rpc_on_compile_and_optimize_measures_tuning(command, tmp_path):
    r = graphopt(command, DIGITS, "--target", "x86", "-o", tmp_path / "out", "--rpc", "127.0.0.1:9190",
                 "--rpc-key", "k")
    assert r.returncode == 2 and "--rpc measures tuning trials on the devices: give --tune" in r.stderr


@pytest.mark.slow  # three runs of MetaSchedule's search on 2 cores, a wait for dead devices: ~4 min
def test_devices_dying_mid_run_lose_nothing_measured(tmp_path):
    """One of two servers killed while it measures: the run ends on the other, every trial
    recorded. The tuner itself killed: what it recorded stays, and the next run resumes. Then the
    last server killed: the run stops with one line, keeping what it measured."""
    folder = tmp_path / "farm"
    address = up(folder, 2, "dying")
    servers = [p["pid"] for p in started(folder)["processes"] if p["role"] == "server"]
    db = tmp_path / "db"
    records = db / "database_tuning_record.json"
    try:
        tune = ["tune", DIGITS, "--target", "x86", "--db", db, "--rpc", address, "--rpc-key", "dying", "-q"]
        run = subprocess.Popen([sys.executable, "-m", "graphopt.cli", *map(str, tune), "--trials", "24"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for_records(records, KERNELS, run)
        survivor_before = sessions(folder)[1]
        caught = wait_for_a_session(Path(started(folder)["processes"][1]["log"]), run)
        kill_group(servers[0])
        stdout, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stderr
        if caught:  # killed while it measured: that measurement was taken again on the other server
            assert "again: its session broke" in (db / "logs" / "tune.log").read_text()
        assert json.loads(stdout)["trials_total"] == 24 and len(records.read_text().splitlines()) == 24
        assert sessions(folder)[1] > survivor_before
        assert applied(db, tmp_path / "out") == KERNELS

        run = subprocess.Popen([sys.executable, "-m", "graphopt.cli", *map(str, tune), "--trials", "48"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        wait_for_records(records, 28, run)
        kill_group(run.pid)  # SIGKILL to the tuner and its builder and runner workers: no clean-up of any kind
        run.communicate(timeout=60)
        killed_at = len(records.read_text().splitlines())

        run = subprocess.Popen([sys.executable, "-m", "graphopt.cli", *map(str, tune), "--trials", "48"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for_records(records, killed_at + 4, run)  # resumed: a batch more
        kill_group(servers[1])
        stdout, stderr = run.communicate(timeout=600)
        assert run.returncode == 1 and stdout == ""
        assert stderr.strip().splitlines()[-1].startswith(
            "graphopt: error: tuning stopped: no RPC server left under key 'dying'")
        kept = records.read_text().splitlines()
        assert len(kept) >= killed_at + 4 and all(json.loads(line) for line in kept)  # whole records only
    finally:
        graphopt("farm", "down", "--dir", folder)


def wait_for_records(records: Path, count: int, run: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (records.exists() and len(records.read_text().splitlines()) >= count):
        assert run.poll() is None, run.communicate()
        assert time.monotonic() < deadline, f"fewer than {count} records after {timeout} s"
        time.sleep(0.2)


def wait_for_a_session(log: Path, run: subprocess.Popen, timeout: float = 120) -> bool:
    """Wait until the server of `log` is running a kernel (a module loaded, its session not yet
    finished); False if none was seen in time."""
    deadline = time.monotonic() + timeout
    while run.poll() is None and time.monotonic() < deadline:
        text = log.read_text()
        if text.count("load_module") > text.count("finish serving"):
            return True
        time.sleep(0.01)
    return False


def kill_group(pid: int) -> None:
    os.killpg(pid, signal.SIGKILL)
