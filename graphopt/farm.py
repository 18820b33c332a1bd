"""A local device farm: a TVM RPC tracker and N RPC servers on 127.0.0.1, started detached, for
trying `graphopt tune --rpc` and for tests (`graphopt farm up | status | down`).

The processes are TVM's own (`python -m tvm.exec.rpc_tracker`, `python -m tvm.exec.rpc_server`),
each in a process group of its own, so that stopping one stops the workers and sessions it
started too. What was started is recorded in `<folder>/farm.json` (pids, with their start times
so that a pid the system gave to another program since is never signalled), beside the
processes' logs. A real board joins a farm the same way: `python -m tvm.exec.rpc_server
--tracker HOST:PORT --key KEY` on the board.

With `arm`, the servers run in the emulated aarch64 Python of tools/arm_env.py (qemu-user; from a
source checkout, after `python tools/arm_env.py setup`), under the key `arm-qemu`: `--target arm`
tunes and is measured through them. Their times are emulation speed; the servers say so when
asked (`rpc.emulated`), and reports carry it.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from graphopt.codegen import rpc
from graphopt.ir.errors import GraphoptError

HOST = "127.0.0.1"
DEFAULT_KEY = "local"
ARM_KEY = "arm-qemu"
ARM_ENV = Path(__file__).resolve().parents[1] / "tools" / "arm_env.py"
STATE = "farm.json"
START_TIMEOUT = 90.0  # s: for the tracker and every server to register (each imports TVM)
STOP_TIMEOUT = 5.0  # s: after SIGTERM, before SIGKILL


class FarmError(GraphoptError):
    exit_code = 2


def default_folder() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "graphopt" / "farm"


@dataclass(frozen=True)
class Process:
    pid: int  # also its process group
    started: float  # psutil's create_time: tells this process from a later one given the same pid
    role: str  # "tracker" or "server"
    log: str


@dataclass
class Farm:
    folder: Path
    port: int
    key: str
    processes: list[Process] = field(default_factory=list)
    host: str = HOST
    arm: bool = False  # servers in the emulated aarch64 Python

    @property
    def remote(self) -> rpc.Remote:
        return rpc.Remote(self.host, self.port, self.key)

    @property
    def servers(self) -> list[Process]:
        return [p for p in self.processes if p.role == "server"]

    def save(self) -> None:
        state = {**asdict(self), "folder": str(self.folder)}
        staged = self.folder / f".{STATE}.{os.getpid()}"
        staged.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(staged, self.folder / STATE)

    @classmethod
    def load(cls, folder: Path) -> Farm | None:
        path = folder / STATE
        if not path.exists():
            return None
        try:
            state = json.loads(path.read_text())
            processes = [Process(**p) for p in state.pop("processes")]
            return cls(**{**state, "folder": Path(state["folder"]), "processes": processes})
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise FarmError(f"{path}: unreadable ({e}); stop its processes by hand and delete it") from None


def up(servers: int, folder: Path | None = None, port: int | None = None, key: str | None = None,
       arm: bool = False, timeout: float = START_TIMEOUT) -> Farm:
    """Start a tracker on 127.0.0.1:`port` (TVM's 9190 when free, if not given) and `servers` RPC
    servers registered with it under `key` (default "local", or "arm-qemu" with `arm`); return
    once the tracker lists them all."""
    key = key or (ARM_KEY if arm else DEFAULT_KEY)
    arm_env = _arm_env() if arm else None
    if servers < 1:
        raise FarmError(f"a farm needs at least one server, not {servers}")
    folder = Path(folder) if folder is not None else default_folder()
    folder.mkdir(parents=True, exist_ok=True)
    running = Farm.load(folder)
    if running is not None:
        if any(_alive(p) for p in running.processes):
            raise FarmError(f"a farm is already up in {folder} (tracker {running.remote.address}, key "
                            f"'{running.key}'): `graphopt farm down` first, or give another --dir")
        (folder / STATE).unlink()  # what a crash or reboot left
    port = _tracker_port(port)
    farm = Farm(folder, port, key, arm=arm)
    try:
        farm.processes.append(_start(folder, "tracker", "tracker.log",
                                     _tvm(["tvm.exec.rpc_tracker", "--host", HOST, "--port", str(port),
                                           "--port-end", str(port + 1)])))
        farm.save()
        deadline = time.monotonic() + timeout * (4 if arm else 1)  # TVM imports 4x slower emulated
        _wait(farm, deadline, lambda found: True, "the tracker to answer")
        for i, server_port in enumerate(_free_ports(servers)):
            tracker = f"{HOST}:{port}"
            command = (arm_env.server_command(tracker, key, server_port) if arm_env else
                       _tvm(["tvm.exec.rpc_server", "--host", HOST, "--port", str(server_port),
                             "--port-end", str(server_port + 1), "--tracker", tracker, "--key", key]))
            farm.processes.append(_start(folder, "server", f"server-{i}.log", command,
                                         arm_env.guest_env() if arm_env else None))
            farm.save()
        _wait(farm, deadline, lambda found: rpc.servers(found, key) >= servers,
              f"{servers} server(s) to register under '{key}'")
    except BaseException:
        _stop(farm)
        raise
    return farm


def _arm_env():
    """tools/arm_env.py of graphopt's source checkout, with its environment set up."""
    import importlib.util

    if not ARM_ENV.is_file():
        raise FarmError(f"--arm runs servers through {ARM_ENV.name} of graphopt's source checkout, which is not at "
                        f"{ARM_ENV}: run graphopt from a clone of its repository")
    spec = importlib.util.spec_from_file_location("graphopt_arm_env", ARM_ENV)
    module = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)  # registered first: its dataclasses look their module up
    if not module.is_ready():
        raise FarmError(f"no emulated aarch64 Python in {module.env_dir()}: run `python {ARM_ENV} setup` first "
                        "(qemu-user-static and Debian's arm64 Python through apt-get, about a minute)")
    return module


