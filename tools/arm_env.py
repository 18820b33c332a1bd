#!/usr/bin/env python3
"""Emulated aarch64 Python environment for running TVM libraries built for ARM on an x86 host.

`setup` assembles a folder from registry packages only: DIR/root holds Debian's arm64 Python 3.11
and the shared libraries it needs (unpacked with `dpkg -x`, never installed), DIR/site holds the
aarch64 wheels of TVM and numpy (unzipped). `run` executes tools/arm_runner.py with
`qemu-aarch64-static -L DIR/root`, so no binfmt handler, chroot or kernel setting is involved.
`check` compares a library under emulation with onnxruntime on this machine. `serve` runs a TVM
RPC server in the emulated Python, registered with a tracker (`graphopt farm up --arm` starts
them this way): then `graphopt tune --target arm --rpc ... --rpc-key arm-qemu` measures on it.

    python tools/arm_env.py setup [--dir DIR]
    python tools/arm_env.py run LIB.so --inputs IN.npz --out OUT.npz [--dir DIR]
    python tools/arm_env.py check MODEL.onnx LIB.so --data DATA.npz [--samples N] [--dir DIR]
    python tools/arm_env.py serve --tracker HOST:PORT [--key arm-qemu] [--port 9300] [--dir DIR]

DIR defaults to $GRAPHOPT_ARM_ENV or ~/.cache/graphopt/arm-env. Times measured here are emulation
speed, not ARM speed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

QEMU = "qemu-aarch64-static"
QEMU_PACKAGE = "qemu-user-static"
GUEST_PYTHON = "usr/bin/python3.11"
RUNNER = Path(__file__).resolve().with_name("arm_runner.py")
SERVER = Path(__file__).resolve().with_name("arm_rpc_server.py")
SERVER_KEY = "arm-qemu"
# Python 3.11 and the shared libraries its stdlib extension modules link against (Debian bookworm).
ARM64_DEBS = (
    "python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libc6 libexpat1 zlib1g "
    "libstdc++6 libgcc-s1 libffi8 libssl3 libbz2-1.0 liblzma5 libsqlite3-0 libncursesw6 libtinfo6 "
    "libreadline8 libuuid1 libnsl2 libtirpc3 libcrypt1 libdb5.3 libgssapi-krb5-2 libkrb5-3 "
    "libk5crypto3 libkrb5support0 libcom-err2 libkeyutils1"
).split()
ARCH_ALL_DEBS = ("media-types",)  # mimetypes reads /etc/mime.types from it
WHEELS = (
    "apache-tvm==0.27.0.post1",
    # 0.1.15.x segfaults in tvm.ir.save_json; keep the pin pyproject.toml uses.
    "apache-tvm-ffi==0.1.14.post1",
    "numpy",
    "ml_dtypes",
    "typing_extensions",
    # TVM's RPC server (arm_rpc_server.py) pickles its server loop and stops sessions with psutil.
    "cloudpickle",
    "psutil",
)
WHEEL_PLATFORM = "manylinux_2_28_aarch64"  # bookworm's glibc is 2.36
# Host settings describe the x86 Python; inside the guest they would point it at x86 code.
HOST_ONLY_ENV = re.compile(r"^(PYTHON|TVM_)")


class SetupError(RuntimeError):
    """Building the environment failed; the message names what was missing."""


class EmulationError(RuntimeError):
    """The emulated run failed or the environment is not ready."""


@dataclass
class EmulatedRun:
    outputs: list[list[np.ndarray]]  # one list of outputs per call
    call_seconds: list[float]  # emulation speed, not ARM speed


@dataclass
class CheckResult:
    max_abs_error: float
    agree: int
    total: int
    call_seconds: list[float]
    atol: float

    @property
    def ok(self) -> bool:
        return self.agree == self.total and self.max_abs_error <= self.atol


def env_dir() -> Path:
    default = Path.home() / ".cache" / "graphopt" / "arm-env"
    return Path(os.environ.get("GRAPHOPT_ARM_ENV") or default)


def is_ready(directory: Path | str | None = None) -> bool:
    """Set up, with the wheels this version of the script lists (the last line of `ready`)."""
    ready = Path(directory or env_dir()) / "ready"
    return ready.is_file() and ready.read_text().splitlines()[-1:] == [" ".join(WHEELS)] \
        and shutil.which(QEMU) is not None


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _command(cmd: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    _log("+ " + shlex.join(cmd))
    return subprocess.run(list(cmd), cwd=cwd, check=False, capture_output=True, text=True)


def _named_in(text: str, names: Sequence[str]) -> list[str]:
    return [name for name in names if re.search(rf"(?<![\w.+-]){re.escape(name)}(?![\w.+-])", text)]


def _checked(cmd: Sequence[str], what: str, packages: Sequence[str] = (), cwd: Path | None = None) -> None:
    proc = _command(cmd, cwd)
    if proc.returncode == 0:
        return
    errors = "\n".join(line for line in proc.stderr.splitlines() if line.startswith("E:"))
    named = _named_in(errors, packages)
    missing = f" (not available: {', '.join(named)})" if named else ""
    raise SetupError(f"{what} failed{missing}:\n{errors or proc.stderr.strip()}")


@contextlib.contextmanager
def _arm64_architecture() -> Iterator[None]:
    """Let apt see arm64 packages while downloading; leave dpkg's architectures as they were."""
    foreign = _command(["dpkg", "--print-foreign-architectures"]).stdout.split()
    if "arm64" in foreign:
        yield
        return
    _checked(["dpkg", "--add-architecture", "arm64"], "adding the arm64 architecture")
    try:
        yield
    finally:
        _checked(["dpkg", "--remove-architecture", "arm64"], "removing the arm64 architecture")


