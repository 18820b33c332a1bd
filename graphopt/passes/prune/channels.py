"""prune-channels: structured pruning that removes channels (Li et al. 2017; DepGraph, Fang et al. 2023).

Matches: groups of coupled channels (graphopt.passes.prune.dependency): a layer's output channels
and every axis tied to them (norms, activations, pools, residual joins, Concat, depthwise Conv,
Flatten into a Gemm); a group is pruned when one of its layers is included and none excluded.
Rewrites: each group's constants, attributes and shapes down to the channels kept, so the model
runs faster anywhere: floor(ratio * channels) go (uniform), or `ratio` of the prunable MACs spread
by sensitivity; counts are multiples of `round_to`. Which go: with method='l1' the least important
by the weights (L1, L2, BN |gamma|); with 'thinet' (default on --data) or 'lasso' those whose
consumers' outputs, measured on calibration data, are best rebuilt without them, and the consumers
are then refit by least squares (graphopt.passes.prune.reconstruct, which says how).
Refuses: channels reaching a graph output or an op not followed; weights not constant, shared or
not floating point; dynamic shapes a Reshape needs; bn_gamma without BatchNormalization.
Guarantees: LOSSY(cosine >= 0.75) at ratio 0.25 (l1, uniform); output shapes unchanged; ratio 0
changes nothing; not idempotent. Measurements: docs/passes/prune-channels.md.
Verified by: tests/passes/prune/test_channels.py, test_reconstruct.py, test_dependency.py
(onnxruntime, TVM; accuracy on the digits test set).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir.cost import count, macs
from graphopt.ir.data import input_specs, random_feeds
from graphopt.ir.errors import PipelineError
from graphopt.ir.verify import SHAPES_INFERRED, TOPOSORTED
from graphopt.passes import sensitivity
from graphopt.passes.base import (LOSSY, LayerFilter, LayerOptions, LayerPass, PassContext, PassInfo, PassResult,
                                  Refused, option)
from graphopt.passes.prune import reconstruct
from graphopt.passes.prune.channel_rules import analyze
from graphopt.passes.prune.dependency import FILTER, GAMMA, INPUT, DependencyGraph, Group, Segment, Slice
from graphopt.passes.prune.reconstruct import Reconstruction, select
from graphopt.pattern import Rewriter

METHODS = ("l1", "thinet", "lasso")
CRITERIA = ("l1", "l2", "bn_gamma")
ALLOCATIONS = ("uniform", "sensitivity")
BUDGET_METRICS = ("macs", "params")


@dataclass(frozen=True)
class Options(LayerOptions):
    ratio: float = option(0.25, "fraction of each group's channels removed; with allocation='sensitivity', "
                                "of the prunable MACs (or parameters)")
    method: str | None = option(None, "how the channels that go are chosen: 'l1' (by the weights, see criterion), "
                                      "'thinet' (greedy, by the consumers' output error on calibration data) or "
                                      "'lasso' (LASSO on the channels' contributions to it); thinet and lasso "
                                      "then refit the consumers by least squares. Default: thinet with --data, "
                                      "else l1")
    criterion: str = option("l1", "method='l1's channel importance: 'l1' or 'l2' norm of the filters, or "
                                  "'bn_gamma' (|gamma| of the BatchNormalizations, network slimming)")
    sequential: bool = option(False, "thinet, lasso: measure each group's consumers on the model pruned so far "
                                     "(one pass over the data per group) instead of all on the original at once")
    ridge: float = option(1e-3, "damping of the consumers' least-squares refit (thinet, lasso), relative to the "
                                "mean diagonal of their input's second moment")
    round_to: int = option(1, "kept channels are a multiple of this (8 or 16 suit blocked CPU kernels)")
    min_channels: int = option(1, "never keep fewer channels in a group")
    allocation: str = option("uniform", "'uniform': the same ratio per group; 'sensitivity': `ratio` as a "
                                        "budget spread by measured sensitivity")
    budget_metric: str = option("macs", "what allocation='sensitivity' counts: 'macs' or 'params'")
    ratios: tuple[float, ...] = option((0.25, 0.5, 0.75, 0.9),
                                       "fractions of channels each group is measured at for allocation='sensitivity'")

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise PipelineError(f"prune-channels: ratio={self.ratio} must be in [0, 1) (the fraction of "
                                "channels removed per group, or with allocation='sensitivity' of the "
                                "prunable MACs or parameters)")
        if self.method is not None and self.method not in METHODS:
            raise PipelineError(f"prune-channels: method={self.method!r} must be one of {', '.join(METHODS)}")
        if self.method in ("thinet", "lasso") and self.criterion != "l1":
            raise PipelineError(f"prune-channels: criterion={self.criterion!r} ranks channels for method='l1' only; "
                                f"method={self.method!r} ranks them by reconstruction error")
        if not 0.0 <= self.ridge < 1.0:
            raise PipelineError(f"prune-channels: ridge={self.ridge} must be in [0, 1) (relative damping)")
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
    """A graph's channel dependencies, each group's channel importance, and the groups to prune."""
    dg: DependencyGraph
    scores: dict[int, np.ndarray]
    groups: list[Group]  # neither refused nor left out by the options


class PruneChannels(LayerPass):
    """A LayerPass whose layers are channel groups, not nodes: `survey` examines them, the plan is
    the channels each keeps, and `run` rewrites all groups at once, since one constant (a Concat's
    consumer, a broadcast operand) may hold the channels of several."""

    name = "prune-channels"
    info = PassInfo(LOSSY("cosine", 0.75), requires=frozenset({TOPOSORTED, SHAPES_INFERRED}),
                    idempotent=False)  # each run removes `ratio` of what is left
    Options = Options
    ops = ("Conv", "ConvTranspose", "Gemm", "MatMul")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        o = self.options
        method = self.method(ctx)
        result = PassResult(False, {"allocation": o.allocation, "method": method})
        before = _cost(graph)
        survey = self.survey(graph, result)
        model = CostModel(survey.dg, o.budget_metric)
        prunable = model.removed(dict.fromkeys((g.id for g in survey.groups), 0))
        budget = {"metric": o.budget_metric, "prunable": round(prunable)}
        recon = self._measure(graph, survey, method, ctx)
        if o.allocation == "uniform":
            keep = {g.id: kept_count(g, o.ratio, o) for g in survey.groups}
        else:
            budget["target"] = round(o.ratio * prunable)
            keep = self._by_sensitivity(graph, survey, model, o.ratio * prunable, ctx, result.stats, recon)
        counts = {group_name(g): keep[g.id] for g in survey.groups if keep.get(g.id, g.channels) < g.channels}
        if counts and recon and o.sequential:
            result.stats["refit"] = self._sequentially(graph, counts, method, ctx)
        elif counts:
            result.stats["refit"] = self._prune(graph, survey, counts, recon, method)
        after = _cost(graph)
        result.modified = bool(counts)
        for g in survey.groups:
            how = recon.record(group_name(g), method) if recon else {"method": method}
            result.decisions[group_name(g)] = {"layers": list(g.layers),
                                               "channels": [g.channels, keep.get(g.id, g.channels)], **how}
        budget["removed"] = round(model.removed(keep))
        result.stats.update({"pruned_groups": len(counts), "macs": [before[0], after[0]],
                             "params": [before[1], after[1]], "budget": budget})
        return result

    def method(self, ctx: PassContext) -> str:
        """The method asked for; by default the data-aware one on the user's data (unless a weight
        criterion was asked for), else the weights-only one."""
        o = self.options
        if o.method is not None:
            return o.method
        return "thinet" if ctx.from_data and o.criterion == "l1" else "l1"

    def _prune(self, graph: gs.Graph, survey: Survey, counts: dict[str, int], recon: Reconstruction | None,
               method: str) -> dict[str, dict]:
        """Choose the channels each group (by name) keeps, refit their consumers, and rewrite;
        returns the refit's record per consumer."""
        groups = {group_name(g): g for g in survey.groups}
        kept = {name: choose(groups[name], n, survey, recon, method) for name, n in counts.items()}
        rw = Rewriter(graph)
        refits = recon.refit(rw, graph, kept, self.options.ridge) if recon else {}
        apply(rw, survey.dg, {groups[name].id: index for name, index in kept.items()})
        return refits

    def _sequentially(self, graph: gs.Graph, counts: dict[str, int], method: str, ctx: PassContext) -> dict[str, dict]:
        """One group at a time, in graph order, each measured on the model pruned so far."""
        refits = {}
        for name, n in counts.items():
            survey = self.survey(graph, PassResult(False))
            group = next(g for g in survey.groups if group_name(g) == name)
            recon = self._measure(graph, Survey(survey.dg, survey.scores, [group]), method, ctx)
            refits.update(self._prune(graph, survey, {name: n}, recon, method))
        return refits

    def _measure(self, graph: gs.Graph, survey: Survey, method: str, ctx: PassContext) -> Reconstruction | None:
        """The consumers' statistics thinet and lasso choose and refit by; None for l1 or when
        nothing will be pruned."""
        if method == "l1" or self.options.ratio == 0 or not survey.groups:
            return None
        feeds = ctx.feeds if ctx.feeds is not None else random_feeds(input_specs(graph), ctx.seed, batch=8)
        report = (lambda done, total: ctx.progress("statistics", done, total)) if ctx.progress else None
        return reconstruct.prepare(graph, survey.dg, {g.id: group_name(g) for g in survey.groups}, feeds,
                                   ctx.seed, report)

    def survey(self, graph: gs.Graph, result: PassResult) -> Survey:
        """The groups to prune; those refused or left out by the options are recorded in `result`."""
        chosen = self.layer_filter()
        chosen.check(self.name, self.candidates(graph))
        dg = analyze(graph)
        scores = importance(dg, self.options.criterion)
        nodes = {n.name: n for n in graph.nodes}
        groups = []
        # A group without layers holds the channels of a graph input or of a Concat operand
        # nothing follows: there is nothing to prune, and nothing to report.
        for group in (g for g in dg.groups() if g.layers):
            why = left_out(chosen, [nodes[name] for name in group.layers])
            if why:
                result.skip(group_name(group), why)
                continue
            try:
                check_group(group, scores)
            except Refused as e:
                result.refuse(group_name(group), e.reason)
                continue
            groups.append(group)
        self._unreached(graph, dg, result)
        return Survey(dg, scores, groups)

    def _unreached(self, graph: gs.Graph, dg: DependencyGraph, result: PassResult) -> None:
        """Layers in no group at all are refused with why, so a pass that prunes nothing says so."""
        grouped = {name for g in dg.groups() for name in g.layers}
        told = {name for r in result.refused + result.skipped for name in r.node.split("+")}
        for node in self.candidates(graph):
            if node.name in grouped or node.name in told or not any(isinstance(t, gs.Constant) for t in node.inputs[1:2]):
                continue
            out = node.outputs[0]
            why = ("its output shape is unknown (shape inference stops before it: give --input-shape)"
                   if out.shape is None else "its output channels are in no group the channel analysis follows")
            result.refuse(node.name, why)

    def _by_sensitivity(self, graph: gs.Graph, survey: Survey, model: CostModel, target: float,
                        ctx: PassContext, stats: dict, recon: Reconstruction | None) -> dict[int, int]:
        if target <= 0:
            return {}  # ratio 0 or nothing prunable: nothing to measure
        feeds = ctx.feeds if ctx.feeds is not None else random_feeds(input_specs(graph), ctx.seed, batch=8)
        report = (lambda done, total: ctx.progress("sensitivity", done, total)) if ctx.progress else None
        layers = _layers(graph, survey, model)
        method = self.method(ctx)
        table = sensitivity.analyze(graph, layers, lambda g, layer, r: self._prune_group(g, layer, r, recon, method),
                                    self.options.ratios, feeds, progress=report)
        stats["sensitivity"] = table.as_dict()
        return fit_budget(table, {group_name(g): g for g in survey.groups}, model.removed, target, self.options)

    # -- sensitivity.Layerwise: a layer is a channel group; the ratio, its channels removed -------
    def layers(self, graph: gs.Graph) -> list[sensitivity.Layer]:
        """The prunable groups, each sized by the MACs (or parameters) it removes per unit ratio."""
        survey = self.survey(graph, PassResult(False))
        return _layers(graph, survey, CostModel(survey.dg, self.options.budget_metric))

    def apply_layer(self, graph: gs.Graph, layer: sensitivity.Layer, ratio: float) -> None:
        """Prune one group by its weights (`graphopt sensitivity` has no statistics to give)."""
        self._prune_group(graph, layer, ratio, None, "l1")

    def _prune_group(self, graph: gs.Graph, layer: sensitivity.Layer, ratio: float, recon: Reconstruction | None,
                     method: str) -> None:
        survey = self.survey(graph, PassResult(False))
        group = next(g for g in survey.groups if group_name(g) == layer.name)
        keep = kept_count(group, ratio, self.options)
        if keep < group.channels:
            self._prune(graph, survey, {layer.name: keep}, recon, method)


