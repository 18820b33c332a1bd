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
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
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


def analyze(graph: gs.Graph) -> DependencyGraph:
    """The dependency graph of a toposorted graph with inferred shapes."""
    walk = _Walk(graph)
    for node in graph.nodes:
        walk.visit(node)
    walk.finish()
    return walk.dg


class _Walk:
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

    def visit(self, node: gs.Node) -> None:
        self.visited.add(id(node))
        rule = RULES.get(node.op) if node.domain in ("", "ai.onnx", None) else None
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
            bias = _bias(node, channels)
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


def _origin(t: gs.Tensor) -> str:
    return f"graph input '{t.name}'" if not t.inputs else f"'{t.name}' of {t.inputs[0].op} '{t.inputs[0].name}'"


def _weight_problem(node: gs.Node, indices: tuple[int, ...]) -> str | None:
    for i in indices:
        if i >= len(node.inputs) or node.inputs[i].is_empty():
            continue
        t = node.inputs[i]
        if not isinstance(t, gs.Constant):
            return f"{node.op} '{node.name}' has a non-constant weight '{t.name}'"
        if len(t.outputs) > 1:
            return f"weight '{t.name}' is shared with another node"
    return None


def _bias(node: gs.Node, channels: int) -> tuple[int, int] | None:
    """(input, axis) of a bias holding one value per output channel; None if absent or broadcast."""
    if node.op == "MatMul" or len(node.inputs) < 3 or node.inputs[2].is_empty():
        return None
    shape = static_shape(node.inputs[2])
    return (2, len(shape) - 1) if shape and shape[-1] == channels and channels > 1 else None


def _rank(t: gs.Tensor) -> int | None:
    return None if t.shape is None else len(t.shape)


def _static(dims) -> tuple[int, ...] | None:
    return None if dims is None else static_shape(gs.Variable("", shape=list(dims)))


def _used(t: gs.Tensor, graph: gs.Graph) -> bool:
    return not t.is_empty() and (bool(t.outputs) or is_graph_output(graph, t))


# -- rules: each returns the input indices it accounted for ------------------------------------
def _conv(w: _Walk, node: gs.Node) -> tuple[int, ...]:
    shape = static_shape(node.inputs[1])
    if shape is None or len(shape) < 3:
        return ()
    group = node.attrs.get("group", 1)
    cout, cin = shape[0], shape[1] * group
    problem = _weight_problem(node, (1, 2))
    if group == 1:
        w.consume(node, (1, 1), 1, problem)
        w.produce(node, (1, 0), 1, cout, problem)
    elif group == cin == cout:
        _depthwise(w, node, problem)
    else:
        w.block(node.inputs[0], f"grouped Conv '{node.name}' (group={group}) ties its input channels to groups")
        w.produce(node, (1, 0), 1, cout, problem, divisions=group)
    return (0,)


def _depthwise(w: _Walk, node: gs.Node, problem: str | None) -> None:
    """Output channel c filters input channel c alone: the output keeps the input's groups."""
    x = w.get(node.inputs[0])
    if x is None:
        return
    problem = problem or (x.axis != 1 and f"depthwise Conv '{node.name}' reads channels on axis 1")
    if problem:
        w.dg.block(x, problem)
        return
    w.dg.slices.append(Slice(node, 1, 0, x.segments, FILTER))
    if _bias(node, x.length):
        w.dg.slices.append(Slice(node, 2, 0, x.segments, PARAM))
    w.dg.group_attrs.append(Follow(node, x))
    for s in x.segments:
        w.dg.group(s.group).layers.append(node.name)
    w.set(node.outputs[0], x)


def _conv_transpose(w: _Walk, node: gs.Node) -> tuple[int, ...]:
    shape = static_shape(node.inputs[1])
    if shape is None or len(shape) < 3 or node.attrs.get("group", 1) != 1:
        return ()
    problem = _weight_problem(node, (1, 2))
    w.consume(node, (1, 0), 1, problem)
    w.produce(node, (1, 1), 1, shape[1], problem)
    return (0,)