def _require_root(reason: str) -> None:
    if os.geteuid() != 0:
        raise SetupError(f"{reason} needs apt-get as root; rerun `setup` as root")


def _download_debs(dest: Path) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    packages = [f"{name}:arm64" for name in ARM64_DEBS] + list(ARCH_ALL_DEBS)
    _checked(["apt-get", "download", *packages], "apt-get download", packages, cwd=dest)


def _apt_steps(root_dir: Path, debs: Path) -> None:
    """Install qemu-user and download the arm64 debs, whichever is still missing."""
    need_qemu = shutil.which(QEMU) is None
    need_debs = not root_dir.is_dir()
    if not (need_qemu or need_debs):
        return
    _require_root(f"installing {QEMU_PACKAGE}" if need_qemu else "downloading arm64 packages")
    arch = _arm64_architecture() if need_debs else contextlib.nullcontext()
    with arch:
        _checked(["apt-get", "update"], "apt-get update")
        if need_qemu:
            # Without recommends binfmt-support stays out, so nothing registers a binfmt handler.
            install = ["apt-get", "install", "-y", "--no-install-recommends", QEMU_PACKAGE]
            _checked(install, f"installing {QEMU_PACKAGE}", [QEMU_PACKAGE])
        if need_debs:
            _download_debs(debs)


