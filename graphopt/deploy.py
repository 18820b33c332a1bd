"""Compile an optimized graph for a target with TVM, and measure the library where it can run.

The library's outputs are compared with onnxruntime on the original model (fidelity) and timed
beside onnxruntime (latency). Libraries for another architecture or for a GPU this machine lacks
are built but not run; the report says why.
"""
from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt import codegen
from graphopt.codegen import backends
from graphopt.codegen.targets import Target
from graphopt.ir import fidelity
from graphopt.ir.data import Batching, input_specs, is_static

# Fidelity of a static batch-1 library is measured on at most this many samples, one at a time.
MAX_SAMPLES = 64


def build_for_target(graph: gs.Graph, target: Target, out_dir: str | os.PathLike,
                     feeds: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                     database: str | os.PathLike | None = None) -> dict:
    """Compile `graph` into `out_dir` and return the report's `codegen` section."""
    result = codegen.compile(graph, target, out_dir, database=database, shapes=library_shapes(graph, feeds))
    entry = next(iter(result.manifest["libraries"].values())) if "libraries" in result.manifest else {}
    section = {"target": target.name, "tvm_target": target.tvm, "library": str(result.library),
               "manifest": str(result.manifest_path), "build_seconds": round(result.seconds, 3),
               "cuda_device_code": entry.get("cuda_device_code")}
    if result.host:
        section["host"] = list(result.host)
    reason = backends.of(target).cannot_run_here(target)
    if reason:
        section["not_run"] = reason
        return section
    lib = codegen.load(result.library)
    batches = _batches(lib, feeds)
    runs = [lib.run(b) for b in batches]
    outputs = {name: np.concatenate([r[name] for r in runs]) for name in runs[0]}
    ref = {k: v[:len(outputs[k])] for k, v in reference.items()}
    section["fidelity"] = {k: m.as_dict() for k, m in fidelity.compare(ref, outputs).items()}
    section["latency_ms"] = round(lib.benchmark(batches[0], repeat=50), 4)
    return section


def library_shapes(graph: gs.Graph, feeds: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """The static shape to build each input that has symbolic dims for: one run of `feeds` (a
    symbolic batch 1, every other dim as the data has it), so that the static-shaped library runs
    on the data its fidelity is measured with. Codegen alone would set every symbolic dim to 1."""
    specs = input_specs(graph)
    sample = Batching.of(specs, feeds).sample_shapes(feeds)
    return {s.name: tuple(int(d) for d in sample[s.name]) for s in specs
            if s.shape is not None and not all(is_static(d) for d in s.shape) and s.name in sample}


def target_timer(target: Target) -> Callable[[onnx.ModelProto, dict[str, np.ndarray]], float] | None:
    """What passes that choose by measuring time models with (`PassContext.latency`): the model
    compiled by TVM for `target` on this machine, or None (onnxruntime) where graphopt cannot time
    `target` here."""
    if not backends.of(target).can_time_here(target):
        return None
    from graphopt.codegen import measure

    return measure.latency(target)


def _batches(lib: codegen.CompiledModel, feeds: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """The feeds cut into the library's static batch size, at most MAX_SAMPLES pieces."""
    first = lib.inputs[0]
    size = first["shape"][0] if first["shape"] else 0
    data = feeds[first["name"]]
    if not size or data.ndim == 0 or data.shape[0] == size:
        return [{s["name"]: feeds[s["name"]] for s in lib.inputs}]
    count = min(data.shape[0] // size, MAX_SAMPLES)
    return [{s["name"]: feeds[s["name"]][i * size:(i + 1) * size] for s in lib.inputs} for i in range(count)]


def tune_for_target(graph: gs.Graph, target: Target, database: str | os.PathLike, trials: int,
                    seconds: float | None, progress: Callable[[int, int, float | None], None] | None,
                    feeds: dict[str, np.ndarray] | None = None) -> dict:
    """Tune with MetaSchedule into `database` and return the report's `tuning` section. Give the
    `feeds` that `build_for_target` gets, so that the kernels tuned have the shapes built."""
    from graphopt.codegen import tune

    shapes = None if feeds is None else library_shapes(graph, feeds)
    result = tune.tune(graph, target, database, trials=trials, seconds=seconds, progress=progress, shapes=shapes)
    return {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in vars(result).items()}

