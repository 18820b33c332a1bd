"""One backend per device kind: everything that differs between compiling for, exporting for and
running on a CPU or a CUDA GPU, so that build, runtime, tune, measure and deploy ask the target's
backend (`of(target)`) instead of branching on the device.

After TVM's per-backend Relax pipelines (`tvm.relax.backend.<kind>.pipeline`, chosen by the
target's kind). A new device kind is a module with one backend object, a row in `BACKENDS`, and
its rows in `graphopt.codegen.targets` (`TARGETS`, `_KINDS`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

from graphopt.codegen import cpu_backend, cuda_backend
from graphopt.codegen.targets import Target


class Backend(Protocol):
    """What graphopt does differently per device kind."""

    # The device kind: `Target.device`, the manifest's "device", and this backend's key in BACKENDS.
    device: str

    def lowering_passes(self, target: Target) -> list:
        """Relax passes lowering every operator to fused TIR kernels, unscheduled: the workloads
        MetaSchedule tunes, and what a tuning database is keyed by."""

    def compile(self, mod, target: Target):
        """`tvm.compile` of a Relax module with this device's pipeline: the executable."""

    def export(self, executable, target: Target, path: Path, linker) -> str | None:
        """Write the executable's shared library to `path`, linked by `linker`; how device code is
        embedded (the manifest's "cuda_device_code"), None where there is no device code."""

    def runtime_device(self, library: Path):
        """The `tvm.runtime.Device` a loaded library runs on; CodegenError where there is none."""

    def load_hint(self, entry: dict) -> str:
        """Advice appended to the error when the library a manifest entry describes fails to load
        ("" for none)."""

    def cannot_run_here(self, target: Target) -> str | None:
        """Why a library for `target` cannot run on this machine; None when it can."""

    def can_time_here(self, target: Target) -> bool:
        """Whether graphopt can tune and time `target`'s kernels on this machine."""


BACKENDS: dict[str, Backend] = {b.device: b for b in (cpu_backend.BACKEND, cuda_backend.BACKEND)}


def of(target: Target) -> Backend:
    """The backend that compiles, exports and runs `target`'s libraries."""
    return BACKENDS[target.device]
