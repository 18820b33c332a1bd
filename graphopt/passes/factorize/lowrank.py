"""What the factorization passes share: options, the choice of ranks (uniform or by sensitivity),
the calibration statistics of the data-aware method, the per-layer decision, and the `Layerwise`
methods `graphopt sensitivity` calls.

A pass built on `LowRankPass` (a `LayerPass`) says which nodes it looks at (`ops`), how it examines
one (`examine`: pure, a `Match` that binds the weight, or `Refused`), how it decomposes the weight
(`decompose`: the SVDs, computed once per layer however many ranks are then tried; from the
layer's input `Moments` when the method is "whitened"), how it truncates that under a rank
criterion (`truncate`: a `Plan`, or `Refused` when it would not pay), and how it writes the factors
in place of the node (`factor`, through the rewriter).

method="whitened" (the default with --data) streams every layer's inputs once, on the model as the
pass receives it (graphopt.passes.activations), and keeps per layer the second moment H and the
mean; all layers are then factored from those statistics (one shot: a layer does not see how the
layers before it changed).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir.data import input_specs, random_feeds
from graphopt.ir.errors import PipelineError, Refused
from graphopt.passes import activations, sensitivity
from graphopt.passes.base import Layer, LayerOptions, LayerPass, PassContext, PassResult, option
from graphopt.passes.factorize.rank import Criterion
from graphopt.passes.factorize.whiten import Moments
from graphopt.pattern import Rewriter

# The refusal that marks the halves of an earlier factorization; sensitivity allocation reads it.
ALREADY_FACTORED = "already factored"
METHODS = ("auto", "weights", "whitened")
ALLOCATIONS = ("auto", "uniform", "sensitivity")


@dataclass(frozen=True)
class Options(LayerOptions):
    """Rank choice, one of: `rank` (a number, or "vbmf"), `energy`, `max_error` or `ratio` (fraction
    of parameters kept); with allocation="sensitivity" (the default with --data), `ratio` is a
    global budget instead, spread
    over the layers by their sensitivity measured at `ratios` (fractions of a layer's parameters
    removed). `method` chooses what the factors approximate, and so what `energy` and `max_error`
    measure: the weight ("weights") or the layer's output on the calibration data ("whitened")."""
    rank: int | str | None = option(None, "the rank kept (capped at each matrix's or mode's size), or 'vbmf': "
                                          "the rank empirical variational Bayesian matrix factorization keeps")
    energy: float | None = option(None, "fraction of the squared singular values kept, in (0, 1]: of the weight "
                                        "(method='weights') or of the layer's output on the data ('whitened')")
    max_error: float | None = option(None, "largest relative error allowed, in [0, 1): of the weight (method="
                                           "'weights') or of the layer's output on the data ('whitened'); "
                                           "energy=1-max_error**2 (factorize-tucker: split evenly between "
                                           "its two modes)")
    ratio: float | None = option(None, "fraction of each layer's parameters kept, in (0, 1]; with "
                                       "allocation='sensitivity', of all these layers' parameters")
    method: str = option("auto", "'weights' (truncated SVD of the weight), 'whitened' (truncation that minimises "
                                 "the output error on calibration inputs, then a least-squares refit); "
                                 "'auto': whitened with --data, weights without")
    damping: float = option(0.01, "whitened: added to the input second moment's diagonal, as a fraction of its "
                                  "mean, before whitening")
    allocation: str = option("auto", "'uniform' (every layer by the same criterion), 'sensitivity' (the `ratio` "
                                     "budget spread by measured sensitivity); 'auto': sensitivity with --data and "
                                     "a ratio, else uniform")
    ratios: tuple[float, ...] = option((0.25, 0.5, 0.7, 0.8, 0.9), "fractions of a layer's parameters "
                                       "removed at which sensitivity is measured (allocation='sensitivity')")

    pass_name: ClassVar[str] = "factorize"

    def __post_init__(self):
        name = self.pass_name
        if self.method == "vbmf":
            raise PipelineError(f"{name}: method='vbmf' is now rank='vbmf' (method chooses 'weights' or 'whitened')")
        given = [k for k in ("rank", "energy", "max_error", "ratio") if getattr(self, k) is not None]
        if len(given) != 1:
            raise PipelineError(f"{name}: give exactly one of rank, energy, max_error or ratio "
                                f"(got {', '.join(given) or 'none'}; e.g. {name}(energy=0.95))")
        if isinstance(self.rank, str) and self.rank != "vbmf":
            raise PipelineError(f"{name}: rank={self.rank!r} must be a positive integer or 'vbmf'")
        if isinstance(self.rank, int) and self.rank < 1:
            raise PipelineError(f"{name}: rank={self.rank} must be a positive integer or 'vbmf'")
        for key in ("energy", "ratio"):
            value = getattr(self, key)
            if value is not None and not 0 < value <= 1:
                raise PipelineError(f"{name}: {key}={value} must be a fraction in (0, 1]")
        if self.max_error is not None and not 0 <= self.max_error < 1:
            raise PipelineError(f"{name}: max_error={self.max_error} must be a fraction in [0, 1): "
                                "0.05 allows 5% error")
        if self.method not in METHODS:
            raise PipelineError(f"{name}: method={self.method!r} must be one of {', '.join(METHODS)}")
        if not 0 < self.damping < 1e3:
            raise PipelineError(f"{name}: damping={self.damping} must be positive (0.01: 1% of mean(diag H))")
        if self.allocation not in ALLOCATIONS:
            raise PipelineError(f"{name}: allocation={self.allocation!r} must be one of {', '.join(ALLOCATIONS)}")
        if self.allocation == "sensitivity" and self.ratio is None:
            raise PipelineError(f"{name}: allocation='sensitivity' spreads a budget of parameters; "
                                f"give it as ratio (the fraction kept), e.g. {name}(ratio=0.5, "
                                "allocation='sensitivity')")
        sensitivity.check_ratios(self.ratios)

    def criterion(self) -> Criterion:
        vbmf = self.rank == "vbmf"
        return Criterion(rank=None if vbmf else self.rank, energy=self.energy, max_error=self.max_error,
                         keep=self.ratio, vbmf=vbmf)


