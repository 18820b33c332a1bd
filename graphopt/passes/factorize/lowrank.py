"""What the factorization passes share: options, the choice of ranks (uniform or by sensitivity),
the walk over layers, and the stats.

A pass built on `LowRankPass` says which nodes it looks at (`ops`), how it examines one
(`examine`: pure, a `MatchResult` that binds the weight or says why not), how it decomposes the
weight (`decompose`: the SVDs, computed once per layer however many ranks are then tried), how it
truncates that under a rank criterion (`plan`: a `Plan`, or the reason it would not pay), and how
it rewrites the node (`rewrite`, through the rewriter). Planning every layer before rewriting any
keeps matching free of half-rewritten graphs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir.data import input_specs, random_feeds
from graphopt.ir.errors import PipelineError
from graphopt.passes import sensitivity
from graphopt.passes.base import Pass, PassContext, PassResult
from graphopt.passes.factorize.rank import Criterion
from graphopt.pattern import MatchResult, Rewriter

# The refusal that marks the halves of an earlier factorization; sensitivity allocation reads it.
ALREADY_FACTORED = "already factored"


@dataclass(frozen=True)
class Options:
    """Rank choice, one of: `rank`, `energy`, `ratio` (fraction of parameters kept) or
    method="vbmf"; with allocation="sensitivity", `ratio` is a global budget instead, spread over
    the layers by their sensitivity measured at `ratios` (fractions of a layer's parameters removed)."""
    rank: int | None = None
    energy: float | None = None
    ratio: float | None = None
    method: str | None = None
    allocation: str = "uniform"
    ratios: tuple[float, ...] = (0.25, 0.5, 0.7, 0.8, 0.9)

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


@dataclass
class Plan:
    """A decomposition ready to be written: the factors, and what it costs and keeps."""
    ranks: dict[str, int]
    factors: tuple[np.ndarray, ...]
    params: tuple[int, int]  # before, after
    macs: tuple[int, int]  # before, after
    weight_error: float  # relative Frobenius error of the reconstructed weight
    extra: dict = field(default_factory=dict)

    def as_stats(self, op: str, criterion: Criterion) -> dict:
        return {"op": op, "criterion": criterion.describe(), "ranks": self.ranks,
                "params": {"before": self.params[0], "after": self.params[1]},
                "macs": {"before": self.macs[0], "after": self.macs[1]},
                "weight_error": round(self.weight_error, 6), **self.extra}


def no_saving(what: str, unit: str, before: int, after: int) -> str:
    return f"{what}: factors need {after:,} {unit} where the layer has {before:,}; no saving"


class LowRankPass(Pass):
    """Examine every `ops` node, plan each accepted one, rewrite, and report per layer."""

    ops: ClassVar[tuple[str, ...]] = ()
    Options = Options

    def examine(self, graph: gs.Graph, node: gs.Node) -> MatchResult:
        raise NotImplementedError

    def decompose(self, node: gs.Node, m: MatchResult) -> Any:
        raise NotImplementedError

    def plan(self, node: gs.Node, m: MatchResult, decomposition: Any, criterion: Criterion) -> Plan | str:
        raise NotImplementedError

    def rewrite(self, rw: Rewriter, node: gs.Node, m: MatchResult, plan: Plan) -> None:
        raise NotImplementedError

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        found, refused = self._examine_all(graph)
        decompositions: dict[str, Any] = {}  # by node name, made when first needed
        stats: dict = {"allocation": self.options.allocation}
        criteria = self._criteria(graph, found, refused, decompositions, ctx, stats)
        planned, skipped = [], []
        for node, m in found:
            criterion = criteria.get(node.name)
            if criterion is None:
                reason = stats.get("budget", "sensitivity allocation kept it whole")
                skipped.append({"node": node.name, "reason": reason})
                continue
            plan = self.plan(node, m, self._decomposition(decompositions, node, m), criterion)
            if isinstance(plan, str):
                refused.append({"node": node.name, "reason": plan})
            else:
                planned.append((node, m, plan, criterion))
        self._rewrite_all(graph, planned)
        stats.update({"params_removed": sum(p.params[0] - p.params[1] for _, _, p, _ in planned),
                      "layers": {node.name: plan.as_stats(node.op, c) for node, _, plan, c in planned},
                      "refused": refused, "skipped": skipped})
        return PassResult(bool(planned), stats)

    def _decomposition(self, cache: dict[str, Any], node: gs.Node, m: MatchResult) -> Any:
        if node.name not in cache:
            cache[node.name] = self.decompose(node, m)
        return cache[node.name]

    def _rewrite_all(self, graph: gs.Graph, planned: list) -> None:
        if not planned:
            return
        rw = Rewriter(graph)
        for node, m, plan, _ in planned:
            self.rewrite(rw, node, m, plan)
        rw.commit()

    def _examine_all(self, graph: gs.Graph) -> tuple[list[tuple[gs.Node, MatchResult]], list[dict]]:
        found, refused = [], []
        for node in graph.nodes:
            if node.op not in self.ops or node.domain not in ("", "ai.onnx", None):
                continue
            m = self.examine(graph, node)
            if m:
                found.append((node, m))
            elif m.reason:
                refused.append({"node": node.name, "reason": m.reason})
        return found, refused

    def _criteria(self, graph: gs.Graph, found: list, refused: list[dict], decompositions: dict,
                  ctx: PassContext, stats: dict) -> dict[str, Criterion]:
        if self.options.allocation == "uniform":
            return {node.name: self.options.criterion() for node, _ in found}
        if any(r["reason"].startswith(ALREADY_FACTORED) for r in refused):
            # The budget is a fraction of the unfactored model; spending it again would compound.
            stats["budget"] = "graph already holds factored layers: budget not spent again"
            return {}
        if not found:
            return {}
        feeds = ctx.feeds if ctx.feeds is not None else random_feeds(input_specs(graph), ctx.seed, batch=8)
        report = (lambda done, total: ctx.progress("sensitivity", done, total)) if ctx.progress else None
        layers = [self._layer(node, m) for node, m in found]
        for node, m in found:  # once per layer, however many ratios each is tried at
            self._decomposition(decompositions, node, m)

        def apply(trial: gs.Graph, layer: sensitivity.Layer, ratio: float) -> None:
            self._apply(trial, layer, ratio, decompositions[layer.name])

        table = sensitivity.analyze(graph, layers, apply, self.options.ratios, feeds, progress=report)
        removed = sensitivity.allocate(table, 1.0 - self.options.ratio)
        stats["sensitivity"] = table.as_dict()
        stats["allocated_keep"] = {name: round(1.0 - r, 4) for name, r in removed.items()}
        return {name: Criterion(keep=1.0 - r) for name, r in removed.items() if r > 0}

    # -- sensitivity.Layerwise: the ratio is the fraction of a layer's parameters removed -------
    def layers(self, graph: gs.Graph) -> list[sensitivity.Layer]:
        found, _ = self._examine_all(graph)
        return [self._layer(node, m) for node, m in found]

    def apply_layer(self, graph: gs.Graph, layer: sensitivity.Layer, ratio: float) -> None:
        self._apply(graph, layer, ratio, None)

    @staticmethod
    def _layer(node: gs.Node, m: MatchResult) -> sensitivity.Layer:
        return sensitivity.Layer(node.name, node.op, int(m["weight"].values.size))

    def _apply(self, graph: gs.Graph, layer: sensitivity.Layer, ratio: float, decomposition: Any) -> None:
        """Factor one layer of `graph` (a trial copy) keeping 1 - ratio of its parameters;
        `decomposition`, when given, is that of the same weight in the graph the copy came from."""
        node = next(n for n in graph.nodes if n.name == layer.name)
        m = self.examine(graph, node)
        if not m:
            return
        decomposition = self.decompose(node, m) if decomposition is None else decomposition
        plan = self.plan(node, m, decomposition, Criterion(keep=1.0 - ratio))
        if not isinstance(plan, str):
            rw = Rewriter(graph)
            self.rewrite(rw, node, m, plan)
            rw.commit()
