"""What each ONNX op does to the channels it reads: the rules behind the channel-dependency graph
(`graphopt.passes.prune.dependency`), and `analyze`, which walks a graph with them.

A rule takes the `Walk` and one node, records the node's effect (a new group for a layer's output
channels, the slice of its weight that reads its input channels, a layout passed on or joined) and
returns the input indices it accounted for; the walk blocks the groups of every other input,
so an op is followed only as far as its rule says.
"""
from __future__ import annotations

import math
from dataclasses import replace

import onnx_graphsurgeon as gs

from graphopt.ir.errors import Refused
from graphopt.ir.graph import is_graph_output, static_shape
from graphopt.passes.prune.dependency import (FILTER, GAMMA, PARAM, DependencyGraph, Follow, Layout, Rule,
                                              Segment, Slice, Walk, bias_input)
from graphopt.passes.weights import check_weight


def analyze(graph: gs.Graph) -> DependencyGraph:
    """The dependency graph of a toposorted graph with inferred shapes."""
    walk = Walk(graph)
    for node in graph.nodes:
        walk.visit(node, RULES.get(node.op) if node.domain in ("", "ai.onnx", None) else None)
    walk.finish()
    return walk.dg


def _origin(t: gs.Tensor) -> str:
    return f"graph input '{t.name}'" if not t.inputs else f"'{t.name}' of {t.inputs[0].op} '{t.inputs[0].name}'"


def _weight_problem(w: Walk, node: gs.Node, indices: tuple[int, ...]) -> str | None:
    """Why the constants of `node` at `indices` may not be sliced (`check_weight`), or None: the
    walk does not stop at a refused weight, it blocks the groups the node touches with the reason."""
    try:
        for i in indices:
            if i < len(node.inputs) and not node.inputs[i].is_empty():
                check_weight(w.graph, node.inputs[i], "prune")
    except Refused as e:
        return e.reason
    return None


def _rank(t: gs.Tensor) -> int | None:
    return None if t.shape is None else len(t.shape)


def _static(dims) -> tuple[int, ...] | None:
    return None if dims is None else static_shape(gs.Variable("", shape=list(dims)))


def _used(t: gs.Tensor, graph: gs.Graph) -> bool:
    return not t.is_empty() and (bool(t.outputs) or is_graph_output(graph, t))


def _conv(w: Walk, node: gs.Node) -> tuple[int, ...]:
    shape = static_shape(node.inputs[1])
    if shape is None or len(shape) < 3:
        return ()
    group = node.attrs.get("group", 1)
    cout, cin = shape[0], shape[1] * group
    problem = _weight_problem(w, node, (1, 2))
    if group == 1:
        w.consume(node, (1, 1), 1, problem)
        w.produce(node, (1, 0), 1, cout, problem)
    elif group == cin == cout:
        _depthwise(w, node, problem)
    else:
        w.block(node.inputs[0], f"grouped Conv '{node.name}' (group={group}) ties its input channels to groups")
        w.produce(node, (1, 0), 1, cout, problem, divisions=group)
    return (0,)


def _depthwise(w: Walk, node: gs.Node, problem: str | None) -> None:
    """Output channel c filters input channel c alone: the output keeps the input's groups."""
    x = w.get(node.inputs[0])
    if x is None:
        return
    problem = problem or (x.axis != 1 and f"depthwise Conv '{node.name}' reads channels on axis 1")
    if problem:
        w.dg.block(x, problem)
        return
    w.dg.slices.append(Slice(node, 1, 0, x.segments, FILTER))
    if bias_input(node, x.length):
        w.dg.slices.append(Slice(node, 2, 0, x.segments, PARAM))
    w.dg.group_attrs.append(Follow(node, x))
    for s in x.segments:
        w.dg.group(s.group).layers.append(node.name)
    w.set(node.outputs[0], x)


def _conv_transpose(w: Walk, node: gs.Node) -> tuple[int, ...]:
    shape = static_shape(node.inputs[1])
    if shape is None or len(shape) < 3 or node.attrs.get("group", 1) != 1:
        return ()
    problem = _weight_problem(w, node, (1, 2))
    w.consume(node, (1, 0), 1, problem)
    w.produce(node, (1, 1), 1, shape[1], problem)
    return (0,)


def _gemm(w: Walk, node: gs.Node) -> tuple[int, ...]:
    shape = static_shape(node.inputs[1])
    if shape is None or len(shape) != 2:
        return ()
    trans_b = node.attrs.get("transB", 0)
    problem = _weight_problem(w, node, (1, 2))
    transposed = node.attrs.get("transA", 0) and f"Gemm '{node.name}' reads its input transposed (transA=1)"
    w.consume(node, (1, 1 if trans_b else 0), 1, problem or transposed)
    w.produce(node, (1, 0 if trans_b else 1), 1, shape[0] if trans_b else shape[1], problem)
    return (0,)


def _matmul(w: Walk, node: gs.Node) -> tuple[int, ...]:
    shape, rank = static_shape(node.inputs[1]), _rank(node.inputs[0])
    if not isinstance(node.inputs[1], gs.Constant) or shape is None or len(shape) != 2 or not rank or rank < 2:
        return ()
    problem = _weight_problem(w, node, (1,))
    w.consume(node, (1, 0), rank - 1, problem)
    w.produce(node, (1, 1), rank - 1, shape[1], problem)
    return (0,)


def _norm(w: Walk, node: gs.Node) -> tuple[int, ...]:
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


def _same(w: Walk, node: gs.Node) -> tuple[int, ...]:
    """Elementwise on one tensor (activations, Dropout, Identity, Cast): channels unchanged."""
    x = w.get(node.inputs[0])
    for t in node.outputs if x else ():
        w.set(t, x)
    return (0,)


def _pool(w: Walk, node: gs.Node) -> tuple[int, ...]:
    x = w.get(node.inputs[0])
    if x and x.axis != 1:
        w.dg.block(x, f"{node.op} '{node.name}' pools over the channel axis {x.axis}")
    elif x and any(_used(t, w.graph) for t in node.outputs[1:]):
        w.dg.block(x, f"{node.op} '{node.name}' returns indices that count channels")
    elif x:
        w.set(node.outputs[0], x)
    return (0,)


def _elementwise(w: Walk, node: gs.Node) -> tuple[int, ...]:
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


def _concat(w: Walk, node: gs.Node) -> tuple[int, ...]:
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


def _flatten(w: Walk, node: gs.Node) -> tuple[int, ...]:
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


def _reshape(w: Walk, node: gs.Node) -> tuple[int, ...]:
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

RULES: dict[str, Rule] = {
    "Conv": _conv, "ConvTranspose": _conv_transpose, "Gemm": _gemm, "MatMul": _matmul,
    "BatchNormalization": _norm, "InstanceNormalization": _norm, "Concat": _concat,
    "Flatten": _flatten, "Reshape": _reshape,
    **{op: _elementwise for op in _ELEMENTWISE}, **{op: _same for op in _UNARY},
    **{op: _pool for op in _POOLS},
}