@dataclass(frozen=True)
class Match:
    """What `examine` binds: the constant weight and its input position."""
    weight: gs.Constant
    index: int


@dataclass
class Plan:
    """A decomposition ready to be written: the factors, and what it costs and keeps.
    `bias_shift`: what the whitened method adds to the layer's bias (the output mean it moved)."""
    criterion: Criterion
    ranks: dict[str, int]
    factors: tuple[np.ndarray, ...]
    params: tuple[int, int]  # before, after
    macs: tuple[int, int]  # before, after
    weight_error: float  # relative Frobenius error of the reconstructed weight
    extra: dict = field(default_factory=dict)
    bias_shift: np.ndarray | None = None

    def decision(self, op: str) -> dict:
        return {"op": op, "criterion": self.criterion.describe(), "ranks": self.ranks,
                "params": {"before": self.params[0], "after": self.params[1]},
                "macs": {"before": self.macs[0], "after": self.macs[1]},
                "weight_error": round(self.weight_error, 6), **self.extra}


@dataclass(frozen=True)
class Calibration:
    """How a layer is decomposed: its input `moments` (None: from the weight alone), the damping,
    and `fallback`, why a layer the options wanted whitened is decomposed from its weight."""
    moments: Moments | None = None
    damping: float = 0.01
    fallback: str = ""

    def describe(self) -> dict:
        method = "weights" if self.moments is None else "whitened"
        return {"method": method, **({"fallback": self.fallback} if self.fallback else {})}


def check_finite(weight: gs.Constant) -> None:
    """Refuses a weight holding NaN or Inf: no decomposition of it exists (LAPACK does not
    converge, or loops), and the layer computes NaN/Inf whatever its rank."""
    flat = np.asarray(weight.values).reshape(-1)
    step = 1 << 22  # in chunks: a mapped weight of a large model is not copied whole
    for start in range(0, flat.size, step):
        if not np.isfinite(flat[start:start + step]).all():
            raise Refused(f"weight '{weight.name}' holds NaN/Inf")


def no_saving(what: str, unit: str, before: int, after: int) -> Refused:
    return Refused(f"{what}: factors need {after:,} {unit} where the layer has {before:,}; no saving")