def _extract_debs(debs: Path, root_dir: Path) -> None:
    partial = root_dir.with_name(root_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for deb in sorted(debs.glob("*.deb")):
        proc = _command(["dpkg", "-x", str(deb), str(partial)])
        if proc.returncode != 0:
            raise SetupError(f"dpkg -x {deb.name} failed:\n{proc.stderr.strip()}")
    if not (partial / GUEST_PYTHON).is_file():
        raise SetupError(f"{GUEST_PYTHON} missing after unpacking {debs}; is python3.11-minimal there?")
    # Rename last so that an interrupted setup never leaves a root that looks complete.
    partial.rename(root_dir)


def _download_wheels(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--platform", WHEEL_PLATFORM,
           "--python-version", "3.11", "-d", str(dest), *WHEELS]
    proc = _command(cmd)
    if proc.returncode != 0:
        errors = "\n".join(line for line in proc.stderr.splitlines() if line.startswith("ERROR:"))
        named = re.findall(r"(?:requirement|distribution) (?:found )?(?:for )?(\S+)", errors)
        missing = f" (no aarch64 wheel for: {', '.join(sorted(set(named)))})" if named else ""
        raise SetupError(f"pip download failed{missing}:\n{errors or proc.stderr.strip()[-2000:]}")


def _install_wheels(wheels: Path, site: Path) -> None:
    partial = site.with_name(site.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(partial)
    partial.rename(site)


def _size_mb(folder: Path, pattern: str) -> float:
    return sum(f.stat().st_size for f in folder.glob(pattern)) / 1e6


def _guest_command(directory: Path, args: Sequence[str]) -> list[str]:
    # -s: the user site (~/.local/lib/python3.11) is shared with the host and may hold x86 builds.
    return [QEMU, "-L", str(directory / "root"), "-E", f"PYTHONPATH={directory / 'site'}",
            str(directory / "root" / GUEST_PYTHON), "-s", *args]


def server_command(tracker: str, key: str = SERVER_KEY, port: int = 9300,
                   directory: Path | str | None = None) -> list[str]:
    """The command that runs an RPC server in the emulated Python (tools/arm_rpc_server.py),
    registered with `tracker` (HOST:PORT) under `key`; run it with `guest_env()`."""
    directory = Path(directory or env_dir()).resolve()
    if not is_ready(directory):
        raise EmulationError(f"no emulated aarch64 environment in {directory}; "
                             f"run `python tools/arm_env.py setup --dir {directory}`")
    # The guest's sys.executable: the kernel cannot execute the aarch64 interpreter itself (no
    # binfmt handler), but it runs this host script, which starts it under qemu.
    launcher = directory / "launcher"
    staged = launcher.with_name(f".launcher.{os.getpid()}")
    staged.write_text("#!/bin/sh\nexec " + shlex.join(_guest_command(directory, [])) + ' "$@"\n')
    staged.chmod(0o755)
    os.replace(staged, launcher)
    return [str(launcher), str(SERVER), tracker, key, str(port), str(launcher)]


def guest_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not HOST_ONLY_ENV.match(key)}


def _smoke_test(directory: Path) -> str:
    script = "import numpy, tvm; from tvm import relax; print(tvm.__version__, numpy.__version__)"
    cmd = _guest_command(directory, ["-c", script])
    _log("+ " + shlex.join(cmd))
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=guest_env())
    if proc.returncode != 0:
        raise SetupError(f"the emulated Python cannot import tvm:\n{proc.stderr.strip()[-2000:]}")
    return proc.stdout.strip()


def setup(directory: Path | str | None = None) -> Path:
    """Build the environment in DIRECTORY; a complete one is left untouched."""
    directory = Path(directory or env_dir()).resolve()
    if is_ready(directory):
        _log(f"{directory} is ready")
        return directory
    start = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    root_dir, site, debs, wheels = (directory / name for name in ("root", "site", "debs", "wheels"))
    _apt_steps(root_dir, debs)
    if not root_dir.is_dir():
        _extract_debs(debs, root_dir)
    if (directory / "ready").is_file():  # set up by a version of this script that listed other wheels
        shutil.rmtree(site, ignore_errors=True)
    if not site.is_dir():
        _download_wheels(wheels)
        _install_wheels(wheels, site)
    versions = _smoke_test(directory)
    (directory / "ready").write_text(f"{versions}\n{' '.join(WHEELS)}\n")
    _log(f"ready: tvm/numpy {versions}; debs {_size_mb(debs, '*.deb'):.1f} MB, "
         f"wheels {_size_mb(wheels, '*.whl'):.1f} MB; {time.perf_counter() - start:.0f} s")
    return directory