def _gemm(w: _Walk, node: gs.Node) -> tuple[int, ...]:
    shape = static_shape(node.inputs[1])
    if shape is None or len(shape) != 2:
        return ()
    trans_b = node.attrs.get("transB", 0)
    problem = _weight_problem(node, (1, 2))
    transposed = node.attrs.get("transA", 0) and f"Gemm '{node.name}' reads its input transposed (transA=1)"
    w.consume(node, (1, 1 if trans_b else 0), 1, problem or transposed)
    w.produce(node, (1, 0 if trans_b else 1), 1, shape[0] if trans_b else shape[1], problem)
    return (0,)


def _matmul(w: _Walk, node: gs.Node) -> tuple[int, ...]:
    shape, rank = static_shape(node.inputs[1]), _rank(node.inputs[0])
    if not isinstance(node.inputs[1], gs.Constant) or shape is None or len(shape) != 2 or not rank or rank < 2:
        return ()
    problem = _weight_problem(node, (1,))
    w.consume(node, (1, 0), rank - 1, problem)
    w.produce(node, (1, 1), rank - 1, shape[1], problem)
    return (0,)


def _norm(w: _Walk, node: gs.Node) -> tuple[int, ...]:
    """BatchNormalization and InstanceNormalization: a scale, shift (and statistics) per channel."""
    x = w.get(node.inputs[0])
    params = range(1, len(node.inputs))
    if x is None:
        return (0,)
    if x.axis != 1:
        w.dg.block(x, f"{node.op} '{node.name}' normalises axis 1, not the channel axis {x.axis}")
    elif any(_used(t, w.graph) for t in node.outputs[1:]):
        w.dg.block(x, f"{node.op} '{node.name}' is in training mode")
    elif any(not isinstance(node.inputs[i], gs.Constant) or static_shape(node.inputs[i]) != (x.length,)
             for i in params):
        w.dg.block(x, f"{node.op} '{node.name}' has parameters that are not constants of {x.length} values")
    else:
        w.dg.slices += [Slice(node, i, 0, x.segments, GAMMA if i == 1 else PARAM) for i in params]
        w.set(node.outputs[0], x)
    return (0,)


def _same(w: _Walk, node: gs.Node) -> tuple[int, ...]:
    """Elementwise on one tensor (activations, Dropout, Identity, Cast): channels unchanged."""
    x = w.get(node.inputs[0])
    for t in node.outputs if x else ():
        w.set(t, x)
    return (0,)


def _pool(w: _Walk, node: gs.Node) -> tuple[int, ...]:
    x = w.get(node.inputs[0])
    if x and x.axis != 1:
        w.dg.block(x, f"{node.op} '{node.name}' pools over the channel axis {x.axis}")
    elif x and any(_used(t, w.graph) for t in node.outputs[1:]):
        w.dg.block(x, f"{node.op} '{node.name}' returns indices that count channels")
    elif x:
        w.set(node.outputs[0], x)
    return (0,)


def _elementwise(w: _Walk, node: gs.Node) -> tuple[int, ...]:
    """Broadcasting ops: tracked operands share groups; a constant along the channels is sliced."""
    tracked = [lay for t in node.inputs if (lay := w.get(t))]
    rank, ranks = _rank(node.outputs[0]), [_rank(t) for t in node.inputs]
    if not tracked:
        return tuple(range(len(node.inputs)))
    first = tracked[0]
    cut = [(s.channels, s.expand) for s in first.segments]
    axes = {None} if rank is None or None in ranks else {
        lay.axis + rank - r for t, r in zip(node.inputs, ranks) if (lay := w.get(t))}
    if None in axes or len(axes) > 1 or any([(s.channels, s.expand) for s in lay.segments] != cut
                                            for lay in tracked):
        return w.block_all(node, f"{node.op} '{node.name}' joins tensors whose channels do not line up")
    axis = axes.pop()
    for i, t in enumerate(node.inputs):
        j = axis - (rank - ranks[i])  # broadcasting aligns the trailing axes
        if w.get(t) or j < 0 or t.shape[j] == 1:
            continue
        if not isinstance(t, gs.Constant) or t.shape[j] != first.length:
            return w.block_all(node, f"{node.op} '{node.name}' joins the channels with {_origin(t)}, "
                                     "which is not followed")
        w.dg.slices.append(Slice(node, i, j, first.segments, PARAM))
    for lay in tracked[1:]:
        for a, b in zip(first.segments, lay.segments):
            w.dg.unite(a.group, b.group)
    w.set(node.outputs[0], Layout(axis, first.segments))
    return tuple(range(len(node.inputs)))