class LowRankPass(LayerPass):
    """Examine every `ops` node, choose each accepted layer's criterion, truncate, rewrite."""

    Options = Options

    def decompose(self, node: gs.Node, match: Match, calibration: Calibration) -> Any:
        raise NotImplementedError

    def truncate(self, node: gs.Node, match: Match, decomposition: Any, criterion: Criterion) -> Plan:
        raise NotImplementedError

    def factor(self, rw: Rewriter, node: gs.Node, match: Match, plan: Plan) -> None:
        raise NotImplementedError

    def plan(self, layers: list[Layer], graph: gs.Graph, ctx: PassContext,
             result: PassResult) -> list[tuple[Layer, Plan]]:
        decompositions: dict[str, Any] = {}  # by node name, made when first needed
        result.stats["allocation"] = allocation = self.allocation(ctx)
        calibrations = self.calibrate(graph, layers, ctx, result)

        def decompose(layer: Layer) -> Any:
            return self._decomposition(decompositions, layer, calibrations[layer.name])

        criteria = self._criteria(graph, layers, decompose, allocation, ctx, result)
        planned = []
        for layer in layers:
            criterion = criteria.get(layer.name)
            if criterion is None:
                result.skip(layer.name, result.stats.get("budget", "sensitivity allocation kept it whole"))
                continue
            try:
                planned.append((layer, self.truncate(layer.node, layer.match, decompose(layer), criterion)))
            except Refused as e:
                result.refuse(layer.name, e.reason)
        result.stats["params_removed"] = sum(p.params[0] - p.params[1] for _, p in planned)
        return planned

    def rewrite(self, rw: Rewriter, layer: Layer, plan: Plan) -> dict:
        self.factor(rw, layer.node, layer.match, plan)
        return plan.decision(layer.node.op)

    def method(self, ctx: PassContext | None) -> str:
        """The method the options choose in this context ('auto' resolved)."""
        if self.options.method != "auto":
            return self.options.method
        return "whitened" if ctx is not None and ctx.from_data else "weights"

    def calibrate(self, graph: gs.Graph, layers: list[Layer], ctx: PassContext,
                  result: PassResult) -> dict[str, Calibration]:
        """Each layer's Calibration: with method="whitened", its input moments on the calibration
        data (random inputs when the context has none), streamed once for all layers; the weight
        alone where the row view does not cover the layer."""
        method = self.method(ctx)
        result.stats["method"] = method
        damping = self.options.damping
        if method == "weights":
            return {layer.name: Calibration(damping=damping) for layer in layers}
        why = {layer.name: activations.supported(layer.node) for layer in layers}
        nodes = [layer.node for layer in layers if why[layer.name] is None]
        stats = {}
        if nodes:
            feeds = ctx.feeds
            if feeds is None:
                feeds = random_feeds(input_specs(graph), ctx.seed, batch=8)
                result.stats["calibration"] = "random inputs (no data given)"
            report = (lambda done, total: ctx.progress("calibrate", done, total)) if ctx.progress else None
            stats = activations.statistics(graph, nodes, feeds, progress=report)
        return {layer.name: Calibration(Moments.of(stats[layer.name]), damping) if layer.name in stats
                else Calibration(damping=damping, fallback=f"whitened: {why[layer.name]}") for layer in layers}

    def _decomposition(self, cache: dict[str, Any], layer: Layer, calibration: Calibration) -> Any:
        if layer.name not in cache:
            cache[layer.name] = self.decompose(layer.node, layer.match, calibration)
        return cache[layer.name]

    def allocation(self, ctx: PassContext | None) -> str:
        """The allocation the options choose in this context ('auto' resolved): measured
        sensitivity needs a budget (ratio) and real data to be worth its cost."""
        if self.options.allocation != "auto":
            return self.options.allocation
        return "sensitivity" if ctx is not None and ctx.from_data and self.options.ratio is not None else "uniform"

    def _criteria(self, graph: gs.Graph, layers: list[Layer], decompose: Callable[[Layer], Any], allocation: str,
                  ctx: PassContext, result: PassResult) -> dict[str, Criterion]:
        if allocation == "uniform":
            return {layer.name: self.options.criterion() for layer in layers}
        if any(r.reason.startswith(ALREADY_FACTORED) for r in result.refused):
            # The budget is a fraction of the unfactored model; spending it again would compound.
            result.stats["budget"] = "graph already holds factored layers: budget not spent again"
            return {}
        if not layers:
            return {}
        feeds = ctx.feeds if ctx.feeds is not None else random_feeds(input_specs(graph), ctx.seed, batch=8)
        report = (lambda done, total: ctx.progress("sensitivity", done, total)) if ctx.progress else None
        # once per layer, however many ratios each is tried at
        decompositions = {layer.name: decompose(layer) for layer in layers}

        def apply(trial: gs.Graph, layer: sensitivity.Layer, ratio: float) -> None:
            self._apply(trial, layer, ratio, decompositions[layer.name])

        table = sensitivity.analyze(graph, [_sized(layer) for layer in layers], apply, self.options.ratios, feeds,
                                    progress=report)
        removed = sensitivity.allocate(table, 1.0 - self.options.ratio)
        result.stats["sensitivity"] = table.as_dict()
        result.stats["allocated_keep"] = {name: round(1.0 - r, 4) for name, r in removed.items()}
        return {name: Criterion(keep=1.0 - r) for name, r in removed.items() if r > 0}

    # -- sensitivity.Layerwise: the ratio is the fraction of a layer's parameters removed -------
    def layers(self, graph: gs.Graph) -> list[sensitivity.Layer]:
        return [_sized(layer) for layer in self.select(graph, PassResult(False))]

    def apply_layer(self, graph: gs.Graph, layer: sensitivity.Layer, ratio: float) -> None:
        self._apply(graph, layer, ratio, None)

    def _apply(self, graph: gs.Graph, layer: sensitivity.Layer, ratio: float, decomposition: Any) -> None:
        """Factor one layer of `graph` (a trial copy) keeping 1 - ratio of its parameters;
        `decomposition`, when given, is that of the same weight in the graph the copy came from
        (without one, as `graphopt sensitivity` calls it with no data: from the weight alone)."""
        node = next(n for n in graph.nodes if n.name == layer.name)
        try:
            match = self.examine(node, graph)
            if decomposition is None:
                decomposition = self.decompose(node, match, Calibration(damping=self.options.damping))
            plan = self.truncate(node, match, decomposition, Criterion(keep=1.0 - ratio))
        except Refused:
            return  # no saving at this ratio: the layer stays whole, and measures as such
        rw = Rewriter(graph)
        self.factor(rw, node, match, plan)
        rw.commit()


def _sized(layer: Layer) -> sensitivity.Layer:
    return sensitivity.Layer(layer.name, layer.node.op, int(layer.match.weight.values.size))

