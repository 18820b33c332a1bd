"""Latency of a model compiled by TVM on this machine, for passes that choose by measuring.

    ctx = PassContext(latency=latency("x86"))     # winograd's select="measure" times with it

Each call compiles the model untuned into a temporary folder (what an untuned build of the whole
model would run for that layer) and returns its median latency in milliseconds. The library runs
here, so the target must be a CPU of this machine's architecture.
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable

import numpy as np
import onnx

from graphopt.codegen import backends, build, runtime
from graphopt.codegen.targets import Target, code_arch, host_arch, resolve
from graphopt.ir.errors import CodegenError

REPEAT = 50


def latency(target: str | Target) -> Callable[[onnx.ModelProto, dict[str, np.ndarray]], float]:
    """A function timing `(model, feeds)` compiled for `target` (median ms of REPEAT runs)."""
    resolved = resolve(target) if isinstance(target, str) else target
    if not backends.of(resolved).can_time_here(resolved):
        raise CodegenError(f"measuring latency runs the model here, on this {host_arch()} CPU; target "
                           f"{resolved.name} ({resolved.device}, {code_arch(resolved)}) cannot run here")

    def measure(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
        with tempfile.TemporaryDirectory(prefix="graphopt-latency-") as folder:
            result = build.compile(model, resolved, folder)
            return runtime.load(result.library).benchmark(feeds, repeat=REPEAT)

    return measure
