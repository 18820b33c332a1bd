"""Load a library that `graphopt.codegen.compile` exported and run it on numpy arrays.

    lib = load("out/model.x86.so")
    logits = lib(x)                      # one output: an array; several: a dict name -> array
    outputs = lib.run({"x": x})          # always a dict
    ms = lib.benchmark({"x": x})         # median latency in milliseconds

Inputs are the model's own: where the manifest lists host encoders (string lookups at the model's
inputs, `host_encoders`), `run` feeds the strings through them on the host and hands the library
their numbers; `benchmark` times the library alone. A library with AMX kernels first gets Linux's
permission to use AMX (`amx_permission`), or a clear error where it is refused.

    lib = load("out/model.arm.so", session=rpc.connect(remote))   # on a device, through TVM RPC

With an RPC `session` the library is uploaded to the device and runs there: inputs are copied to
it, outputs back, and `benchmark` is TVM's time evaluator on the device (no network in the time).
"""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from graphopt.codegen import amx_permission, backends, host_encoders, manifest
from graphopt.codegen.targets import host_arch, tvm_error_summary
from graphopt.ir.errors import CodegenError, DataError

# ELF e_machine values of the architectures we build for.
_ELF_MACHINES = {62: "x86_64", 183: "aarch64"}


class CompiledModel:
    """A compiled library with the manifest that describes it, ready to run on its device."""

    def __init__(self, library: Path, model: dict, entry: dict, session=None):
        # TVM sizes its thread pool on first use, assuming two hyper-threads per core: half the CPUs
        # (one thread on a 2-CPU VM, half the speed of onnxruntime there). Use every CPU this process
        # may run on, unless the user chose.
        os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
        import tvm
        from tvm import relax

        self.library, self.entry = library, entry
        self.inputs: list[dict] = model["inputs"]
        self.outputs: list[dict] = model["outputs"]
        self.host_encoders = [host_encoders.Encoder.from_json(e) for e in model.get("host_encoders", [])]
        self._arguments = host_encoders.library_arguments(self.inputs, self.host_encoders)
        backend = _backend(entry["device"], library)
        self.remote = session is not None
        try:
            if session is None:
                self.device = backend.runtime_device(library)
                module = tvm.runtime.load_module(str(_loadable(library)))
            else:
                self.device = session.cuda() if entry["device"] == "cuda" else session.cpu()
                session.upload(str(library))
                module = session.load_module(library.name)
            self._vm = relax.VirtualMachine(module, self.device)
            self._main = self._vm["main"]
        except Exception as e:  # noqa: BLE001 - TVM raises many unrelated types
            where = " on the device" if session is not None else ""
            raise CodegenError(f"{library}: TVM cannot load the library{where}: {tvm_error_summary(e)}"
                               f"{backend.load_hint(entry)}") from e

    def __call__(self, *arrays: np.ndarray, **feeds: np.ndarray) -> np.ndarray | dict[str, np.ndarray]:
        """Inputs by position, by name, or both; the only output, or a dict when there are several."""
        if len(arrays) > len(self.inputs):
            raise DataError(f"{len(arrays)} inputs given; the model takes {len(self.inputs)} "
                            f"({', '.join(self.input_names)})")
        positional = dict(zip(self.input_names, arrays))
        twice = sorted(set(positional) & set(feeds))
        if twice:
            raise DataError(f"input {', '.join(twice)} given both by position and by name")
        outputs = self.run({**positional, **feeds})
        return next(iter(outputs.values())) if len(outputs) == 1 else outputs

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once; outputs by name, as numpy arrays on the host."""
        result = self._main(*self._to_device(feeds))
        values = [result] if len(self.outputs) == 1 else list(result)
        return {spec["name"]: _to_host(value) for spec, value in zip(self.outputs, values)}

    def benchmark(self, feeds: Mapping[str, np.ndarray], repeat: int = 100, warmup: int = 10) -> float:
        """Median latency of one run in milliseconds, inputs already on the device, outputs left there."""
        if repeat < 1:
            raise ValueError("repeat must be at least 1")
        arguments = self._to_device(feeds)
        if self.remote:  # timed on the device, each run alone
            timer = self._vm.time_evaluator("main", self.device, number=1, repeat=warmup + repeat)
            return statistics.median(timer(*arguments).results[warmup:]) * 1e3
        for _ in range(warmup):
            self._main(*arguments)
        self.device.sync()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            self._main(*arguments)
            self.device.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    @property
    def input_names(self) -> list[str]:
        return [spec["name"] for spec in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [spec["name"] for spec in self.outputs]

    def _to_device(self, feeds: Mapping[str, np.ndarray]) -> list:
        import tvm

        missing = [n for n in self.input_names if n not in feeds]
        unknown = sorted(set(feeds) - set(self.input_names))
        if missing or unknown:
            raise DataError(f"inputs do not match the model: missing {missing or 'none'}, unknown "
                            f"{unknown or 'none'} (inputs: {', '.join(self.input_names)})")
        checked = {spec["name"]: _checked(spec, feeds[spec["name"]]) for spec in self.inputs}
        values = host_encoders.encode(self.host_encoders, checked)
        if self.device.dlpack_device_type() != tvm.cpu().dlpack_device_type():
            return [tvm.runtime.tensor(_contiguous(values[a["name"]]), self.device) for a in self._arguments]
        return [tvm.runtime.from_dlpack(_aligned_copy(values[a["name"]])) for a in self._arguments]

    def __repr__(self) -> str:
        return f"CompiledModel({str(self.library)!r}, target={self.entry['target']!r})"


def load(path: str | os.PathLike, session=None) -> CompiledModel:
    """Load a library, or the only library of an output folder, with the manifest beside it; with
    an RPC `session` (`codegen.rpc.connect`), onto that device."""
    library = _library(Path(path))
    model, entry = manifest.describe(library)
    if session is None:
        _check_architecture(library)
        if entry.get("int8_instruction") == "amx":
            amx_permission.require(library)
    return CompiledModel(library, model, entry, session)


# Libraries this process has loaded: path -> (inode, mtime) of the file then.
_LOADED: dict[Path, tuple[int, int]] = {}


def _loadable(library: Path) -> Path:
    """A path the dynamic loader will really load: it hands back the library it already loaded
    for a path, even if the file was rebuilt since, so a rebuilt library is loaded from a copy."""
    key, stat = library.resolve(), library.stat()
    now = (stat.st_ino, stat.st_mtime_ns)
    seen = _LOADED.setdefault(key, now)
    if seen == now:
        return library
    copy = Path(tempfile.mkdtemp(prefix="graphopt-lib-")) / library.name
    shutil.copy2(library, copy)
    return copy


def _library(path: Path) -> Path:
    if path.is_dir():
        described = manifest.describe_folder(path)
        if len(described) != 1:
            choices = ", ".join(described) or "none"
            raise CodegenError(f"{path} holds {len(described)} libraries ({choices}); load one of them by path")
        return path / described[0]
    if not path.is_file():
        raise CodegenError(f"{path}: no such library")
    return path


def _check_architecture(library: Path) -> None:
    """A clear error instead of the dynamic loader's when the library is for another CPU."""
    with library.open("rb") as f:
        header = f.read(20)
    if header[:4] != b"\x7fELF":
        raise CodegenError(f"{library}: not an ELF shared library")
    machine = int.from_bytes(header[18:20], "little")
    arch = _ELF_MACHINES.get(machine, f"ELF machine {machine}")
    if arch != host_arch():
        raise CodegenError(f"{library} is built for {arch}, and this machine is {host_arch()}; run it "
                           f"on {arch} (or under qemu-{arch} with an {arch} Python and TVM)")


