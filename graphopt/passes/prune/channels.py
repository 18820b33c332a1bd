"""prune-channels: structured filter pruning that removes channels from the graph, so the model gets
smaller and faster in any runtime.

Matches: groups of coupled channels found by the channel-dependency graph
(`graphopt.passes.prune.dependency`): the output channels of a Conv, ConvTranspose, Gemm or
MatMul with a constant weight, together with every channel axis tied to them through
BatchNormalization, activations, pools, Dropout/Identity, residual Add/Mul/Sub (all branches
lose the same indices), Concat (offsets mapped), depthwise Conv (its filters and `group` follow)
and Flatten/Reshape into a Gemm (rows c*H*W..(c+1)*H*W-1 of channel c). With
`allocation="uniform"` (the default) each group loses floor(ratio * channels) channels. With
`allocation="sensitivity"`, `ratio` is a global budget instead: the fraction of the prunable MACs
to remove (`budget_metric="params"`: of the prunable parameters), prunable MACs being those of
the layers that read or write a prunable group's channels. Each group is pruned alone at each of
`ratios` and compared with the untouched model in onnxruntime (on the calibration data, else
random inputs; graphopt.passes.sensitivity); the budget goes first to the groups that lose the
least cosine similarity per MAC, as close to the budget as whole channels allow (stats: the
table, and the budget's prunable, target and removed). This assumes the groups' errors add up,
which holds at moderate budgets: on the digits CNN it beats uniform pruning at 40-50% of the
MACs, not at 75%, where both fall near chance without fine-tuning. Either way the channels kept
are rounded up to a multiple of `round_to` and never fall below `min_channels`, and the least
important go, importance being the sum over the group's layers of each filter's L1 or L2 norm,
or of |gamma| of the BatchNormalizations on the channels (`criterion=bn_gamma`, network
slimming). `round_to` is what turns fewer MACs into speed: onnxruntime's blocked (NCHWc)
convolutions take channels in blocks of 8 (AVX2) or 16 (AVX-512) and pad or fall back to a slower
kernel otherwise; see bench/prune_channels_latency.py. Options `include` and `exclude` take node
names or fnmatch patterns: a group is pruned when one of its layers is included and none is
excluded.
Refuses, leaving the group whole and giving the reason in stats: channels that reach a graph
output, pass through an op the analysis does not follow, or come from a graph input; weights
shared with another node or not constant; dynamic shapes where a Flatten or Reshape needs them;
bn_gamma on channels with no BatchNormalization.
Guarantees: LOSSY(cosine >= 0.75), the bound the tests hold the bundled builders and the digits
CNN to at the default ratio 0.25 (l1, uniform); larger ratios lose more without fine-tuning.
Graph outputs keep their shapes; at ratio 0 the graph is unchanged.
Verified by: tests/passes/prune/test_channels.py and test_dependency.py against onnxruntime
(ResNet, bottleneck ResNet, MobileNet, MLP, Transformer builders, the digits CNN) and TVM.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir.cost import count, macs
from graphopt.ir.data import input_specs, random_feeds
from graphopt.ir.errors import PipelineError
from graphopt.ir.verify import SHAPES_INFERRED, TOPOSORTED
from graphopt.passes import sensitivity
from graphopt.passes.base import LOSSY, Pass, PassContext, PassInfo, PassResult
from graphopt.passes.prune.channel_rules import analyze
from graphopt.passes.prune.dependency import FILTER, GAMMA, INPUT, DependencyGraph, Group, Segment, Slice
from graphopt.pattern import Rewriter

CRITERIA = ("l1", "l2", "bn_gamma")
ALLOCATIONS = ("uniform", "sensitivity")
BUDGET_METRICS = ("macs", "params")


@dataclass(frozen=True)
class Options:
    ratio: float = 0.25
    criterion: str = "l1"
    round_to: int = 1
    min_channels: int = 1
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    allocation: str = "uniform"
    budget_metric: str = "macs"
    ratios: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9)

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise PipelineError(f"prune-channels: ratio={self.ratio} must be in [0, 1) (the fraction of "
                                "channels removed per group, or with allocation='sensitivity' of the "
                                "prunable MACs or parameters)")
        if self.criterion not in CRITERIA:
            raise PipelineError(f"prune-channels: criterion={self.criterion!r} must be one of {', '.join(CRITERIA)}")
        if self.round_to < 1 or self.min_channels < 1:
            raise PipelineError("prune-channels: round_to and min_channels must be at least 1")
        if self.allocation not in ALLOCATIONS:
            raise PipelineError(f"prune-channels: allocation={self.allocation!r} must be 'uniform' or 'sensitivity'")
        if self.budget_metric not in BUDGET_METRICS:
            raise PipelineError(f"prune-channels: budget_metric={self.budget_metric!r} must be 'macs' or 'params'")
        sensitivity.check_ratios(self.ratios)


@dataclass
class Survey:
    """A graph's channel groups, each group's channel importance, and why some stay whole."""
    dg: DependencyGraph
    scores: dict[int, np.ndarray]
    groups: list[Group]  # those with layers
    refused: dict[int, str]

    @property
    def prunable(self) -> list[Group]:
        return [g for g in self.groups if g.id not in self.refused]


class PruneChannels(Pass):
    name = "prune-channels"
    info = PassInfo(LOSSY("cosine", 0.75), requires=frozenset({TOPOSORTED, SHAPES_INFERRED}),
                    idempotent=False)  # each run removes `ratio` of what is left
    Options = Options

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        o = self.options
        before = _cost(graph)
        survey = self._survey(graph)
        model = CostModel(survey.dg, o.budget_metric)
        prunable = model.removed(dict.fromkeys((g.id for g in survey.prunable), 0))
        stats: dict = {"allocation": o.allocation}
        budget = {"metric": o.budget_metric, "prunable": round(prunable)}
        if o.allocation == "uniform":
            keep = {g.id: kept_count(g, o.ratio, o) for g in survey.prunable}
        else:
            budget["target"] = round(o.ratio * prunable)
            keep = self._by_sensitivity(graph, survey, model, o.ratio * prunable, ctx, stats)
        plan = {g.id: select(survey.scores[g.id], keep[g.id], g.divisions) for g in survey.prunable
                if keep.get(g.id, g.channels) < g.channels}
        if plan:
            apply(Rewriter(graph), survey.dg, plan)
        after = _cost(graph)
        stats.update({"groups": _rows(survey, keep), "pruned_groups": len(plan),
                      "refused": [{"node": ", ".join(g.layers), "reason": survey.refused[g.id]}
                                  for g in survey.groups if g.id in survey.refused],
                      "macs": [before[0], after[0]], "params": [before[1], after[1]],
                      "budget": {**budget, "removed": round(model.removed(keep))}})
        return PassResult(bool(plan), stats)

    def _survey(self, graph: gs.Graph) -> Survey:
        dg = analyze(graph)
        scores = importance(dg, self.options.criterion)
        # A group without layers holds the channels of a graph input or of a Concat operand
        # nothing follows: there is nothing to prune, and nothing to report.
        groups = [g for g in dg.groups() if g.layers]
        refused = {g.id: why for g in groups if (why := self._refusal(g, scores))}
        return Survey(dg, scores, groups, refused)

    def _refusal(self, group: Group, scores: dict[int, np.ndarray]) -> str | None:
        o = self.options
        if group.blocked:
            return "; ".join(group.reasons)
        if any(fnmatchcase(n, p) for n in group.layers for p in o.exclude):
            return "excluded by option exclude"
        if o.include and not any(fnmatchcase(n, p) for n in group.layers for p in o.include):
            return "not named by option include"
        if group.id not in scores:
            return "criterion bn_gamma: no BatchNormalization scales these channels"
        return None

    def _by_sensitivity(self, graph: gs.Graph, survey: Survey, model: CostModel, target: float,
                        ctx: PassContext, stats: dict) -> dict[int, int]:
        if target <= 0:
            return {}  # ratio 0 or nothing prunable: nothing to measure
        feeds = ctx.feeds if ctx.feeds is not None else random_feeds(input_specs(graph), ctx.seed, batch=8)
        report = (lambda done, total: ctx.progress("sensitivity", done, total)) if ctx.progress else None
        layers = _layers(graph, survey, model)
        table = sensitivity.analyze(graph, layers, self.apply_layer, self.options.ratios, feeds, progress=report)
        stats["sensitivity"] = table.as_dict()
        return fit_budget(table, {group_name(g): g for g in survey.prunable}, model.removed, target, self.options)

    # -- sensitivity.Layerwise: a layer is a channel group; the ratio, its channels removed -------
    def layers(self, graph: gs.Graph) -> list[sensitivity.Layer]:
        """The prunable groups, each sized by the MACs (or parameters) it removes per unit ratio."""
        survey = self._survey(graph)
        return _layers(graph, survey, CostModel(survey.dg, self.options.budget_metric))

    def apply_layer(self, graph: gs.Graph, layer: sensitivity.Layer, ratio: float) -> None:
        survey = self._survey(graph)
        group = next(g for g in survey.prunable if group_name(g) == layer.name)
        keep = kept_count(group, ratio, self.options)
        if keep < group.channels:
            apply(Rewriter(graph), survey.dg, {group.id: select(survey.scores[group.id], keep, group.divisions)})


def group_name(group: Group) -> str:
    """A group's name in sensitivity tables: its layers, which stay the same on a copy of the graph."""
    return "+".join(group.layers)


