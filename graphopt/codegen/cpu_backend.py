"""The CPU backend (x86, aarch64): graphopt's CPU Relax pipeline (`cpu_pipeline`), which schedules
every kernel; the library linked by the host or a cross linker; run on `tvm.cpu()` where the
library's architecture is this machine's."""
from __future__ import annotations

from pathlib import Path

from graphopt.codegen import cpu_pipeline
from graphopt.codegen.targets import Target, code_arch, host_arch, missing_here


class CpuBackend:
    device = "cpu"

    def lowering_passes(self, target: Target) -> list:
        # The kernels the CPU pipeline would schedule by default, so that tuned and default ones compete.
        return cpu_pipeline.lowering_passes(target)

    def compile(self, mod, target: Target):
        import tvm

        # TVM's CPU pipeline schedules nothing; graphopt's schedules every kernel a database did not.
        return tvm.compile(mod, target=target.tvm_target(), relax_pipeline=cpu_pipeline.pipeline(target))

    def export(self, executable, target: Target, path: Path, linker) -> str | None:
        executable.export_library(path, fcompile=linker)
        return None

    def runtime_device(self, library: Path):
        import tvm

        return tvm.cpu(0)

    def load_hint(self, entry: dict) -> str:
        return ""

    def cannot_run_here(self, target: Target) -> str | None:
        arch = code_arch(target)
        if arch != host_arch():
            return f"built for {arch}; this machine is {host_arch()} (tools/arm_env.py runs aarch64 emulated)"
        missing = missing_here(target)
        if missing:
            return f"built for instructions this CPU lacks ({', '.join(missing)}); run it on a CPU that has them"
        return None

    def can_time_here(self, target: Target) -> bool:
        # Tuning and latency measurement run the kernels on this CPU.
        return self.cannot_run_here(target) is None


BACKEND = CpuBackend()