def _backend(kind: str, library: Path) -> backends.Backend:
    if kind not in backends.BACKENDS:
        raise CodegenError(f"{library}: the manifest names device '{kind}', which graphopt cannot run")
    return backends.BACKENDS[kind]


def _checked(spec: dict, value) -> np.ndarray:
    strings = spec["dtype"] == host_encoders.STRING
    array = host_encoders.check_strings(spec["name"], value) if strings else np.asarray(value)
    if not strings and str(array.dtype) != spec["dtype"]:
        raise DataError(f"input '{spec['name']}' is {array.dtype}, the model takes {spec['dtype']} "
                        f"(convert with .astype(np.{spec['dtype']}))")
    if list(array.shape) != spec["shape"]:
        raise DataError(f"input '{spec['name']}' has shape {list(array.shape)}; the library was built "
                        f"for {spec['shape']} (rebuild with other `shapes` to change it)")
    return array


# The alignment TVM requires of a tensor it takes without copying (DLPack).
_ALIGNMENT = 64


def _aligned_copy(array: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of `array` at a 64-byte aligned address, which TVM takes as a tensor
    without copying it again: 1 us where `tvm.runtime.tensor` takes 15 us, most of a small model's
    run (the digits CNN's kernels take 6 us). A fresh copy each run, so runs share no buffer."""
    raw = np.empty(array.nbytes + _ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % _ALIGNMENT
    copy = raw[start:start + array.nbytes].view(array.dtype).reshape(array.shape)
    np.copyto(copy, array)
    return copy


def _to_host(value) -> np.ndarray:
    """A numpy copy of a result on the CPU through DLPack (0.6 us where `.numpy()` takes 6 us);
    the 1-bit booleans numpy's DLPack import refuses go through `.numpy()`."""
    try:
        return np.array(np.from_dlpack(value))
    except (BufferError, TypeError, ValueError, RuntimeError):
        return value.numpy()


def _contiguous(array: np.ndarray) -> np.ndarray:
    # Not np.ascontiguousarray alone: it makes a 0-d array (a scalar input) 1-d.
    return array if array.flags.c_contiguous else np.ascontiguousarray(array)
