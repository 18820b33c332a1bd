"""The channel-dependency graph behind prune-channels: which channel axes must shrink together.

In the spirit of DepGraph (Fang et al. 2023), on ONNX. Every tensor whose channels are followed has
a `Layout`: its channel axis and the `Segment`s along it, each naming a group of coupled channels.
A Concat on the channel axis lays its inputs' segments end to end (pruning one input maps to an
offset range of the output); after a Flatten or Reshape of NCHW each channel covers H*W contiguous
features (`expand`), which maps Gemm rows. Ops that keep channels (BatchNormalization,
activations, pools, Dropout, Identity, depthwise Conv) pass a layout on; ops that join tensors
elementwise (Add, Sub, Mul, ...) unite their operands' groups, so a residual Add loses the same
indices on every branch or none. Conv, ConvTranspose, Gemm and MatMul with constant weights start
a group for their outputs and record the input-channel slice of their weight.

Whatever the analysis cannot follow (an unknown op, a graph input or output, a shared or
non-constant weight, a dynamic shape) blocks the groups it touches, with the reason: a group is
pruned whole or not at all. The analysis is pure: it records what pruning a group changes
(`Slice`s of constants, a depthwise Conv's `group`, a Reshape's target, tensor shapes), and
prune-channels applies that through the rewriter once it has chosen the channels to keep.

This module holds the data model and the `Walk` that records into it; what each op does to the
channels is in `channel_rules`, whose `analyze` walks a graph with those rules.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import onnx_graphsurgeon as gs

from graphopt.ir.graph import is_graph_output, static_shape

FILTER, GAMMA, PARAM, INPUT = "filter", "gamma", "param", "input"


@dataclass(frozen=True)
class Segment:
    """`channels` channels of group `group`, each covering `expand` contiguous elements of the axis."""
    group: int
    channels: int
    expand: int = 1


@dataclass(frozen=True)
class Layout:
    axis: int
    segments: tuple[Segment, ...]

    @property
    def length(self) -> int:
        return sum(s.channels * s.expand for s in self.segments)


@dataclass(frozen=True)
class Slice:
    """Constant input `input` of `node` loses the pruned channels of `segments` along `axis`.

    `role` tells importance what it holds: FILTER (a layer's output filters), GAMMA (a
    BatchNormalization scale), PARAM (bias, statistics, a broadcast operand) or INPUT (a
    consumer's input channels).
    """
    node: gs.Node
    input: int
    axis: int
    segments: tuple[Segment, ...]
    role: str


class Follow(NamedTuple):
    """A node attribute, Reshape target or tensor shape whose channel entry follows `layout`."""
    target: gs.Node | gs.Tensor
    layout: Layout


@dataclass
class Group:
    id: int
    channels: int
    layers: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    divisions: int = 1  # grouped Conv filters: each of this many blocks loses as many channels

    @property
    def blocked(self) -> bool:
        return bool(self.reasons)


class DependencyGraph:
    """Groups of coupled channels (a union-find) and the edits that pruning them implies."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self._groups: list[Group] = []
        self.slices: list[Slice] = []
        self.group_attrs: list[Follow] = []  # depthwise Conv nodes
        self.reshapes: list[Follow] = []     # Reshape nodes whose target names the channel axis
        self.shapes: list[Follow] = []       # every tensor whose channels are followed

    def new_group(self, channels: int, layer: str | None = None, reason: str | None = None,
                  divisions: int = 1) -> int:
        gid = len(self._parent)
        self._parent.append(gid)
        self._groups.append(Group(gid, channels, [layer] if layer else [], [reason] if reason else [],
                                  divisions))
        return gid

    def root(self, gid: int) -> int:
        while self._parent[gid] != gid:
            self._parent[gid] = self._parent[self._parent[gid]]
            gid = self._parent[gid]
        return gid

    def group(self, gid: int) -> Group:
        return self._groups[self.root(gid)]

    def unite(self, a: int, b: int) -> None:
        ra, rb = self.root(a), self.root(b)
        if ra == rb:
            return
        keep, gone = self._groups[ra], self._groups[rb]
        self._parent[rb] = ra
        keep.layers += [n for n in gone.layers if n not in keep.layers]
        keep.reasons += [r for r in gone.reasons if r not in keep.reasons]
        keep.divisions = math.lcm(keep.divisions, gone.divisions)

    def block(self, layout: Layout, reason: str) -> None:
        for s in layout.segments:
            reasons = self.group(s.group).reasons
            if reason not in reasons:
                reasons.append(reason)

    def groups(self) -> list[Group]:
        return [g for i, g in enumerate(self._groups) if self.root(i) == i]


class Walk:
    """The state of one pass over a graph: each tensor's layout, and the DependencyGraph being built."""

    def __init__(self, graph: gs.Graph) -> None:
        self.graph = graph
        self.dg = DependencyGraph()
        self.layouts: dict[int, Layout] = {}
        self.visited: set[int] = set()

    def get(self, tensor: gs.Tensor) -> Layout | None:
        return self.layouts.get(id(tensor))

    def set(self, tensor: gs.Tensor, layout: Layout) -> None:
        self.layouts[id(tensor)] = layout
        self.dg.shapes.append(Follow(tensor, layout))

    def visit(self, node: gs.Node, rule: Rule | None) -> None:
        self.visited.add(id(node))
        handled = rule(self, node) if rule else ()
        # Fail closed: channels reaching an input no rule accounted for are left whole.
        why = (f"{node.op} '{node.name}' reads the channels in a way prune-channels does not follow" if rule
               else f"the channels are read by {node.op} '{node.name}', an op prune-channels does not follow")
        for i, t in enumerate(node.inputs):
            if i not in handled:
                self.block(t, why)

    def finish(self) -> None:
        for tensor, layout in self.dg.shapes:
            if is_graph_output(self.graph, tensor):
                self.dg.block(layout, f"the channels reach graph output '{tensor.name}'")
            elif any(id(c) not in self.visited for c in tensor.outputs):
                self.dg.block(layout, f"'{tensor.name}' is read inside a subgraph")

    def block(self, tensor: gs.Tensor, reason: str) -> None:
        if self.get(tensor):
            self.dg.block(self.get(tensor), reason)

    def block_all(self, node: gs.Node, reason: str) -> tuple[int, ...]:
        for t in node.inputs:
            self.block(t, reason)
        return tuple(range(len(node.inputs)))

    def produce(self, node: gs.Node, weight: tuple[int, int], out_axis: int, channels: int,
                problem: str | None, divisions: int = 1) -> None:
        """The output channels of `node` are a new group; its filters lie along (input, axis) `weight`."""
        gid = self.dg.new_group(channels, node.name, problem, divisions)
        segments = (Segment(gid, channels),)
        if not problem:
            self.dg.slices.append(Slice(node, *weight, segments, FILTER))
            bias = bias_input(node, channels)
            if bias:
                self.dg.slices.append(Slice(node, *bias, segments, PARAM))
        self.set(node.outputs[0], Layout(out_axis, segments))

    def consume(self, node: gs.Node, weight: tuple[int, int], axis: int, problem: str | None) -> None:
        """`node` reduces input 0 over `axis` with the weight axis (input, axis) `weight`."""
        x = self.get(node.inputs[0])
        if x is None:
            return
        have = node.inputs[weight[0]].shape[weight[1]]
        if not problem and x.axis != axis:
            problem = f"{node.op} '{node.name}' reduces over axis {axis}, not the channel axis {x.axis}"
        if not problem and x.length != have:
            problem = f"{node.op} '{node.name}' expects {have} input channels, not {x.length}"
        if problem:
            self.dg.block(x, problem)
        else:
            self.dg.slices.append(Slice(node, *weight, x.segments, INPUT))


def bias_input(node: gs.Node, channels: int) -> tuple[int, int] | None:
    """(input, axis) of a bias holding one value per output channel; None if absent or broadcast."""
    if node.op == "MatMul" or len(node.inputs) < 3 or node.inputs[2].is_empty():
        return None
    shape = static_shape(node.inputs[2])
    return (2, len(shape) - 1) if shape and shape[-1] == channels and channels > 1 else None


# A rule follows the channels through one op and returns the input indices it accounted for.
Rule = Callable[[Walk, gs.Node], tuple[int, ...]]