def _run_files(lib: Path, pairs: Sequence[tuple[Path, Path]], directory: Path) -> list[float]:
    if not is_ready(directory):
        raise EmulationError(f"no emulated aarch64 environment in {directory}; "
                             f"run `python tools/arm_env.py setup --dir {directory}`")
    files = [str(path) for pair in pairs for path in pair]
    cmd = _guest_command(directory, [str(RUNNER), str(Path(lib).resolve()), *files])
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=guest_env())
    if proc.returncode != 0:
        raise EmulationError(f"emulated run of {lib} failed (exit {proc.returncode}):\n"
                             f"{proc.stderr.strip()[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["call_seconds"]


def _load_outputs(path: Path) -> list[np.ndarray]:
    with np.load(path) as npz:
        return [npz[f"arr_{i}"] for i in range(len(npz.files))]


def run_many(lib: Path | str, calls: Sequence[Sequence[np.ndarray]],
             directory: Path | str | None = None) -> EmulatedRun:
    """Run the library's "main" once per input list, all in one emulated process."""
    directory = Path(directory or env_dir()).resolve()
    with tempfile.TemporaryDirectory(prefix="arm-run-") as tmp:
        pairs = [(Path(tmp, f"in{i}.npz"), Path(tmp, f"out{i}.npz")) for i in range(len(calls))]
        for (in_path, _), inputs in zip(pairs, calls):
            np.savez(in_path, *inputs)
        seconds = _run_files(Path(lib), pairs, directory)
        return EmulatedRun([_load_outputs(out) for _, out in pairs], seconds)


def run(lib: Path | str, inputs: Sequence[np.ndarray],
        directory: Path | str | None = None) -> list[np.ndarray]:
    return run_many(lib, [inputs], directory).outputs[0]


def _samples(model: Path, data: Path, count: int) -> tuple[list[str], list[list[np.ndarray]]]:
    """Split the data set into batch-1 calls, inputs in the model's order."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    names = [inp.name for inp in graph.input if inp.name not in initializers]
    with np.load(data) as npz:
        absent = [name for name in names if name not in npz.files]
        if absent:
            raise ValueError(f"{data} has no array for model input(s) {absent}; it has {npz.files}")
        arrays = [npz[name] for name in names]
    count = min(count, len(arrays[0]))
    return names, [[array[i:i + 1] for array in arrays] for i in range(count)]


def _max_abs_error(got: np.ndarray, want: np.ndarray) -> float:
    # Broadcasting would hide a library that returns the wrong shape.
    return float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")


def check(model: Path | str, lib: Path | str, data: Path | str, directory: Path | str | None = None,
          samples: int = 16, atol: float = 1e-4) -> CheckResult:
    """Compare the emulated library with onnxruntime on x86, one batch-1 sample per call."""
    import onnxruntime as ort

    names, calls = _samples(Path(model), Path(data), samples)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    reference = [session.run(None, dict(zip(names, call))) for call in calls]
    emulated = run_many(lib, calls, directory)
    error = max(_max_abs_error(got, want)
                for got_outs, want_outs in zip(emulated.outputs, reference)
                for got, want in zip(got_outs, want_outs, strict=True))
    agree = sum(int(np.array_equal(got[0].argmax(-1), want[0].argmax(-1)))
                for got, want in zip(emulated.outputs, reference))
    return CheckResult(error, agree, len(calls), emulated.call_seconds, atol)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("setup", help="build the environment (idempotent)")
    run_cmd = sub.add_parser("run", help="run LIB.so's main on the arrays of one npz")
    run_cmd.add_argument("lib", type=Path)
    run_cmd.add_argument("--inputs", type=Path, required=True)
    run_cmd.add_argument("--out", type=Path, required=True)
    check_cmd = sub.add_parser("check", help="compare LIB.so under emulation with onnxruntime")
    check_cmd.add_argument("model", type=Path)
    check_cmd.add_argument("lib", type=Path)
    check_cmd.add_argument("--data", type=Path, required=True, help="npz with one array per model input")
    check_cmd.add_argument("--samples", type=int, default=16)
    check_cmd.add_argument("--atol", type=float, default=1e-4)
    serve_cmd = sub.add_parser("serve", help="run a TVM RPC server in the emulated Python, registered with a tracker")
    serve_cmd.add_argument("--tracker", required=True, metavar="HOST:PORT")
    serve_cmd.add_argument("--key", default=SERVER_KEY, help=f"default {SERVER_KEY}")
    serve_cmd.add_argument("--port", type=int, default=9300, help="the server's port on 127.0.0.1 (default 9300)")
    for command in (sub.choices["setup"], run_cmd, check_cmd, serve_cmd):
        command.add_argument("--dir", type=Path, default=None, help="environment folder")
    return parser


def _report(result: CheckResult) -> str:
    median = float(np.median(result.call_seconds))
    return (f"max-abs error {result.max_abs_error:.3g} (atol {result.atol:g}); "
            f"argmax agreement {result.agree}/{result.total}; "
            f"{median * 1e3:.1f} ms per inference under emulation (median; not ARM speed)")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "setup":
            print(setup(args.dir))
        elif args.command == "serve":
            cmd = server_command(args.tracker, args.key, args.port, args.dir)
            return subprocess.run(cmd, env=guest_env(), check=False).returncode
        elif args.command == "run":
            directory = Path(args.dir or env_dir()).resolve()
            seconds = _run_files(args.lib, [(args.inputs.resolve(), args.out.resolve())], directory)
            print(f"wrote {args.out} ({seconds[0] * 1e3:.1f} ms under emulation)")
        else:
            result = check(args.model, args.lib, args.data, args.dir, args.samples, args.atol)
            print(_report(result))
            return 0 if result.ok else 1
    except (SetupError, EmulationError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
