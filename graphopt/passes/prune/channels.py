"""prune-channels: structured filter pruning that removes channels from the graph, so the model gets
smaller and faster in any runtime.

Matches: groups of coupled channels found by the channel-dependency graph
(`graphopt.passes.prune.dependency`): the output channels of a Conv, ConvTranspose, Gemm or
MatMul with a constant weight, together with every channel axis tied to them through
BatchNormalization, activations, pools, Dropout/Identity, residual Add/Mul/Sub (all branches
lose the same indices), Concat (offsets mapped), depthwise Conv (its filters and `group` follow)
and Flatten/Reshape into a Gemm (rows c*H*W..(c+1)*H*W-1 of channel c). Each group loses
floor(ratio * channels) channels, fewest kept first rounded up to a multiple of `round_to` and
never below `min_channels`; the least important go, importance being the sum over the group's
layers of each filter's L1 or L2 norm, or of |gamma| of the BatchNormalizations on the channels
(`criterion=bn_gamma`, network slimming). `round_to` is what turns fewer MACs into speed:
onnxruntime's blocked (NCHWc) convolutions take channels in blocks of 8 (AVX2) or 16 (AVX-512)
and pad or fall back to a slower kernel otherwise; see bench/prune_channels_latency.py. Options
`include` and `exclude` take node names or fnmatch patterns: a group is pruned when one of its
layers is included and none is excluded.
Refuses, leaving the group whole and giving the reason in stats: channels that reach a graph
output, pass through an op the analysis does not follow, or come from a graph input; weights
shared with another node or not constant; dynamic shapes where a Flatten or Reshape needs them;
bn_gamma on channels with no BatchNormalization.
Guarantees: LOSSY(cosine >= 0.75), the bound the tests hold the bundled builders and the digits
CNN to at the default ratio 0.25 (l1); larger ratios lose more without fine-tuning. Graph outputs
keep their shapes; at ratio 0 the graph is unchanged.
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
from graphopt.ir.errors import PipelineError
from graphopt.ir.verify import SHAPES_INFERRED, TOPOSORTED
from graphopt.passes.base import LOSSY, Pass, PassContext, PassInfo, PassResult
from graphopt.passes.prune.dependency import FILTER, GAMMA, DependencyGraph, Group, Layout, Segment, analyze
from graphopt.pattern import Rewriter

CRITERIA = ("l1", "l2", "bn_gamma")


@dataclass(frozen=True)
class Options:
    ratio: float = 0.25
    criterion: str = "l1"
    round_to: int = 1
    min_channels: int = 1
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise PipelineError(f"prune-channels: ratio={self.ratio} must be in [0, 1) (the fraction of "
                                "channels removed per group)")
        if self.criterion not in CRITERIA:
            raise PipelineError(f"prune-channels: criterion={self.criterion!r} must be one of {', '.join(CRITERIA)}")
        if self.round_to < 1 or self.min_channels < 1:
            raise PipelineError("prune-channels: round_to and min_channels must be at least 1")


class PruneChannels(Pass):
    name = "prune-channels"
    info = PassInfo(LOSSY("cosine", 0.75), requires=frozenset({TOPOSORTED, SHAPES_INFERRED}),
                    idempotent=False)  # each run removes `ratio` of what is left
    Options = Options

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        before = _cost(graph)
        dg = analyze(graph)
        scores = importance(dg, self.options.criterion)
        plan: dict[int, np.ndarray] = {}
        rows, refused = [], []
        for group in dg.groups():
            if not group.layers:
                continue  # channels of a graph input or of a Concat operand nothing follows
            why = self._refusal(group, scores)
            keep = group.channels if why else kept_count(group, self.options)
            if keep < group.channels:
                plan[group.id] = select(scores[group.id], keep, group.divisions)
            rows.append({"layers": group.layers, "channels": [group.channels, keep]})
            if why:
                rows[-1]["reason"] = why
                refused.append({"node": ", ".join(group.layers), "reason": why})
        if plan:
            apply(Rewriter(graph), dg, plan)
        after = _cost(graph)
        stats = {"groups": rows, "pruned_groups": len(plan), "refused": refused,
                 "macs": [before[0], after[0]], "params": [before[1], after[1]]}
        return PassResult(bool(plan), stats)

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


def kept_count(group: Group, options: Options) -> int:
    """Channels kept: the rest after removing floor(ratio * channels), rounded up to a multiple of
    `round_to` (and of the group's divisions), never below `min_channels` nor above the group."""
    step = math.lcm(options.round_to, group.divisions)
    # 0.29 * 100 is 28.999999999999996 in floating point; the epsilon makes it remove 29.
    keep = group.channels - math.floor(group.channels * options.ratio + 1e-9)
    keep = max(keep, options.min_channels)
    return min(group.channels, -(-keep // step) * step)


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

    for s in dg.slices:
        index = _index(s.segments, kept)
        if index is not None:
            values = np.take(s.node.inputs[s.input].values, index, axis=s.axis)
            rw.set_constant_input(s.node, s.input, values)
    for node, layout in dg.group_attrs:
        rw.set_attr(node, "group", _length(layout, kept))
    for node, layout in dg.reshapes:
        target = np.array(node.inputs[1].values)
        if target[layout.axis] > 0:  # 0 copies the input's (pruned) dim and -1 is inferred
            target[layout.axis] = _length(layout, kept)
            rw.set_constant_input(node, 1, target)
    for tensor, layout in dg.shapes:
        if tensor.shape is not None and _index(layout.segments, kept) is not None:
            rw.set_shape(tensor, [*tensor.shape[:layout.axis], _length(layout, kept),
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


def _length(layout: Layout, kept: Callable[[int], np.ndarray | None]) -> int:
    return sum((s.channels if kept(s.group) is None else len(kept(s.group))) * s.expand
               for s in layout.segments)


def _cost(graph: gs.Graph) -> tuple[int, int]:
    """(MACs, parameters) of the layers pruning shrinks; symbolic dimensions count as 1."""
    total = sum(macs(n) for n in graph.nodes if n.op in ("Conv", "ConvTranspose", "Gemm", "MatMul"))
    params = sum(count(t.shape) for t in graph.tensors().values() if isinstance(t, gs.Constant))
    return int(total), int(params)
