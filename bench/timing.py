"""Timing shared by the benchmarks: interleaved runs, so load on the machine hits every model alike."""
from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import onnx_graphsurgeon as gs
import onnxruntime

from graphopt.ir import ort


def interleaved_ms(models: dict[str, gs.Graph], feeds: dict, repeat: int, threads: int) -> dict[str, list[float]]:
    """Per model, `repeat` timed runs taken in turn with the others' (order rotated each round)."""
    sessions = {k: ort.session(g, optimize=True, threads=threads) for k, g in models.items()}
    for sess in sessions.values():
        for _ in range(10):
            sess.run(None, feeds)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    names = list(sessions)
    for i in range(repeat):
        for name in names[i % len(names):] + names[:i % len(names)]:
            start = time.perf_counter()
            sessions[name].run(None, feeds)
            times[name].append(1000 * (time.perf_counter() - start))
    return times


def ort_median_ms(session, feeds: dict, repeat: int) -> float:
    """Median wall time in ms of `repeat` runs of an onnxruntime session."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def machine() -> dict:
    """What a result was measured on, saved beside it."""
    import tvm

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(),
            "tvm": tvm.__version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}
