"""graphopt.codegen.rpc without tuning: addresses, the tracker check, which runner errors mean a
lost device, and the runner that measures those again. Loopback only; each test takes seconds."""
import json
import socket
import threading
import time

import pytest

from graphopt.codegen import rpc
from graphopt.codegen import tune as tuning
from graphopt.codegen import tune_db
from graphopt.ir.errors import CodegenError

# What MetaSchedule's RPCRunner returned for a measurement whose server was killed mid-session.
LOST = ("RPCRunner: An exception occurred\nTraceback (most recent call last):\n  File \"rpc_runner.py\", line 404, "
        "in _worker_func\n  File \"/project/src/runtime/rpc/rpc_endpoint.cc\", line 916, in void "
        "tvm::runtime::RPCEndpoint::CallFunc(...)\ntvm.error.InternalError: Check failed: (code == "
        "RPCCode::kReturn) is false: code=kShutdown\n")
KERNEL = "RPCRunner: An exception occurred\nValueError: Out of bounds memory access in kernel"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("address, key, expected", [
    ("127.0.0.1:9190", "x86", ("127.0.0.1", 9190, "x86")),
    ("board.local", " arm ", ("board.local", rpc.DEFAULT_PORT, "arm")),
    ("[::1]:9000", "k", ("::1", 9000, "k")),
])
def test_addresses(address, key, expected):
    remote = rpc.Remote.parse(address, key)
    assert (remote.host, remote.port, remote.key) == expected


@pytest.mark.parametrize("address, key, message", [
    ("127.0.0.1:http", "k", "not a tracker address"), (":9190", "k", "not a tracker address"),
    ("127.0.0.1:70000", "k", "not a tracker address"), ("127.0.0.1:9190", " ", "empty RPC key"),
])
def test_bad_addresses_are_usage_errors(address, key, message):
    with pytest.raises(rpc.RpcError, match=message) as e:
        rpc.Remote.parse(address, key)
    assert e.value.exit_code == 2


def test_a_tracker_nobody_runs_is_one_error_at_once():
    start = time.monotonic()
    with pytest.raises(rpc.RpcError, match="cannot reach the RPC tracker at 127.0.0.1:.*refused"):
        rpc.check(rpc.Remote("127.0.0.1", free_port(), "k"))
    assert time.monotonic() - start < 5  # TVM's own client retries for a minute


def test_a_port_that_never_answers_is_an_error_after_the_timeout():
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        start = time.monotonic()
        with pytest.raises(rpc.RpcError, match="did not answer as a TVM RPC tracker within 1 s"):
            rpc.summary("127.0.0.1", silent.getsockname()[1], timeout=1.0)
        assert time.monotonic() - start < 5


def test_servers_are_counted_per_key():
    found = {"server_info": [{"key": "server:a", "addr": ["127.0.0.1", 1]},
                             {"key": "server:b", "addr": ["127.0.0.1", 2]},
                             {"key": "server:a", "addr": ["127.0.0.1", 3]}]}
    assert (rpc.servers(found, "a"), rpc.servers(found, "b"), rpc.servers(found, "c")) == (2, 1, 0)


def test_a_broken_session_is_a_lost_device_and_a_kernel_error_is_not():
    assert rpc.lost(LOST) and rpc.lost(f"{rpc.GONE}: no RPC server left under key 'k'")
    assert not rpc.lost(KERNEL) and not rpc.lost("RPCRunner: Timeout, killed after 60 seconds")
    assert not rpc.lost(None)


class Done:
    """A finished runner future."""

    def __init__(self, error=None):
        self.error = error

    def done(self):
        return True

    def result(self):
        from tvm.s_tir import meta_schedule as ms

        return ms.runner.RunnerResult([1e-3] if self.error is None else None, self.error)


class Pending:
    def done(self):
        return False


class Inner:
    """An RPCRunner stand-in: hands out the futures given, in order."""

    def __init__(self, *futures):
        self.futures, self.inputs = list(futures), []

    def run(self, inputs):
        self.inputs += [i.artifact_path for i in inputs]
        return [self.futures.pop(0) for _ in inputs]


