"""The main job as a function: run a pipeline on a model and measure what it did."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.ir import fidelity, io, ort, stream
from graphopt.ir.data import (Batching, InputSpec, Split, check_feeds, hold_aside, input_specs, is_static, load_data,
                              random_feeds)
from graphopt.ir.errors import DataError, GraphoptError, ModelError, RuntimeRejected, VerificationError
from graphopt.ir.graph import infer_shapes
from graphopt.ir.shapes import Shapes, check_input_shapes, specialize_in_place
from graphopt.pack import pack_bytes
from graphopt.passes.base import Pass, PassContext
from graphopt.passes.gate import Gate
from graphopt.passes.manager import FidelityInstrument, Instrument, PassManager, PassRecord, SizeInstrument
from graphopt.passes.pipeline import Pipeline
from graphopt.report import summarize

# At most this many samples of the given data are read: half calibrate, half are held aside for
# fidelity, accuracy and the gate (bounding the time they take).
DATA_SAMPLES = 1024


@dataclass
class Optimized:
    graph: gs.Graph
    report: dict
    feeds: dict[str, np.ndarray]      # the inputs fidelity was measured on (held aside from calibration)
    reference: dict[str, np.ndarray]  # the original model's outputs on them


def optimize(model: str | os.PathLike | gs.Graph, passes: str | list[Pass] | Pipeline = "canonicalize",
             data: str | os.PathLike | dict[str, np.ndarray] | None = None, verify: bool = True,
             instruments: tuple[Instrument, ...] = (), seed: int = 0, latency: bool = True,
             target_timer: Callable[[onnx.ModelProto, dict[str, np.ndarray]], float] | None = None,
             input_shapes: Shapes | None = None, static: bool = False, opset: int | None = None,
             max_drop: float | None = None, min_cosine: float | None = None,
             phase: Callable[[str], None] | None = None) -> Optimized:
    """Run `passes` on `model` (a path or a graph, which is not modified) and report sizes, MACs,
    per-pass stats, fidelity against the original in onnxruntime and, when asked, onnxruntime
    latency before and after (one sample, median of 20 runs). `target_timer` times a model on the
    deployment target for passes that choose by measuring (default: onnxruntime here).

    Symbolic dims take concrete values for analysis (MACs) from `input_shapes` ({input: dims}),
    else from `data` (one sample of it); random inputs get `input_shapes` too. The result keeps
    the model's symbolic dims unless `static`: then the passes see the concrete dims (all but a
    symbolic batch, so data of any size still runs) and the result has `input_shapes` (or the
    data's shapes past the batch) written in. `opset` upgrades the model to that opset first.

    Data (`data`, with labels `y` when it has them) is split: passes calibrate on one half, and
    fidelity, top-1 accuracy and the gate are measured on the other (graphopt.passes.gate): a pass
    that drops top-1 by more than `max_drop` points, leaves an output below `min_cosine`, or (with
    neither given) misses its own LOSSY bound raises GateError. `phase` is told (one line) when a
    long step that is not a pass starts: the original model's reference run, the timing. A pipeline
    with a codebook pass (cluster-weights, ternarize, binarize) adds Deep Compression's staged
    table (`deep_compression`: bytes and top-1 original, pruned, clustered, packed as .gopt)."""
    phase = phase or (lambda line: None)
    where = str(model) if isinstance(model, (str, os.PathLike)) else ""
    graph = io.load(model) if where else model.copy()
    pipeline = Pipeline.parse(passes) if isinstance(passes, str) else Pipeline(passes)
    specs = input_specs(graph)
    check_input_shapes(graph, input_shapes or {}, where)
    split = _data(specs, data, seed, input_shapes, where)
    feeds = split.held
    shapes = _analysis_shapes(specs, feeds, data is not None, input_shapes or {})
    during, written = _static_shapes(specs, feeds, shapes, input_shapes or {}, where) if static else ({}, {})
    # Measured before the passes run, so no copy of the original weights is kept.
    phase(f"running the original model on {split.held_samples} sample(s) for reference")
    reference = _reference(graph, feeds, data is not None, where)
    gate = Gate(reference, split.labels, max_drop, min_cosine, split.held_samples)
    before = summarize(infer_shapes(graph), shapes=shapes)
    if opset is not None:
        graph = _upgrade(graph, opset, feeds)
    if static:
        specialize_in_place(graph, during)
    sample = one_sample(graph, feeds)
    if latency:
        phase("timing the original model in onnxruntime")
    latency_before = ort.measure_latency(graph, sample) if latency else None
    layers_before = ort.node_times_ms(graph, sample) if latency else None
    checks = (FidelityInstrument(reference, feeds, gate, enforce=verify),) if verify or gate.user_set else ()
    # Deep Compression's staged table needs the size after each pass (counted, not serialized).
    sizes = SizeInstrument() if any(p.name in CODEBOOK_PASSES for p in pipeline) else None
    records = PassManager(pipeline, verify=verify, instruments=checks + tuple(instruments) + ((sizes,) if sizes else ())
                          ).run(
        graph, PassContext(feeds=split.calibration, from_data=data is not None, seed=seed, verify=verify,
                           latency=target_timer))
    after = summarize(infer_shapes(graph), shapes=shapes)
    # The fidelity check ran the final graph after the last pass that changed it: not again.
    final = checks[0].latest if checks and checks[0].latest is not None else ort.run(graph, feeds)
    broken = fidelity.turned_non_finite(reference, final)
    if broken:  # with --no-verify no pass was checked on its own: the pipeline is named instead
        raise VerificationError(f"the pipeline '{pipeline}' turned output '{broken}' NaN/Inf where the original's "
                                f"is finite; nothing written")
    measured = fidelity.compare(reference, final)
    latency_after = ort.measure_latency(graph, sample) if latency else None
    layers_ms = {"before": layers_before, "after": ort.node_times_ms(graph, sample)} if latency else None
    if static:
        specialize_in_place(graph, written)
    report = {
        "pipeline": str(pipeline),
        "passes": [r.as_dict() for r in records],
        "before": before,
        "after": after,
        "fidelity": {"inputs": "data" if data is not None else f"random (seed {seed})",
                     "outputs": {k: v.as_dict() for k, v in measured.items()}},
        "data": _data_section(split, data is not None),
    }
    accuracy = _accuracy_section(gate, reference, final)
    if accuracy:
        report["accuracy"] = accuracy
    if gate.user_set:
        report["gate"] = {k: v for k, v in (("max_drop", max_drop), ("min_cosine", min_cosine)) if v is not None}
    notes = list(getattr(getattr(graph, "props", None), "notes", ()))
    if notes:  # what loading changed deliberately (an IR version raised)
        report["notes"] = notes
    if sizes is not None:
        report["deep_compression"] = _deep_compression(graph, records, sizes.sizes, before["size_bytes"], accuracy)
    if opset is not None:
        report["opset"] = opset
    if static:
        report["static"] = True
    if latency:
        report["latency_ms"] = {"onnxruntime": {
            "before": round(latency_before.median_ms, 4), "after": round(latency_after.median_ms, 4),
            "spread_pct": {"before": round(latency_before.spread_pct, 1), "after": round(latency_after.spread_pct, 1)},
            "layers": {k: {n: round(ms, 5) for n, ms in v.items()} for k, v in layers_ms.items()}}}
    return Optimized(graph, report, feeds, reference)


def one_sample(graph: gs.Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One run's worth of the first sample: inputs that carry samples cut to one (or to their
    fixed batch), the others (scalars, state) as they are."""
    return Batching.of(input_specs(graph), feeds).first(feeds, 1)


def _data(specs: list[InputSpec], data, seed: int, input_shapes: Shapes | None, where: str) -> Split:
    """The calibration and held-aside parts of `data` (an npz/folder path, or {input: array} with
    an optional "y" of labels); random inputs serve as both."""
    if data is None:
        feeds = random_feeds(specs, seed, shapes=input_shapes, source=where or "model")
        samples = Batching.of(specs, feeds).samples
        return Split(feeds, feeds, None, samples, samples, shared=True)
    if isinstance(data, dict):
        labels = data.get("y") if not any(s.name == "y" for s in specs) else None
        feeds = check_feeds({k: v for k, v in data.items() if k != "y" or labels is None}, specs,
                            f"{where}: data" if where else "data")
    else:
        feeds, labels = load_data(data, specs, limit=DATA_SAMPLES)
    return hold_aside(feeds, specs, None if labels is None else np.asarray(labels), seed)


def _data_section(split: Split, from_data: bool) -> dict:
    if not from_data:
        return {"source": "random", "calibration": "the same random inputs as fidelity"}
    if split.shared:
        return {"source": "data", "samples": split.held_samples,
                "held_aside": "none: too few samples to split; passes calibrated on the samples measured"}
    return {"source": "data", "calibration_samples": split.calibration_samples, "held_aside_samples": split.held_samples,
            "labels": split.labels is not None}


def _accuracy_section(gate: Gate, reference: dict[str, np.ndarray], final: dict[str, np.ndarray]) -> dict | None:
    before, after = gate.top1(reference), gate.top1(final)
    if before is None or after is None:
        return None
    return {"metric": gate.metric(), "before": round(before, 4), "after": round(after, 4),
            "samples": gate.samples}


def _deep_compression(graph: gs.Graph, records: list[PassRecord], sizes: list[int], original: int,
                      accuracy: dict | None) -> dict:
    """Deep Compression's stages (Han et al. 2016): the original's bytes, after the last prune-* or
    factorize-* pass (when one ran: both cut parameters before weight sharing), after the last codebook pass (cluster-weights, ternarize, binarize) and the final
    model as graphopt.pack's .gopt (Huffman-coded indices, the zeros' runs coded), each with its
    ratio to the original and top-1 where the data has labels (the record of the last pass that
    changed the model). Bytes are the serialized ONNX model's: a pruned float weight keeps its
    zeros, so pruning alone shrinks nothing until the model is packed."""
    acc = accuracy or {}

    def stage(name: str, size: int | None, top1, **extra) -> dict:
        row = {"stage": name, "bytes": size, "ratio": round(original / size, 2) if size else None, **extra}
        return {**row, "top1": top1} if top1 is not None else row

    def top1(upto: int):
        changed = [r for r in records[:upto + 1] if r.modified]
        return changed[-1].top1 if changed else acc.get("before")

    stages = [stage("original", original, acc.get("before"))]
    for name, matches in (("pruned", lambda r: r.name.startswith(("prune-", "factorize-"))),
                          ("clustered", lambda r: r.name in CODEBOOK_PASSES)):
        last = max((i for i, r in enumerate(records) if matches(r)), default=None)
        if last is not None:  # `after`: the stage's passes, in the order they first ran
            after = ", ".join(dict.fromkeys(r.name for r in records[:last + 1] if matches(r)))
            stages.append(stage(name, sizes[last], top1(last), after=after))
    if stream.size(graph) > PACK_LIMIT:  # io.save moves the weights to a .data file, which pack does not take
        stages.append(stage("packed", None, None, reason="over 2 GB: the weights are saved as external data"))
    else:  # the bytes io.save writes (stream.write), so they are what `graphopt pack` packs
        _, packed = pack_bytes(b"".join(stream.chunks(graph)))
        stages.append(stage("packed", packed.packed_bytes, acc.get("after"), zlib_bytes=packed.zlib_bytes))
    return {"stages": stages}


# The passes that store weights as a codebook and indices: the "clustered" stage.
CODEBOOK_PASSES = ("cluster-weights", "ternarize", "binarize")
# Under this io.save writes the weights inline (graphopt.ir.io.PROTOBUF_LIMIT less its margin).
PACK_LIMIT = io.PROTOBUF_LIMIT - (1 << 24)


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
        outputs = ort.run(graph, feeds)
    except GraphoptError as e:
        symbolic = [f"{s.name} [{', '.join(map(str, s.shape))}]" for s in input_specs(graph)
                    if s.shape and any(not is_static(d) for d in s.shape[1:])]
        if (from_data or not symbolic) and isinstance(e, RuntimeRejected) and where:
            # The user's own model, before any pass: a fault of the file, named by its node.
            raise ModelError(where, f"onnxruntime {'rejects' if e.loading else 'fails on'} it: {e.what}", e.node
                             ) from None
        if from_data or not symbolic:
            raise
        raise DataError(f"{where or 'model'}: random inputs with the symbolic dims of {', '.join(symbolic)} set "
                        f"to 1 do not run ({e}); give --input-shape NAME=D0,D1,... or --data") from None
    bad = fidelity.first_non_finite(outputs)
    if bad:
        inputs = "the data" if from_data else "random inputs"
        raise DataError(f"{where or 'model'}: the original model's output '{bad}' holds NaN/Inf on {inputs}; "
                        "passes cannot be measured against it (check the model, or give --data it computes "
                        "finite outputs on)")
    return outputs


def _upgrade(graph: gs.Graph, version: int, feeds: dict[str, np.ndarray]) -> gs.Graph:
    from graphopt.ir import opset  # the opset converter is loaded only when asked for

    return opset.upgrade(graph, version, feeds)
