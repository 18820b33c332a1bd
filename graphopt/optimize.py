"""The main job as a function: run a pipeline on a model and measure what it did."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.ir import fidelity, io, ort
from graphopt.ir.data import Batching, InputSpec, check_feeds, input_specs, is_static, load_feeds, random_feeds
from graphopt.ir.errors import DataError, GraphoptError
from graphopt.ir.graph import infer_shapes
from graphopt.ir.shapes import Shapes, check_input_shapes, specialize_in_place
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
             target_timer: Callable[[onnx.ModelProto, dict[str, np.ndarray]], float] | None = None,
             input_shapes: Shapes | None = None, static: bool = False, opset: int | None = None) -> Optimized:
    """Run `passes` on `model` (a path or a graph, which is not modified) and report sizes, MACs,
    per-pass stats, fidelity against the original in onnxruntime and, when asked, onnxruntime
    latency before and after (one sample, median of 20 runs). `target_timer` times a model on the
    deployment target for passes that choose by measuring (default: onnxruntime here).

    Symbolic dims take concrete values for analysis (MACs) from `input_shapes` ({input: dims}),
    else from `data` (one sample of it); random inputs get `input_shapes` too. The result keeps
    the model's symbolic dims unless `static`: then the passes see the concrete dims (all but a
    symbolic batch, so data of any size still runs) and the result has `input_shapes` (or the
    data's shapes past the batch) written in. `opset` upgrades the model to that opset first."""
    where = str(model) if isinstance(model, (str, os.PathLike)) else ""
    graph = io.load(model) if where else model.copy()
    pipeline = Pipeline.parse(passes) if isinstance(passes, str) else Pipeline(passes)
    specs = input_specs(graph)
    check_input_shapes(graph, input_shapes or {}, where)
    feeds = _feeds(specs, data, seed, input_shapes, where)
    shapes = _analysis_shapes(specs, feeds, data is not None, input_shapes or {})
    during, written = _static_shapes(specs, feeds, shapes, input_shapes or {}, where) if static else ({}, {})
    # Measured before the passes run, so no copy of the original weights is kept.
    reference = _reference(graph, feeds, data is not None, where)
    before = summarize(infer_shapes(graph), shapes=shapes)
    if opset is not None:
        graph = _upgrade(graph, opset, feeds)
    if static:
        specialize_in_place(graph, during)
    sample = one_sample(graph, feeds)
    latency_before = ort.latency_ms(graph, sample) if latency else None
    checks = (FidelityInstrument(reference, feeds),) if verify else ()
    records = PassManager(pipeline, verify=verify, instruments=checks + tuple(instruments)).run(
        graph, PassContext(feeds=feeds, seed=seed, verify=verify, latency=target_timer))
    after = summarize(infer_shapes(graph), shapes=shapes)
    measured = fidelity.compare(reference, ort.run(graph, feeds))
    latency_after = ort.latency_ms(graph, sample) if latency else None
    if static:
        specialize_in_place(graph, written)
    report = {
        "pipeline": str(pipeline),
        "passes": [r.as_dict() for r in records],
        "before": before,
        "after": after,
        "fidelity": {"inputs": "data" if data is not None else f"random (seed {seed})",
                     "outputs": {k: v.as_dict() for k, v in measured.items()}},
    }
    notes = list(getattr(getattr(graph, "props", None), "notes", ()))
    if notes:  # what loading changed deliberately (an IR version raised)
        report["notes"] = notes
    if opset is not None:
        report["opset"] = opset
    if static:
        report["static"] = True
    if latency:
        report["latency_ms"] = {"onnxruntime": {"before": round(latency_before, 4), "after": round(latency_after, 4)}}
    return Optimized(graph, report, feeds, reference)


def one_sample(graph: gs.Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One run's worth of the first sample: inputs that carry samples cut to one (or to their
    fixed batch), the others (scalars, state) as they are."""
    return Batching.of(input_specs(graph), feeds).first(feeds, 1)


def _feeds(specs: list[InputSpec], data, seed: int, input_shapes: Shapes | None, where: str) -> dict[str, np.ndarray]:
    if data is None:
        return random_feeds(specs, seed, shapes=input_shapes)
    if isinstance(data, dict):
        return check_feeds(data, specs, f"{where}: data" if where else "data")
    return load_feeds(data, specs, limit=FIDELITY_SAMPLES)


def _analysis_shapes(specs: list[InputSpec], feeds: dict[str, np.ndarray], from_data: bool,
                     input_shapes: Shapes) -> Shapes | None:
    """The input shapes MACs are counted at: `input_shapes`, then one sample of the data. Random
    inputs say nothing about the real dims, so they leave symbolic dims symbolic (the report
    lists them)."""
    shapes = Batching.of(specs, feeds).sample_shapes(feeds) if from_data else {}
    shapes.update(input_shapes)
    return shapes or None


def _static_shapes(specs: list[InputSpec], feeds: dict[str, np.ndarray], shapes: Shapes | None,
                   input_shapes: Shapes, where: str) -> tuple[Shapes, Shapes]:
    """The input shapes the passes see under --static and those written at the end. During the
    passes the symbolic batch dim of inputs that carry samples stays symbolic, so calibration and
    fidelity still run on all the data; at the end it takes the value --input-shape gives it."""
    unknown = [s.name for s in specs if s.shape and any(not is_static(d) for d in s.shape[1:])
               and s.name not in (shapes or {})]
    if unknown:  # random inputs give no dims to write
        raise DataError(f"{where or 'model'}: --static needs the dims of input {', '.join(map(repr, unknown))}: "
                        f"give --input-shape NAME=D0,D1,... or --data")
    batched = Batching.of(specs, feeds).batched
    during = {}
    for s in specs:
        shape = (shapes or {}).get(s.name)
        if shape is not None:
            keep = s.name in batched and s.symbolic_batch
            during[s.name] = ((s.shape[0],) + tuple(shape[1:])) if keep else tuple(shape)
    return during, {**during, **input_shapes}


def _reference(graph: gs.Graph, feeds: dict[str, np.ndarray], from_data: bool, where: str) -> dict[str, np.ndarray]:
    """The original model's outputs; random inputs whose symbolic dims were set to 1 may not run,
    and then the way out is to give the dims."""
    try:
        return ort.run(graph, feeds)
    except GraphoptError as e:
        symbolic = [f"{s.name} [{', '.join(map(str, s.shape))}]" for s in input_specs(graph)
                    if s.shape and any(not is_static(d) for d in s.shape[1:])]
        if from_data or not symbolic:
            raise
        raise DataError(f"{where or 'model'}: random inputs with the symbolic dims of {', '.join(symbolic)} set "
                        f"to 1 do not run ({e}); give --input-shape NAME=D0,D1,... or --data") from None


def _upgrade(graph: gs.Graph, version: int, feeds: dict[str, np.ndarray]) -> gs.Graph:
    from graphopt.ir import opset  # the opset converter is loaded only when asked for

    return opset.upgrade(graph, version, feeds)
