"""The CUDA backend: TVM's default Relax pipeline (its GPU schedules); CUDA source kept at build
time and, where nvcc is on PATH, compiled into the library as a fatbin (`graphopt.codegen.cuda`);
run on `tvm.cuda()`."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from graphopt.codegen import cuda
from graphopt.codegen.targets import Target
from graphopt.ir.errors import CodegenError

# A library built where nvcc was missing compiles its CUDA source when loaded.
_SOURCE_HINT = ("; it carries CUDA source, which loading compiles with NVRTC: `pip install cuda-bindings`, "
                "or rebuild it where nvcc is on PATH to embed compiled device code")


class CudaBackend:
    device = "cuda"

    def lowering_passes(self, target: Target) -> list:
        from tvm import relax

        # What TVM's static_shape_tuning_pipeline runs before tuning.
        return [relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings(),
                relax.pipeline.zero_pipeline()]

    def compile(self, mod, target: Target):
        import tvm

        # CUDA source, so that the device code in the library is whatever `export` decides on every machine.
        with cuda.source_codegen():
            return tvm.compile(mod, target=target.tvm_target(), relax_pipeline="default")

    def export(self, executable, target: Target, path: Path, linker) -> str | None:
        if not cuda.nvcc_available():
            executable.export_library(path, fcompile=linker)
            return cuda.SOURCE
        executable.export_library(path, fcompile=linker,
                                  fpack_imports=cuda.fatbin_packer(executable, target.tvm_target()))
        return cuda.FATBIN

    def runtime_device(self, library: Path):
        import tvm

        device = tvm.cuda(0)
        if not device.exist:
            raise CodegenError(f"{library} runs on CUDA, and TVM finds no CUDA device here")
        return device

    def load_hint(self, entry: dict) -> str:
        return _SOURCE_HINT if entry.get("cuda_device_code") == cuda.SOURCE else ""

    def cannot_run_here(self, target: Target) -> str | None:
        import tvm

        if not tvm.cuda(0).exist:
            return "built for CUDA; this machine has no GPU to run it on"
        if not cuda.nvcc_available() and not _nvrtc_importable():
            return ("built with CUDA source (no nvcc here), which loading compiles with NVRTC: "
                    "`pip install cuda-bindings`")
        return None

    def can_time_here(self, target: Target) -> bool:
        # graphopt tunes and times kernels on CPUs only: its tuner starts from the CPU default
        # schedules and runs candidates with MetaSchedule's local CPU runner.
        return False


def _nvrtc_importable() -> bool:
    try:
        return importlib.util.find_spec("cuda.bindings.nvrtc") is not None
    except ModuleNotFoundError:  # no `cuda` package at all
        return False


BACKEND = CudaBackend()
