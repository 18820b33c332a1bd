"""Measuring kernels on devices through TVM's RPC tracker, for `tune(..., rpc=Remote(...))`.

TVM has the machinery: a tracker (`python -m tvm.exec.rpc_tracker`), RPC servers on the devices
that register with it under a key (`python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY`),
and MetaSchedule's `RPCRunner`, whose sessions the tracker hands to free servers of that key, in
its own queue. graphopt schedules nothing itself; around those it adds:

- `check`: before tuning, the tracker must answer and hold servers under the key: one clear error
  (exit 2) instead of TVM's client retrying for a minute, or waiting forever for a key nobody serves;
- `runner`: MetaSchedule's RPCRunner with one session per server under the key, in parallel;
- devices that vanish: a measurement whose session broke (its device died, its server was stopped)
  is measured again, on whichever server the tracker hands out, up to RETRIES times. One that never
  completes is not recorded (`measure_callbacks`; MetaSchedule's own callback would record it as failed, 1e10 s,
  and a later run would count it as measured and never try it again). Once no server is left under
  the key for GRACE seconds, `Devices.gone` says why, and the tuner stops; the database keeps what
  was measured.
"""
from __future__ import annotations

import functools
import logging
import re
import socket
import threading
import time
from dataclasses import dataclass

from graphopt.codegen.targets import tvm_error_summary
from graphopt.codegen.tune_db import FAILED
from graphopt.ir.errors import GraphoptError

DEFAULT_PORT = 9190  # TVM's tracker port by convention
RETRIES = 2  # further attempts at a measurement whose session broke
SESSION_TIMEOUT = 60  # s: a server ends a session that takes longer (upload, then every run)
CONNECT_TIMEOUT = 10.0  # s: for the tracker to answer a summary request
WATCH_PERIOD = 5.0  # s: how often a measurement still waiting for a device looks at the tracker
GRACE = 15.0  # s: how long a key may have no server before the run gives up on it
GONE = "no RPC server left"
# A child of MetaSchedule's logger, so that the tuner's log file (<database>/logs/tune.log) has it.
_LOG = logging.getLogger("tvm.s_tir.meta_schedule.graphopt.rpc")
# What a session that broke under the runner says: the connection, not the kernel, failed.
_LOST = re.compile(r"RPCCode::kReturn|code=kShutdown|Connection (?:reset|refused|closed|aborted)|Broken pipe|"
                   r"Socket closed|Cannot request|Unable to connect to the tracker|" + GONE)


class RpcError(GraphoptError):
    """The tracker cannot be reached or has no server under the key: a usage error, found before
    any work."""

    exit_code = 2