def measure(runner, name="input"):
    from tvm.s_tir import meta_schedule as ms

    return runner.run([ms.runner.RunnerInput(name, "cpu", [])])[0]


def devices(inner, remote=None):
    Devices = rpc._classes()[0]
    return Devices(inner, rpc._Watch(remote or rpc.Remote("127.0.0.1", free_port(), "k")))


def test_a_measurement_whose_device_vanished_is_measured_again():
    inner = Inner(Done(LOST), Done(LOST), Done())
    runner = devices(inner)
    result = measure(runner).result()
    assert result.error_msg is None and [float(s.value) for s in result.run_secs] == pytest.approx([1e-3])
    assert inner.inputs == ["input"] * 3 and runner.retried == 2


def test_retries_end_and_a_kernel_error_is_not_retried():
    lost, failed = devices(Inner(*[Done(LOST)] * (rpc.RETRIES + 1))), devices(Inner(Done(KERNEL)))
    assert rpc.lost(measure(lost).result().error_msg) and lost.retried == rpc.RETRIES
    assert measure(failed).result().error_msg == KERNEL and failed.retried == 0


def test_once_the_key_has_no_server_waiting_measurements_give_up(monkeypatch):
    """A tracker that answers but lists no server under the key: the measurement waiting for one
    ends as lost after GRACE, and the runner says why (the tuner stops on it)."""
    monkeypatch.setattr(rpc, "WATCH_PERIOD", 0.2)
    monkeypatch.setattr(rpc, "GRACE", 0.5)
    monkeypatch.setattr(rpc, "summary", lambda host, port, timeout=None: {"server_info": [
        {"key": "server:other", "addr": ["127.0.0.1", 1]}]})
    runner = devices(Inner(Pending(), Done()))
    waiting = measure(runner)
    start = time.monotonic()
    result = waiting.result()
    assert rpc.lost(result.error_msg) and "no RPC server left under key 'k'" in result.error_msg
    assert time.monotonic() - start < 5 and runner.gone and waiting.done()
    later = measure(runner, "next")  # not sent: nobody would serve it
    assert later.done() and rpc.lost(later.result().error_msg)


def test_the_tuner_stops_once_the_devices_are_gone():
    session = tuning._Session(before=0, trials=100, deadline=None, progress=None, weights=[1.0])
    gone = threading.Event()
    session.gone = lambda: "no RPC server left" if gone.is_set() else None
    assert not session.should_stop()
    gone.set()
    assert session.should_stop()


def test_tune_checks_the_tracker_before_any_work(tmp_path):
    remote = rpc.Remote("127.0.0.1", free_port(), "k")
    with pytest.raises(rpc.RpcError, match="cannot reach the RPC tracker"):
        tuning.tune(tmp_path / "missing.onnx", "x86", tmp_path / "db", trials=4, remote=remote)
    assert not (tmp_path / "db").exists()


def test_remote_tuning_may_target_another_architecture():
    """Measured on the devices, a target need not be this machine's: the local check is skipped."""
    from graphopt.codegen import targets

    arm = targets.resolve("arm")
    with pytest.raises(CodegenError, match="cannot tune for arm"):
        tuning._tuning_target(arm)
    assert tuning._tuning_target(arm, rpc.Remote("127.0.0.1", 9190, "arm")).export()["mtriple"].startswith("aarch64")


@pytest.mark.parametrize("tail, lines", [(b"[1, [2]]", 2), (b"[1, [", 1), (b"", 1)])
def test_a_line_cut_by_a_killed_run_is_ended_or_dropped(tmp_path, tail, lines):
    path = tmp_path / "database_tuning_record.json"
    path.write_bytes(b"[0, [1]]\n" + tail)
    tune_db._drop_cut_line(path)
    data = path.read_bytes()
    assert data.endswith(b"\n") and len(data.splitlines()) == lines and all(map(json.loads, data.splitlines()))
