"""Sensitivity analysis: what one lossy transformation of one layer costs, and a budget spread
over layers by that cost.

    table = analyze(graph, layers, apply, ratios=(0.25, 0.5, 0.75), feeds=feeds, labels=y)
    ratios = allocate(table, budget=0.5)   # {layer: ratio}; sum of size * ratio = 0.5 * total size

`apply(graph_copy, layer, ratio)` applies the transformation to one layer of a copy of the graph
(pruning at that sparsity, a factorization at that rank fraction, ...). Each copy runs in
onnxruntime against the untouched graph on the same feeds: the lowest cosine similarity and SQNR
over the outputs, and the top-1 accuracy of the first output when labels are given. A pass offers
itself to `analyze_pass` (and to `graphopt sensitivity`) by having the `Layerwise` methods.

`allocate` assumes, as layer-wise sensitivity allocation usually does, that the errors of layers
transformed together add up; it is a greedy search, not an optimum.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import fidelity, ort, verify
from graphopt.ir.errors import PipelineError
from graphopt.passes.base import PassInfo

METRICS = ("cosine", "accuracy")


@dataclass(frozen=True)
class Layer:
    name: str  # the node's name
    op: str
    size: int  # what a budget counts for this layer: parameters for pruning, or MACs


@dataclass(frozen=True)
class Point:
    ratio: float
    cosine: float  # lowest over the outputs
    sqnr_db: float  # lowest over the outputs
    accuracy: float | None = None


@dataclass
class Table:
    layers: list[Layer]
    points: dict[str, list[Point]]  # layer name -> one point per ratio, in increasing ratio
    baseline_accuracy: float | None = None

    @property
    def ratios(self) -> list[float]:
        return [p.ratio for p in next(iter(self.points.values()), [])]

    def as_dict(self) -> dict:
        return {"ratios": self.ratios, "baseline_accuracy": self.baseline_accuracy,
                "layers": [{**asdict(layer), "points": [_rounded(p) for p in self.points[layer.name]]}
                           for layer in self.layers]}


class Layerwise(Protocol):
    """A pass that can be applied to one layer at a ratio in (0, 1]."""

    info: PassInfo

    def layers(self, graph: gs.Graph) -> list[Layer]: ...

    def apply_layer(self, graph: gs.Graph, layer: Layer, ratio: float) -> None: ...


Apply = Callable[[gs.Graph, Layer, float], None]
Progress = Callable[[int, int], None]


def check_ratios(ratios: Sequence[float]) -> tuple[float, ...]:
    """Sorted, distinct ratios, each in (0, 1]; a PipelineError names the bad ones."""
    bad = [r for r in ratios if not 0 < r <= 1]
    if bad or not ratios:
        raise PipelineError(f"sensitivity ratios must be in (0, 1] (got {list(ratios)})")
    return tuple(sorted(set(float(r) for r in ratios)))


def analyze(graph: gs.Graph, layers: Sequence[Layer], apply: Apply, ratios: Sequence[float],
            feeds: dict[str, np.ndarray], labels: np.ndarray | None = None,
            progress: Progress | None = None) -> Table:
    """Apply `apply` to each layer alone (on a copy of `graph`) at each ratio, and measure."""
    ratios = check_ratios(ratios)
    reference = ort.run(graph, feeds)
    first = next(iter(reference))
    if labels is not None and len(labels) != len(reference[first]):
        raise PipelineError(f"{len(labels)} labels for {len(reference[first])} samples of output '{first}'")
    baseline = None if labels is None else _accuracy(reference[first], labels)
    points: dict[str, list[Point]] = {}
    total, done = len(layers) * len(ratios), 0
    for layer in layers:
        points[layer.name] = []
        for ratio in ratios:
            trial = graph.copy()
            apply(trial, layer, ratio)
            outputs = ort.run(trial, feeds)
            points[layer.name].append(_point(ratio, reference, outputs, first, labels))
            done += 1
            if progress:
                progress(done, total)
    return Table(list(layers), points, baseline)


def analyze_pass(graph: gs.Graph, pass_: Layerwise, ratios: Sequence[float], feeds: dict[str, np.ndarray],
                 labels: np.ndarray | None = None, progress: Progress | None = None) -> Table:
    """`analyze` over the layers `pass_` would transform, with the pass doing the transformation.

    Establishes on `graph` what the pass requires (sorted nodes, inferred shapes), as the
    PassManager does before running it: a model fresh from disk may have no shapes inside.
    """
    for name in sorted(pass_.info.requires):
        establish = verify.INVARIANTS[name].establish
        if establish:
            establish(graph)
    return analyze(graph, pass_.layers(graph), pass_.apply_layer, ratios, feeds, labels, progress)


def allocate(table: Table, budget: float, metric: str = "cosine") -> dict[str, float]:
    """A ratio per layer such that sum(size * ratio) = budget * total size, found greedily.

    Every layer starts at ratio 0; the step taken next is the one, among each layer's step to its
    next measured ratio, that costs the least error per unit of size removed (error: 1 - cosine,
    or the accuracy lost with metric="accuracy"). The last step is taken in part, interpolating
    the ratio, so the budget is met exactly.
    """
    if not 0 <= budget <= 1:
        raise PipelineError(f"budget {budget} must be a fraction in [0, 1]")
    curves = {layer.name: [(0.0, 0.0)] + [(p.ratio, _error(table, p, metric)) for p in table.points[layer.name]]
              for layer in table.layers if layer.size > 0}
    sizes = {layer.name: layer.size for layer in table.layers}
    total = sum(sizes.values())
    goal, removed = budget * total, 0.0
    at = dict.fromkeys(curves, 0)
    ratios = {layer.name: 0.0 for layer in table.layers}
    while goal - removed > 1e-9 * total:
        steps = [(_step_cost(curves[n], at[n], sizes[n]), n) for n in curves if at[n] + 1 < len(curves[n])]
        if not steps:
            most = sum(sizes[n] * curves[n][-1][0] for n in curves) / max(total, 1)
            raise PipelineError(f"budget {budget:g} is more than the largest measured ratios remove "
                                f"({most:.3f}); add a larger ratio")
        _, name = min(steps)
        (r0, _), (r1, _) = curves[name][at[name]], curves[name][at[name] + 1]
        step = sizes[name] * (r1 - r0)
        take = min(step, goal - removed)
        ratios[name] = r0 + (r1 - r0) * take / step
        removed += take
        if take == step:
            at[name] += 1
    return ratios


def largest_budget(table: Table) -> float:
    """The largest budget `allocate` can meet: every layer at its largest measured ratio."""
    sized = [layer for layer in table.layers if layer.size > 0]
    total = sum(layer.size for layer in sized)
    return sum(layer.size * table.points[layer.name][-1].ratio for layer in sized) / max(total, 1)


def _step_cost(curve: list[tuple[float, float]], i: int, size: int) -> float:
    (r0, e0), (r1, e1) = curve[i], curve[i + 1]
    return (e1 - e0) / (size * (r1 - r0))


def _error(table: Table, point: Point, metric: str) -> float:
    if metric == "cosine":
        return 1.0 - point.cosine
    if metric == "accuracy":
        if point.accuracy is None or table.baseline_accuracy is None:
            raise PipelineError("metric 'accuracy' needs labels (an npz with y)")
        return table.baseline_accuracy - point.accuracy
    raise PipelineError(f"unknown sensitivity metric {metric!r} (metrics: {', '.join(METRICS)})")


def _point(ratio: float, reference: dict, outputs: dict, first: str, labels: np.ndarray | None) -> Point:
    measured = fidelity.compare(reference, outputs).values()
    return Point(ratio, min(m.cosine for m in measured), min(m.sqnr_db for m in measured),
                 None if labels is None else _accuracy(outputs[first], labels))


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


def _rounded(p: Point) -> dict:
    # JSON has no infinity: an untouched layer (SQNR inf) is written as null.
    return {"ratio": p.ratio, "cosine": round(p.cosine, 6),
            "sqnr_db": None if not np.isfinite(p.sqnr_db) else round(p.sqnr_db, 2), "accuracy": p.accuracy}