@dataclass(frozen=True)
class Remote:
    """Devices registered with a TVM RPC tracker under one key."""

    host: str
    port: int
    key: str
    session_timeout: int = SESSION_TIMEOUT

    @classmethod
    def parse(cls, address: str, key: str) -> Remote:
        """`HOST:PORT` (or `HOST`, for TVM's port 9190) and a key."""
        host, sep, port = address.strip().rpartition(":")
        if not sep:
            host, port = port, str(DEFAULT_PORT)
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise RpcError(f"'{address}' is not a tracker address like 127.0.0.1:9190")
        if not key.strip():
            raise RpcError("an empty RPC key: give the key the servers registered under (rpc_server --key)")
        return cls(host.strip("[]"), int(port), key.strip())

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def summary(host: str, port: int, timeout: float = CONNECT_TIMEOUT) -> dict:
    """The tracker's summary: {"queue_info": {key: {"free", "pending"}}, "server_info": [{"key":
    "server:KEY", "addr": [host, port]}, ...]}."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise RpcError(f"cannot reach the RPC tracker at {host}:{port}: {e.strerror or e} (start one with "
                       "`graphopt farm up` or `python -m tvm.exec.rpc_tracker`)") from None
    answer: dict = {}

    def ask() -> None:
        from tvm import rpc

        try:
            tracker = rpc.connect_tracker(host, port)
            answer["summary"] = tracker.summary()
            tracker.close()
        except Exception as e:  # noqa: BLE001 - whatever it was, the tracker did not answer
            answer["error"] = e

    # TVM's client retries a failed connection for a minute and waits on a silent peer forever.
    asking = threading.Thread(target=ask, daemon=True)
    asking.start()
    asking.join(timeout)
    if "summary" in answer:
        return answer["summary"]
    why = f": {tvm_error_summary(answer['error'])}" if "error" in answer else f" within {timeout:g} s"
    raise RpcError(f"{host}:{port} did not answer as a TVM RPC tracker{why}")


def servers(found: dict, key: str) -> int:
    """How many servers `summary` lists under `key`, busy or free."""
    return sum(1 for s in found.get("server_info", []) if s.get("key", "").partition(":")[2] == key)


def check(remote: Remote) -> int:
    """The number of servers under `remote.key`; RpcError if the tracker does not answer or has none."""
    found = summary(remote.host, remote.port)
    count = servers(found, remote.key)
    if not count:
        keys = sorted({s.get("key", "").partition(":")[2] for s in found.get("server_info", [])})
        there = f"keys there: {', '.join(keys)}" if keys else "no server is registered with it"
        raise RpcError(f"the RPC tracker at {remote.address} has no server under key '{remote.key}' ({there})")
    return count


def connect(remote: Remote, timeout: float = 120.0, session_timeout: int = 600):
    """A session on one free server under `remote.key` (checked first), for running a library
    there (`codegen.load(..., session=)`); the tracker queues the request while all are busy, for
    at most `timeout` seconds."""
    check(remote)
    from tvm import rpc

    answer: dict = {}

    def request() -> None:
        try:
            tracker = rpc.connect_tracker(remote.host, remote.port)
            answer["session"] = tracker.request(remote.key, session_timeout=session_timeout)
        except Exception as e:  # noqa: BLE001 - whatever it was, no session
            answer["error"] = e

    asking = threading.Thread(target=request, daemon=True)
    asking.start()
    asking.join(timeout)
    if "session" in answer:
        return answer["session"]
    why = tvm_error_summary(answer["error"]) if "error" in answer else f"every server stayed busy for {timeout:g} s"
    raise RpcError(f"no session on a server under '{remote.key}' at {remote.address}: {why}")


def emulated(session) -> str | None:
    """What the device says of itself when it is emulated (the servers `graphopt farm up --arm`
    starts answer `graphopt.emulated`), or None: a real device's times are the device's."""
    try:
        return str(session.get_function("graphopt.emulated")())
    except Exception:  # noqa: BLE001 - TVM's servers have no such function
        return None


def lost(error_msg: str | None) -> bool:
    """Whether a runner error says the session broke (the device or its server went away)
    rather than the kernel failing."""
    return bool(error_msg) and _LOST.search(error_msg) is not None


def runner(remote: Remote, workers: int):
    """MetaSchedule's RPCRunner through `remote`'s tracker, `workers` sessions at a time, wrapped
    in `Devices`. Call `close()` on it when done."""
    from tvm.s_tir import meta_schedule as ms

    config = ms.runner.RPCConfig(tracker_host=remote.host, tracker_port=remote.port, tracker_key=remote.key,
                                 session_timeout_sec=remote.session_timeout)
    return _classes()[0](ms.runner.RPCRunner(config, max_workers=workers), _Watch(remote))


def measure_callbacks() -> list:
    """MetaSchedule's default measure callbacks, its AddToDatabase replaced by `Commit`: the same,
    less the measurements whose device vanished."""
    from tvm.s_tir import meta_schedule as ms

    return [_classes()[2](), ms.measure_callback.RemoveBuildArtifact(), ms.measure_callback.UpdateCostModel()]


class _Watch:
    """Whether the key still has servers, asked of the tracker while a measurement waits long."""

    def __init__(self, remote: Remote):
        self.remote = remote
        self.gone: str | None = None
        self._empty_since: float | None = None
        self._asked = 0.0

    def wait(self, future) -> bool:
        """Wait for the runner future `future`; False if the key lost all its servers meanwhile."""
        started = time.monotonic()
        while not future.done():
            if self.gone:
                return False
            time.sleep(0.05)
            now = time.monotonic()
            if now - started >= WATCH_PERIOD and now - self._asked >= WATCH_PERIOD:
                self._asked = now
                self._look(now)
        return True

    def _look(self, now: float) -> None:
        try:
            count = servers(summary(self.remote.host, self.remote.port), self.remote.key)
            reason = f"{GONE} under key '{self.remote.key}' at the tracker {self.remote.address}"
        except RpcError as e:
            count, reason = 0, str(e)
        if count:
            self._empty_since = None
        elif self._empty_since is None:
            self._empty_since = now
        elif now - self._empty_since >= GRACE:
            self.gone = reason


@functools.cache
def _classes() -> tuple[type, type, type]:
    """The runner, its future and the commit callback, defined on first use: defining them imports TVM."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class Devices(ms.runner.PyRunner):
        """An RPCRunner whose measurements are measured again where their session broke."""

        def __init__(self, inner, watch: _Watch):
            super().__init__()
            self.inner, self.watch = inner, watch
            self.retried = 0

        @property
        def gone(self) -> str | None:
            return self.watch.gone

        def run(self, runner_inputs):
            if self.watch.gone:  # nobody would ever serve these
                return [Measurement(self, i, None) for i in runner_inputs]
            return [Measurement(self, i, f) for i, f in zip(runner_inputs, self.inner.run(runner_inputs))]

        def again(self, runner_input, error_msg: str):
            self.retried += 1
            last = error_msg.strip().splitlines()[-1] if error_msg.strip() else error_msg
            _LOG.warning("measuring %s again: its session broke (%s)", runner_input.artifact_path, last)
            return self.inner.run([runner_input])[0]

        def close(self) -> None:
            """Stop the runner's worker processes, those still waiting for a device included.
            TVM's own shutdown would hang on such a one: it closes the pipe that the thread
            waiting for the worker reads. Killed first, the worker ends that read."""
            pool = self.inner.pool
            pool._threadpool.shutdown(wait=False, cancel_futures=True)
            for worker in list(pool._worker_map.values()):
                if worker._proc is not None and worker._proc.poll() is None:
                    worker._proc.kill()
            pool._threadpool.shutdown(wait=True)
            pool.shutdown(wait=True)

    @derived_object
    class Measurement(ms.runner.PyRunnerFuture):
        def __init__(self, devices, runner_input, future):
            super().__init__()
            self.devices, self.input, self.future = devices, runner_input, future

        def done(self) -> bool:
            return self.future is None or self.devices.watch.gone is not None or self.future.done()

        def result(self):
            for attempt in range(RETRIES + 1):
                if self.future is None or not self.devices.watch.wait(self.future):
                    return ms.runner.RunnerResult(None, f"{GONE}: {self.devices.watch.gone}")
                result = self.future.result()
                if not lost(result.error_msg) or attempt == RETRIES:
                    return result
                self.future = self.devices.again(self.input, result.error_msg)
            return result

    @derived_object
    class Commit(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
            database = task_scheduler.database_
            if database is None:
                return
            context = task_scheduler.tasks_[task_id].ctx
            workload = database.commit_workload(context.mod)
            for candidate, result in zip(measure_candidates, runner_results):
                if lost(result.error_msg):
                    continue
                run_secs = list(result.run_secs) if result.run_secs is not None else [FAILED]
                database.commit_tuning_record(ms.database.TuningRecord(
                    candidate.sch.trace, workload, run_secs, context.target, candidate.args_info))

    return Devices, Measurement, Commit