def _layers(graph: gs.Graph, survey: Survey, model: CostModel) -> list[sensitivity.Layer]:
    ops = {n.name: n.op for n in graph.nodes}
    # The cost is multilinear in the kept fractions, so emptying a group alone removes exactly
    # what one unit of its ratio is worth while the other groups stay whole.
    return [sensitivity.Layer(group_name(g), ops[g.layers[0]], round(model.removed({g.id: 0})))
            for g in survey.prunable]


def _rows(survey: Survey, keep: dict[int, int]) -> list[dict]:
    rows = []
    for g in survey.groups:
        why = survey.refused.get(g.id)
        rows.append({"layers": g.layers, "channels": [g.channels, g.channels if why else keep.get(g.id, g.channels)]})
        if why:
            rows[-1]["reason"] = why
    return rows


def kept_count(group: Group, ratio: float, options: Options) -> int:
    """Channels kept: the rest after removing floor(ratio * channels), rounded up to a multiple of
    `round_to` (and of the group's divisions), never below `min_channels` nor above the group."""
    step = math.lcm(options.round_to, group.divisions)
    # 0.29 * 100 is 28.999999999999996 in floating point; the epsilon makes it remove 29.
    keep = group.channels - math.floor(group.channels * ratio + 1e-9)
    keep = max(keep, options.min_channels)
    return min(group.channels, -(-keep // step) * step)


def fit_budget(table: sensitivity.Table, groups: dict[str, Group], removed: Callable[[dict[int, int]], float],
               target: float, options: Options) -> dict[int, int]:
    """Kept channels per group (by name in `table`), spread by sensitivity, whose `removed` cost
    comes closest to `target`.

    `sensitivity.allocate(table, b)` meets b in each group's linear size, which overstates what
    pruning removes: a layer between two pruned groups loses 1 - (1 - r1)(1 - r2) of its MACs, not
    r1 + r2, and channels go whole, in multiples of round_to. So b is found by bisection on the
    cost actually removed, which never falls as b grows (allocate's steps come in a fixed order).
    """
    def keep(b: float) -> dict[int, int]:
        ratios = sensitivity.allocate(table, b)
        return {g.id: kept_count(g, ratios[name], options) for name, g in groups.items()}

    lo, hi = 0.0, sensitivity.largest_budget(table)
    if removed(keep(hi)) < target:
        raise PipelineError(f"prune-channels: ratio={options.ratio} is more than pruning every group at the largest "
                            f"measured ratio ({max(options.ratios):g}) removes; add a larger one to `ratios`")
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if removed(keep(mid)) >= target else (mid, hi)
    below, above = keep(lo), keep(hi)
    return below if target - removed(below) < removed(above) - target else above


class CostModel:
    """MACs (or parameters) that pruning groups to given channel counts removes, computed without
    rewriting the graph: each cost is a product of the kept fractions of the axes it depends on."""

    def __init__(self, dg: DependencyGraph, metric: str) -> None:
        self.dg = dg
        self.terms = _terms(dg, metric)
        self.full = self._remaining({})

    def removed(self, keep: dict[int, int]) -> float:
        """What goes when each group (by root id) in `keep` keeps that many channels and the others
        keep theirs."""
        return self.full - self._remaining(keep)

    def _remaining(self, keep: dict[int, int]) -> float:
        return sum(cost * math.prod(_length(self.dg, s.segments, keep) / _length(self.dg, s.segments, {})
                                    for s in slices) for cost, slices in self.terms)


def _terms(dg: DependencyGraph, metric: str) -> list[tuple[int, list[Slice]]]:
    """(cost, the slices it shrinks with) per sliced constant input. With spatial dims unchanged, a
    layer's MACs are proportional to its weight's elements, so MACs follow the weight's slices."""
    sliced: dict[tuple[int, int], list[Slice]] = {}
    for s in dg.slices:
        if metric == "params" or s.role in (FILTER, INPUT):
            sliced.setdefault((id(s.node), s.input), []).append(s)
    return [(macs(s[0].node) if metric == "macs" else count(s[0].node.inputs[s[0].input].shape), s)
            for s in sliced.values()]


def select(scores: np.ndarray, keep: int, divisions: int = 1) -> np.ndarray:
    """Sorted indices of the `keep` highest scores, the same number from each of `divisions` blocks."""
    blocks = scores.reshape(divisions, -1)
    top = np.argsort(-blocks, axis=1, kind="stable")[:, :keep // divisions]
    return np.sort(top + blocks.shape[1] * np.arange(divisions)[:, None], axis=1).ravel()


def importance(dg: DependencyGraph, criterion: str) -> dict[int, np.ndarray]:
    """Per group (by root id), the sum over its member layers of each channel's importance."""
    role = GAMMA if criterion == "bn_gamma" else FILTER
    totals: dict[int, np.ndarray] = {}
    for s in (s for s in dg.slices if s.role == role):
        values = np.moveaxis(np.asarray(s.node.inputs[s.input].values, np.float64), s.axis, 0)
        flat = values.reshape(values.shape[0], -1)
        offset = 0
        for seg in s.segments:
            part = flat[offset:offset + seg.channels * seg.expand].reshape(seg.channels, -1)
            offset += seg.channels * seg.expand
            score = np.sqrt((part ** 2).sum(1)) if criterion == "l2" else np.abs(part).sum(1)
            gid = dg.root(seg.group)
            totals[gid] = totals.get(gid, 0.0) + score
    return totals


def apply(rw: Rewriter, dg: DependencyGraph, plan: dict[int, np.ndarray]) -> None:
    """Slice every constant and shape the dependency graph recorded to the kept channels."""
    def kept(gid: int) -> np.ndarray | None:
        return plan.get(dg.root(gid))

    counts = {gid: len(index) for gid, index in plan.items()}

    for s in dg.slices:
        index = _index(s.segments, kept)
        if index is not None:
            values = np.take(s.node.inputs[s.input].values, index, axis=s.axis)
            rw.set_constant_input(s.node, s.input, values)
    for node, layout in dg.group_attrs:
        rw.set_attr(node, "group", _length(dg, layout.segments, counts))
    for node, layout in dg.reshapes:
        target = np.array(node.inputs[1].values)
        if target[layout.axis] > 0:  # 0 copies the input's (pruned) dim and -1 is inferred
            target[layout.axis] = _length(dg, layout.segments, counts)
            rw.set_constant_input(node, 1, target)
    for tensor, layout in dg.shapes:
        if tensor.shape is not None and _index(layout.segments, kept) is not None:
            rw.set_shape(tensor, [*tensor.shape[:layout.axis], _length(dg, layout.segments, counts),
                                  *tensor.shape[layout.axis + 1:]])
    rw.commit()


def _index(segments: tuple[Segment, ...], kept: Callable[[int], np.ndarray | None]) -> np.ndarray | None:
    """Positions along the axis that stay, or None when no segment loses a channel."""
    if all(kept(s.group) is None for s in segments):
        return None
    parts, offset = [], 0
    for s in segments:
        channels = kept(s.group)
        channels = np.arange(s.channels) if channels is None else channels
        parts.append((offset + channels[:, None] * s.expand + np.arange(s.expand)[None, :]).ravel())
        offset += s.channels * s.expand
    return np.concatenate(parts)


def _length(dg: DependencyGraph, segments: tuple[Segment, ...], keep: dict[int, int]) -> int:
    """Length of the axis once each group (by root id) in `keep` keeps that many channels."""
    return sum(keep.get(dg.root(s.group), s.channels) * s.expand for s in segments)


def _cost(graph: gs.Graph) -> tuple[int, int]:
    """(MACs, parameters) of the layers pruning shrinks; symbolic dimensions count as 1."""
    total = sum(macs(n) for n in graph.nodes if n.op in ("Conv", "ConvTranspose", "Gemm", "MatMul"))
    params = sum(count(t.shape) for t in graph.tensors().values() if isinstance(t, gs.Constant))
    return int(total), int(params)