def left_out(chosen: LayerFilter, layers: list[gs.Node]) -> str | None:
    """Why the options leave a group whole: one of its layers is excluded, or none is included."""
    if any(chosen.matches(p, n) for p in chosen.exclude for n in layers):
        return "excluded"
    if chosen.include and not any(chosen.matches(p, n) for p in chosen.include for n in layers):
        return "not in include"
    return None


def check_group(group: Group, scores: dict[int, np.ndarray]) -> None:
    """Raises `Refused` when the group must stay whole."""
    if group.blocked:
        raise Refused("; ".join(group.reasons))
    if group.id not in scores:
        raise Refused("criterion bn_gamma: no BatchNormalization scales these channels")


def choose(group: Group, keep: int, survey: Survey, recon: Reconstruction | None, method: str) -> np.ndarray:
    """Sorted indices of the channels a group keeps: by reconstruction error where the method and
    the group's consumers allow, else by the weights."""
    kept = recon.choose(group_name(group), keep, group.divisions, method) if recon else None
    return kept if kept is not None else select(survey.scores[group.id], keep, group.divisions)


def group_name(group: Group) -> str:
    """A group's name in decisions, refusals and sensitivity tables: its layers, which stay the
    same on a copy of the graph."""
    return "+".join(group.layers)


def _layers(graph: gs.Graph, survey: Survey, model: CostModel) -> list[sensitivity.Layer]:
    ops = {n.name: n.op for n in graph.nodes}
    # The cost is multilinear in the kept fractions, so emptying a group alone removes exactly
    # what one unit of its ratio is worth while the other groups stay whole.
    return [sensitivity.Layer(group_name(g), ops[g.layers[0]], round(model.removed({g.id: 0})))
            for g in survey.groups]


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
