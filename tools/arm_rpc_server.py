"""A TVM RPC server for the emulated aarch64 Python that tools/arm_env.py builds (`arm_env.py serve`).

Usage: arm_rpc_server.py TRACKER_HOST:PORT KEY PORT LAUNCHER

TVM's own `python -m tvm.exec.rpc_server` starts its server loop in a fresh interpreter
(`sys.executable -m tvm.exec.popen_worker`) and, by default, every session in another (spawn).
Under qemu-user without a binfmt handler the kernel cannot execute the aarch64 interpreter, so
`sys.executable` here is LAUNCHER, a host script that runs this same emulated Python, and sessions
fork (qemu-user forks the emulated process as it is). The server registers with the tracker under
KEY and serves on 127.0.0.1:PORT until it is killed. It answers `graphopt.emulated` (a global
function sessions inherit), so that what measures through it can say its times are qemu's.
"""
import multiprocessing
import sys

import tvm
from tvm import rpc

EMULATED = "aarch64 emulated by qemu-user on an x86 machine: times are emulation speed, not a device's"


def _answer_emulated() -> None:
    # Runs in the server's own process (sent there by value), whose sessions fork from it.
    tvm.register_global_func("graphopt.emulated", lambda: EMULATED)


def main(tracker: str, key: str, port: str, launcher: str) -> None:
    sys.executable = launcher
    multiprocessing.set_executable(launcher)
    host, _, tracker_port = tracker.rpartition(":")
    server = rpc.Server("127.0.0.1", int(port), int(port) + 1, tracker_addr=(host, int(tracker_port)), key=key,
                        no_fork=False, server_init_callback=_answer_emulated)
    server.proc.join()


if __name__ == "__main__":
    main(*sys.argv[1:])
