"""What the factorization passes share: options, the choice of ranks (uniform or by sensitivity),
the per-layer decision, and the `Layerwise` methods `graphopt sensitivity` calls.

A pass built on `LowRankPass` (a `LayerPass`) says which nodes it looks at (`ops`), how it examines
one (`examine`: pure, a `Match` that binds the weight, or `Refused`), how it decomposes the weight
(`decompose`: the SVDs, computed once per layer however many ranks are then tried), how it
truncates that under a rank criterion (`truncate`: a `Plan`, or `Refused` when it would not pay),
and how it writes the factors in place of the node (`factor`, through the rewriter).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir.data import input_specs, random_feeds
from graphopt.ir.errors import PipelineError, Refused
from graphopt.passes import sensitivity
from graphopt.passes.base import Layer, LayerOptions, LayerPass, PassContext, PassResult, option
from graphopt.passes.factorize.rank import Criterion
from graphopt.pattern import Rewriter

# The refusal that marks the halves of an earlier factorization; sensitivity allocation reads it.
ALREADY_FACTORED = "already factored"


@dataclass(frozen=True)
class Options(LayerOptions):
    """Rank choice, one of: `rank`, `energy`, `ratio` (fraction of parameters kept) or
    method="vbmf"; with allocation="sensitivity", `ratio` is a global budget instead, spread over
    the layers by their sensitivity measured at `ratios` (fractions of a layer's parameters removed)."""
    rank: int | None = option(None, "the rank kept (capped at each matrix's or mode's size)")
    energy: float | None = option(None, "fraction of the squared singular values kept, in (0, 1]")
    ratio: float | None = option(None, "fraction of each layer's parameters kept, in (0, 1]; with "
                                       "allocation='sensitivity', of all these layers' parameters")
    method: str | None = option(None, "'vbmf': the rank empirical variational Bayesian matrix factorization keeps")
    allocation: str = option("uniform", "'uniform' (every layer by the same criterion) or 'sensitivity' "
                                        "(the `ratio` budget spread by measured sensitivity)")
    ratios: tuple[float, ...] = option((0.25, 0.5, 0.7, 0.8, 0.9), "fractions of a layer's parameters "
                                       "removed at which sensitivity is measured (allocation='sensitivity')")

    pass_name: ClassVar[str] = "factorize"

    def __post_init__(self):
        given = [k for k in ("rank", "energy", "ratio", "method") if getattr(self, k) is not None]
        example = f"e.g. {self.pass_name}(energy=0.95)"
        if len(given) != 1:
            raise PipelineError(f"{self.pass_name}: give exactly one of rank, energy, ratio or method='vbmf' "
                                f"(got {', '.join(given) or 'none'}; {example})")
        if self.rank is not None and self.rank < 1:
            raise PipelineError(f"{self.pass_name}: rank={self.rank} must be a positive integer")
        for key in ("energy", "ratio"):
            value = getattr(self, key)
            if value is not None and not 0 < value <= 1:
                raise PipelineError(f"{self.pass_name}: {key}={value} must be a fraction in (0, 1]")
        if self.method is not None and self.method != "vbmf":
            raise PipelineError(f"{self.pass_name}: method={self.method!r}; the only method is 'vbmf'")
        if self.allocation not in ("uniform", "sensitivity"):
            raise PipelineError(f"{self.pass_name}: allocation={self.allocation!r} must be 'uniform' or 'sensitivity'")
        if self.allocation == "sensitivity" and self.ratio is None:
            raise PipelineError(f"{self.pass_name}: allocation='sensitivity' spreads a budget of parameters; "
                                f"give it as ratio (the fraction kept), e.g. {self.pass_name}(ratio=0.5, "
                                "allocation='sensitivity')")
        sensitivity.check_ratios(self.ratios)

    def criterion(self) -> Criterion:
        return Criterion(rank=self.rank, energy=self.energy, keep=self.ratio, vbmf=self.method == "vbmf")


@dataclass(frozen=True)
class Match:
    """What `examine` binds: the constant weight and its input position."""
    weight: gs.Constant
    index: int


@dataclass
class Plan:
    """A decomposition ready to be written: the factors, and what it costs and keeps."""
    criterion: Criterion
    ranks: dict[str, int]
    factors: tuple[np.ndarray, ...]
    params: tuple[int, int]  # before, after
    macs: tuple[int, int]  # before, after
    weight_error: float  # relative Frobenius error of the reconstructed weight
    extra: dict = field(default_factory=dict)

    def decision(self, op: str) -> dict:
        return {"op": op, "criterion": self.criterion.describe(), "ranks": self.ranks,
                "params": {"before": self.params[0], "after": self.params[1]},
                "macs": {"before": self.macs[0], "after": self.macs[1]},
                "weight_error": round(self.weight_error, 6), **self.extra}


def no_saving(what: str, unit: str, before: int, after: int) -> Refused:
    return Refused(f"{what}: factors need {after:,} {unit} where the layer has {before:,}; no saving")


class LowRankPass(LayerPass):
    """Examine every `ops` node, choose each accepted layer's criterion, truncate, rewrite."""

    Options = Options

    def decompose(self, node: gs.Node, match: Match) -> Any:
        raise NotImplementedError

    def truncate(self, node: gs.Node, match: Match, decomposition: Any, criterion: Criterion) -> Plan:
        raise NotImplementedError

    def factor(self, rw: Rewriter, node: gs.Node, match: Match, plan: Plan) -> None:
        raise NotImplementedError

    def plan(self, layers: list[Layer], graph: gs.Graph, ctx: PassContext,
             result: PassResult) -> list[tuple[Layer, Plan]]:
        decompositions: dict[str, Any] = {}  # by node name, made when first needed
        result.stats["allocation"] = self.options.allocation
        criteria = self._criteria(graph, layers, decompositions, ctx, result)
        planned = []
        for layer in layers:
            criterion = criteria.get(layer.name)
            if criterion is None:
                result.skip(layer.name, result.stats.get("budget", "sensitivity allocation kept it whole"))
                continue
            try:
                planned.append((layer, self.truncate(layer.node, layer.match,
                                                     self._decomposition(decompositions, layer), criterion)))
            except Refused as e:
                result.refuse(layer.name, e.reason)
        result.stats["params_removed"] = sum(p.params[0] - p.params[1] for _, p in planned)
        return planned

    def rewrite(self, rw: Rewriter, layer: Layer, plan: Plan) -> dict:
        self.factor(rw, layer.node, layer.match, plan)
        return plan.decision(layer.node.op)

    def _decomposition(self, cache: dict[str, Any], layer: Layer) -> Any:
        if layer.name not in cache:
            cache[layer.name] = self.decompose(layer.node, layer.match)
        return cache[layer.name]

    def _criteria(self, graph: gs.Graph, layers: list[Layer], decompositions: dict, ctx: PassContext,
                  result: PassResult) -> dict[str, Criterion]:
        if self.options.allocation == "uniform":
            return {layer.name: self.options.criterion() for layer in layers}
        if any(r.reason.startswith(ALREADY_FACTORED) for r in result.refused):
            # The budget is a fraction of the unfactored model; spending it again would compound.
            result.stats["budget"] = "graph already holds factored layers: budget not spent again"
            return {}
        if not layers:
            return {}
        feeds = ctx.feeds if ctx.feeds is not None else random_feeds(input_specs(graph), ctx.seed, batch=8)
        report = (lambda done, total: ctx.progress("sensitivity", done, total)) if ctx.progress else None
        for layer in layers:  # once per layer, however many ratios each is tried at
            self._decomposition(decompositions, layer)

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
        `decomposition`, when given, is that of the same weight in the graph the copy came from."""
        node = next(n for n in graph.nodes if n.name == layer.name)
        try:
            match = self.examine(node, graph)
            decomposition = self.decompose(node, match) if decomposition is None else decomposition
            plan = self.truncate(node, match, decomposition, Criterion(keep=1.0 - ratio))
        except Refused:
            return  # no saving at this ratio: the layer stays whole, and measures as such
        rw = Rewriter(graph)
        self.factor(rw, node, match, plan)
        rw.commit()


def _sized(layer: Layer) -> sensitivity.Layer:
    return sensitivity.Layer(layer.name, layer.node.op, int(layer.match.weight.values.size))

