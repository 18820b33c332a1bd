"""The main job as a function: run a pipeline on a model and measure what it did."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.ir import fidelity, io, ort
from graphopt.ir.data import input_specs, load_feeds, random_feeds
from graphopt.ir.graph import infer_shapes
from graphopt.passes.base import Pass, PassContext
from graphopt.passes.manager import FidelityInstrument, Instrument, PassManager
from graphopt.passes.pipeline import Pipeline
from graphopt.report import summarize

# Fidelity is measured on at most this many samples of the given data, to bound the time it takes.
FIDELITY_SAMPLES = 256


@dataclass
class Optimized:
    graph: gs.Graph
    report: dict
    feeds: dict[str, np.ndarray]      # the inputs fidelity was measured on
    reference: dict[str, np.ndarray]  # the original model's outputs on them


def optimize(model: str | os.PathLike | gs.Graph, passes: str | list[Pass] | Pipeline = "canonicalize",
             data: str | os.PathLike | dict[str, np.ndarray] | None = None, verify: bool = True,
             instruments: tuple[Instrument, ...] = (), seed: int = 0, latency: bool = True,
             target_timer: Callable[[onnx.ModelProto, dict[str, np.ndarray]], float] | None = None) -> Optimized:
    """Run `passes` on `model` (a path or a graph, which is not modified) and report sizes, MACs,
    per-pass stats, fidelity against the original in onnxruntime and, when asked, onnxruntime
    latency before and after (one sample, median of 20 runs). `target_timer` times a model on the
    deployment target for passes that choose by measuring (default: onnxruntime here)."""
    graph = io.load(model) if isinstance(model, (str, os.PathLike)) else model.copy()
    pipeline = Pipeline.parse(passes) if isinstance(passes, str) else Pipeline(passes)
    feeds = _feeds(graph, data, seed)
    # Measured before the passes run, so no copy of the original weights is kept.
    reference = ort.run(graph, feeds)
    before = summarize(infer_shapes(graph))
    sample = one_sample(graph, feeds)
    latency_before = ort.latency_ms(graph, sample) if latency else None
    checks = (FidelityInstrument(reference, feeds),) if verify else ()
    records = PassManager(pipeline, verify=verify, instruments=checks + tuple(instruments)).run(
        graph, PassContext(feeds=feeds, seed=seed, verify=verify, latency=target_timer))
    after = summarize(infer_shapes(graph))
    measured = fidelity.compare(reference, ort.run(graph, feeds))
    report = {
        "pipeline": str(pipeline),
        "passes": [r.as_dict() for r in records],
        "before": before,
        "after": after,
        "fidelity": {"inputs": "data" if data is not None else f"random (seed {seed})",
                     "outputs": {k: v.as_dict() for k, v in measured.items()}},
    }
    if latency:
        report["latency_ms"] = {"onnxruntime": {"before": round(latency_before, 4),
                                                "after": round(ort.latency_ms(graph, sample), 4)}}
    return Optimized(graph, report, feeds, reference)


def one_sample(graph: gs.Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The first sample of each input whose batch dimension is symbolic; static inputs as they are."""
    out = {}
    for spec in input_specs(graph):
        value = feeds[spec.name]
        symbolic = spec.shape and not isinstance(spec.shape[0], (int, np.integer))
        out[spec.name] = value[:1] if symbolic and value.ndim else value
    return out


def _feeds(graph: gs.Graph, data, seed: int) -> dict[str, np.ndarray]:
    specs = input_specs(graph)
    if data is None:
        return random_feeds(specs, seed)
    if isinstance(data, dict):
        return data
    return load_feeds(data, specs, limit=FIDELITY_SAMPLES)