def _concat(w: _Walk, node: gs.Node) -> tuple[int, ...]:
    rank, axis = _rank(node.outputs[0]), node.attrs["axis"]
    axis = axis + rank if axis < 0 and rank else axis
    if not any(lay.axis == axis for t in node.inputs if (lay := w.get(t))):
        return _elementwise(w, node)  # joined along another axis: channels line up elementwise
    segments: list[Segment] = []
    for t in node.inputs:
        lay = w.get(t)
        size = t.shape[axis] if t.shape is not None and len(t.shape) > axis else None
        if lay and lay.axis == axis:
            segments += lay.segments
        elif lay or not isinstance(size, int) or size < 0:
            return w.block_all(node, f"Concat '{node.name}' joins the channels with {_origin(t)}, "
                                     "which is not followed")
        else:  # the channels of an operand nothing follows stay whole; the others may still go
            segments.append(Segment(w.dg.new_group(size, reason=f"concatenated with {_origin(t)}"), size))
    w.set(node.outputs[0], Layout(axis, tuple(segments)))
    return tuple(range(len(node.inputs)))


def _flatten(w: _Walk, node: gs.Node) -> tuple[int, ...]:
    """Flatten at the channel axis: each channel covers the product of the dims after it."""
    x, shape = w.get(node.inputs[0]), node.inputs[0].shape
    if x is None:
        return (0,)
    axis = node.attrs.get("axis", 1)
    axis = axis + len(shape) if axis < 0 and shape is not None else axis
    tail = _static(shape[x.axis + 1:]) if shape is not None else None
    if axis != x.axis:
        w.dg.block(x, f"Flatten '{node.name}' at axis {axis} mixes the channel axis {x.axis} with others")
    elif tail is None:
        w.dg.block(x, f"Flatten '{node.name}' has a dynamic shape after the channel axis")
    else:
        w.set(node.outputs[0], _merged(x, math.prod(tail), axis=1))
    return (0,)


def _reshape(w: _Walk, node: gs.Node) -> tuple[int, ...]:
    """A Reshape that merges the channel axis with dims after it, as a Flatten does."""
    x = w.get(node.inputs[0])
    tail = None if x is None else _merged_tail(node, x.axis)
    if x and not isinstance(node.inputs[1], gs.Constant):
        w.dg.block(x, f"Reshape '{node.name}' computes its target shape at run time")
    elif x and tail is None:
        w.dg.block(x, f"Reshape '{node.name}' does more than merge the channel axis with the dims after it")
    elif x:
        out = _merged(x, tail, x.axis)
        w.dg.reshapes.append(Follow(node, out))
        w.set(node.outputs[0], out)
    return (0, 1)


def _merged(x: Layout, tail: int, axis: int) -> Layout:
    return Layout(axis, tuple(replace(s, expand=s.expand * tail) for s in x.segments))


def _merged_tail(node: gs.Node, axis: int) -> int | None:
    """How many elements per channel the output's `axis` holds, if it absorbs the input dims after
    `axis` and changes nothing before it; else None. Needs static dims from `axis` on."""
    ins, outs = node.inputs[0].shape, node.outputs[0].shape
    if ins is None or outs is None or len(outs) <= axis:
        return None
    after_in, after_out = _static(ins[axis:]), _static(outs[axis:])
    if list(ins[:axis]) != list(outs[:axis]) or after_in is None or after_out is None:
        return None
    merged = [math.prod(after_in[:k]) for k in range(1, len(after_in) + 1)]
    return after_out[0] // after_in[0] if after_out[0] in merged else None


_ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where")
_UNARY = ("Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu",
          "Celu", "Gelu", "Mish", "Softplus", "Softsign", "ThresholdedRelu", "Erf", "Exp", "Log", "Abs",
          "Neg", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Cast", "Identity", "Dropout")
_POOLS = ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")

RULES: dict[str, Callable[[_Walk, gs.Node], tuple[int, ...]]] = {
    "Conv": _conv, "ConvTranspose": _conv_transpose, "Gemm": _gemm, "MatMul": _matmul,
    "BatchNormalization": _norm, "InstanceNormalization": _norm, "Concat": _concat,
    "Flatten": _flatten, "Reshape": _reshape,
    **{op: _elementwise for op in _ELEMENTWISE}, **{op: _same for op in _UNARY},
    **{op: _pool for op in _POOLS},
}
