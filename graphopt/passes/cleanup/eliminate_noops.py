"""eliminate-noops: remove nodes that pass their input through unchanged.

Matches: Identity; Dropout in inference (no training_mode or a constant false one, mask unused);
Cast to the input's own type; Reshape, Flatten, Squeeze, Unsqueeze and Expand whose static output
shape equals the input's; Transpose with the identity permutation; Pad with all-zero pads;
Transpose-of-Transpose and Reshape-of-Reshape.
Rewrites: readers of the no-op read its input; the pairs become one node.
Refuses: a removal that would make a graph output alias a graph input, a constant or another
output.
Guarantees: EXACT (no arithmetic changes); idempotent.
Verified by: tests/passes/cleanup/test_eliminate_noops.py against onnxruntime.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir.graph import const_value, is_graph_output, np_dtype, static_shape
from graphopt.ir.verify import SHAPES_INFERRED
from graphopt.passes.base import EXACT, PassInfo, RewritePass
from graphopt.pattern import Any, Const, MatchResult, Op, Rewriter, Rule, check_replacement

SHAPE_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand")


def _passthrough(node: gs.Node, graph: gs.Graph) -> MatchResult:
    """The node is a no-op: its output can be replaced by its first input, unless that is refused."""
    if any(not t.is_empty() and (t.outputs or is_graph_output(graph, t)) for t in node.outputs[1:]):
        return MatchResult.no_match()  # a second output (Dropout's mask) is in use
    check_replacement(graph, node.outputs[0], node.inputs[0])
    return MatchResult.ok()


def match_identity(node, graph):
    return _passthrough(node, graph)


def match_dropout(node, graph):
    training = node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
    if training is not None:
        value = const_value(training)
        if value is None or bool(value):
            return MatchResult.no_match()
    return _passthrough(node, graph)


def match_cast(node, graph):
    src = node.inputs[0].dtype
    if src is None or np_dtype(src) != np_dtype(node.attrs["to"]):
        return MatchResult.no_match()
    return _passthrough(node, graph)


def match_shape_op(node, graph):
    before, after = static_shape(node.inputs[0]), static_shape(node.outputs[0])
    if before is None or before != after:
        return MatchResult.no_match()
    return _passthrough(node, graph)


def match_transpose(node, graph):
    perm = node.attrs.get("perm")
    if perm is None or list(perm) != list(range(len(perm))):
        return MatchResult.no_match()
    return _passthrough(node, graph)


def match_pad(node, graph):
    pads = node.attrs.get("pads") if "pads" in node.attrs else (
        const_value(node.inputs[1]) if len(node.inputs) > 1 else None)
    if pads is None or np.any(np.asarray(pads) != 0):
        return MatchResult.no_match()
    return _passthrough(node, graph)


def remove_passthrough(rw: Rewriter, node: gs.Node, m: MatchResult) -> None:
    rw.replace_uses(node.outputs[0], node.inputs[0])
    rw.remove(node)


TRANSPOSE_PAIR = Op("Transpose", Op("Transpose", Any("x"), name="inner"), name="outer")


def match_transpose_pair(node, graph):
    m = TRANSPOSE_PAIR.match(node, graph)
    if not m or m["inner"].attrs.get("perm") is None or node.attrs.get("perm") is None:
        return MatchResult.no_match()
    return m


def compose_transposes(rw: Rewriter, node: gs.Node, m: MatchResult) -> None:
    inner, outer = m["inner"].attrs["perm"], node.attrs["perm"]
    rw.set_attr(node, "perm", [int(inner[p]) for p in outer])
    rw.set_input(node, 0, m["x"])
    rw.remove(m["inner"])


RESHAPE_PAIR = Op("Reshape", Op("Reshape", Any("x"), name="inner"), Const("shape"), name="outer")


def match_reshape_pair(node, graph):
    m = RESHAPE_PAIR.match(node, graph)
    # A 0 in the outer shape copies a dimension of its input, which the inner reshape defines.
    if not m or np.any(m["shape"].values == 0):
        return MatchResult.no_match()
    return m


def skip_inner_reshape(rw: Rewriter, node: gs.Node, m: MatchResult) -> None:
    rw.set_input(node, 0, m["x"])
    rw.remove(m["inner"])


class EliminateNoops(RewritePass):
    name = "eliminate-noops"
    info = PassInfo(EXACT, requires=frozenset({SHAPES_INFERRED}))
    rules = (
        Rule("identity", ("Identity",), match_identity, remove_passthrough),
        Rule("dropout", ("Dropout",), match_dropout, remove_passthrough),
        Rule("cast", ("Cast",), match_cast, remove_passthrough),
        Rule("shape-noop", SHAPE_OPS, match_shape_op, remove_passthrough),
        Rule("transpose-identity", ("Transpose",), match_transpose, remove_passthrough),
        Rule("transpose-pair", ("Transpose",), match_transpose_pair, compose_transposes),
        Rule("reshape-pair", ("Reshape",), match_reshape_pair, skip_inner_reshape),
        Rule("pad-zero", ("Pad",), match_pad, remove_passthrough),
    )