def status(folder: Path | None = None) -> tuple[Farm, dict]:
    """The farm recorded in `folder` and its tracker's summary (`rpc.summary`)."""
    folder = Path(folder) if folder is not None else default_folder()
    farm = Farm.load(folder)
    if farm is None:
        raise FarmError(f"no farm is up in {folder} (`graphopt farm up --servers N` starts one)")
    return farm, rpc.summary(farm.host, farm.port)


def down(folder: Path | None = None) -> Farm | None:
    """Stop the farm recorded in `folder`, servers first, and forget it; None if there was none.
    The logs stay."""
    folder = Path(folder) if folder is not None else default_folder()
    farm = Farm.load(folder)
    if farm is not None:
        _stop(farm)
    return farm


def _stop(farm: Farm) -> None:
    ordered = farm.servers + [p for p in farm.processes if p.role != "server"]
    for process in ordered:
        _signal(process, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while any(_alive(p) for p in ordered) and time.monotonic() < deadline:
        time.sleep(0.1)
    for process in ordered:
        _signal(process, signal.SIGKILL)
    (farm.folder / STATE).unlink(missing_ok=True)


def _tvm(module_args: list[str]) -> list[str]:
    return [sys.executable, "-m", *module_args]


def _start(folder: Path, role: str, log: str, command: list[str], env: dict | None = None) -> Process:
    with open(folder / log, "wb") as out:
        # Its own session: detached from this terminal (Ctrl-C here does not reach it) and a
        # process group that holds the workers it starts.
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, env=env,
                                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
    return Process(proc.pid, _create_time(proc.pid), role, str(folder / log))


def _wait(farm: Farm, deadline: float, ready, what: str) -> None:
    while True:
        dead = [p for p in farm.processes if not _alive(p)]
        if dead:
            raise FarmError(f"the {dead[0].role} stopped while starting: {_tail(dead[0].log)} (log: {dead[0].log})")
        try:
            if ready(rpc.summary(farm.host, farm.port, timeout=5.0)):
                return
        except rpc.RpcError:
            pass
        if time.monotonic() > deadline:
            raise FarmError(f"gave up waiting for {what} (logs in {farm.folder})")
        time.sleep(0.5)


def _tracker_port(port: int | None) -> int:
    if port is not None:
        if not _free(port):
            raise FarmError(f"port {port} on {HOST} is taken: give another --port")
        return port
    return rpc.DEFAULT_PORT if _free(rpc.DEFAULT_PORT) else _free_ports(1)[0]


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """`count` distinct ports free now (held open together, so that the system gives no port twice)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _create_time(pid: int) -> float:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def _members(process: Process) -> list:
    """The live processes of `process`'s group, if `process` is the one that was started (or, once
    it has exited, TVM processes left in its group)."""
    import psutil

    try:
        leader = psutil.Process(process.pid)
        if abs(leader.create_time() - process.started) < 1e-3:
            return [leader, *[p for p in leader.children(recursive=True) if _in_group(p, process.pid)]]
    except psutil.Error:
        pass
    left = []
    for p in psutil.process_iter(["cmdline"]):
        if _in_group(p, process.pid) and any(mark in part for part in p.info["cmdline"] or ()
                                             for mark in ("tvm.exec", "arm_rpc_server")):
            left.append(p)
    return left


def _in_group(p, pgid: int) -> bool:
    try:
        return os.getpgid(p.pid) == pgid
    except OSError:
        return False


def _alive(process: Process) -> bool:
    import psutil

    try:
        return any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in _members(process))
    except psutil.Error:
        return False


def _signal(process: Process, sig: int) -> None:
    import psutil

    for p in _members(process):
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass


def _tail(log: str, lines: int = 3) -> str:
    try:
        text = Path(log).read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return " | ".join(text[-lines:]) or "nothing logged"
