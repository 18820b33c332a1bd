"""Compile an optimized graph for a target with TVM, and measure the library where it can run.

The library's outputs are compared with onnxruntime on the original model (fidelity) and timed
beside onnxruntime (latency). Libraries for another architecture or for a GPU this machine lacks
are built but not run; the report says why.

TVM's C++ side logs straight to file descriptor 2, and TVM 0.27 has no setting for its level
(`TVM_LOG_DEBUG` only adds debug output), so warnings that mean nothing to a user ("BlockBuilder
destroyed with remaining blocks" after a converter's fallback, MetaSchedule's note on pool_max
blocks) would be printed amid graphopt's own lines. Building and tuning run with fd 2 captured
(`quiet_tvm`); every other line captured, an error included, is written to stderr afterwards.
`progress` callbacks get one line per long silent phase (compiling, checking, timing); only
graphopt.cli prints them.
"""
from __future__ import annotations

import contextlib
import gc
import io
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt import codegen
from graphopt.codegen import backends
from graphopt.codegen.targets import Target
from graphopt.ir import fidelity
from graphopt.ir.ort import Latency
from graphopt.ir.data import Batching, input_specs, is_static

# Fidelity of a static batch-1 library is measured on at most this many samples, one at a time.
MAX_SAMPLES = 64
# Timed runs of the library (after warm-up), from which its median latency and spread come.
REPEAT = 50
# TVM warnings that say nothing a user can act on; any other line TVM writes is shown.
TVM_NOISE = re.compile(r"BlockBuilder destroyed with remaining blocks|Warning:.*pool_max")


def build_for_target(graph: gs.Graph, target: Target, out_dir: str | os.PathLike,
                     feeds: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                     database: str | os.PathLike | None = None,
                     progress: Callable[[str], None] | None = None) -> dict:
    """Compile `graph` into `out_dir` and return the report's `codegen` section: `latency_ms` is
    the median of REPEAT runs and `latency_spread_pct` half their interquartile range, as a
    percentage of it (`ir.ort.Latency`)."""
    say = progress or (lambda line: None)
    say(f"compiling for {target.name} with TVM")
    with quiet_tvm():
        result = codegen.compile(graph, target, out_dir, database=database, shapes=library_shapes(graph, feeds))
    entry = next(iter(result.manifest["libraries"].values())) if "libraries" in result.manifest else {}
    section = {"target": target.name, "tvm_target": target.tvm, "library": str(result.library),
               "manifest": str(result.manifest_path), "build_seconds": round(result.seconds, 3),
               "cuda_device_code": entry.get("cuda_device_code"),
               "int8_instruction": entry.get("int8_instruction")}
    if result.host:
        section["host"] = list(result.host)
    reason = backends.of(target).cannot_run_here(target)
    if reason:
        section["not_run"] = reason
        return section
    lib = codegen.load(result.library)
    batches = _batches(lib, feeds)
    say(f"checking the library against onnxruntime on {len(batches)} run(s)")
    runs = [lib.run(b) for b in batches]
    outputs = {name: np.concatenate([r[name] for r in runs]) for name in runs[0]}
    ref = {k: v[:len(outputs[k])] for k, v in reference.items()}
    section["fidelity"] = {k: m.as_dict() for k, m in fidelity.compare(ref, outputs).items()}
    say(f"timing the library ({REPEAT} runs)")
    latency = library_latency(lib, batches[0])
    section["latency_ms"] = round(latency.median_ms, 4)
    section["latency_spread_pct"] = round(latency.spread_pct, 1)
    return section


def library_latency(lib: codegen.CompiledModel, feeds: dict[str, np.ndarray], repeat: int = REPEAT) -> Latency:
    """The median and spread of `repeat` runs of the library, each timed alone by its own
    `benchmark` (inputs already on the device), after its warm-up."""
    lib.benchmark(feeds, repeat=1, warmup=10)
    return Latency.of([lib.benchmark(feeds, repeat=1, warmup=0) / 1000 for _ in range(repeat)])


@contextlib.contextmanager
def quiet_tvm() -> Iterator[None]:
    """Capture what is written to file descriptor 2 (TVM's C++ log, from this process and the
    workers it starts) and afterwards write it to stderr less the lines TVM_NOISE matches. Python's
    own sys.stderr writes to the real stderr meanwhile, so progress lines appear at once."""
    try:
        fd = sys.__stderr__.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):  # no real stderr (embedded): nothing to hide
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    python_stderr = sys.stderr
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), fd)
        if python_stderr is sys.__stderr__:  # a test's capture stays as it is
            sys.stderr = open(saved, "w", closefd=False, buffering=1)
        try:
            yield
        finally:
            gc.collect()  # a BlockBuilder held in a reference cycle warns when it is collected
            if sys.stderr is not python_stderr:
                sys.stderr.close()
                sys.stderr = python_stderr
            os.dup2(saved, fd)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                    if not TVM_NOISE.search(line)]
            if kept:
                python_stderr.write("".join(kept))
                python_stderr.flush()


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


def tune_for_target(graph: gs.Graph | list[gs.Graph], target: Target, database: str | os.PathLike, trials: int,
                    seconds: float | None, progress: Callable[[int, int, float | None], None] | None,
                    feeds: dict[str, np.ndarray] | None = None, remote=None) -> dict:
    """Tune with MetaSchedule into `database` and return the report's `tuning` section. Give the
    `feeds` that `build_for_target` gets, so that the kernels tuned have the shapes built. With
    `remote` (a `codegen.rpc.Remote`), the kernels are measured on the devices of its RPC tracker.
    A list of graphs tunes their kernels together (then without `feeds`)."""
    from graphopt.codegen import rpc, tune

    shapes = None if feeds is None else library_shapes(graph, feeds)
    with quiet_tvm():
        result = tune.tune(graph, target, database, trials=trials, seconds=seconds, progress=progress, shapes=shapes,
                           remote=remote)
    section = {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in vars(result).items()}
    if remote is not None:
        section["rpc"] = {"tracker": remote.address, "key": remote.key}
        note = rpc.emulated(rpc.connect(remote))
        if note:
            section["rpc"]["emulated"] = note
    return section

