"""Patterns written with ONNX op names, matched purely (matching never mutates the graph).

    Op("BatchNormalization", Op(("Conv", "ConvTranspose"), name="conv"),
       Const("scale"), Const("bias"), Const("mean"), Const("var"), name="bn")

matches a BatchNormalization whose first input comes from a Conv or ConvTranspose used by
nothing else and whose other inputs are constants. A match binds names to nodes (`Op`) or to
constant tensors (`Const`). A match that holds structurally but fails a rule's check raises
`Refused(reason)` (graphopt.ir.errors), which the driver records; a structural mismatch is silent.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from graphopt.ir.graph import producer


@dataclass(frozen=True)
class MatchResult:
    matched: bool
    bound: dict = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.matched

    def __getitem__(self, name: str):
        return self.bound[name]

    @classmethod
    def ok(cls, **bound) -> "MatchResult":
        return cls(True, bound)

    @classmethod
    def no_match(cls) -> "MatchResult":
        return cls(False)


class Pattern:
    def bind(self, tensor: gs.Tensor, bound: dict, outputs: frozenset) -> bool:
        """Match `tensor`, recording bindings; `outputs` holds the ids of the graph's outputs."""
        raise NotImplementedError


class Any(Pattern):
    """Any tensor; bound to `name` when given."""

    def __init__(self, name: str | None = None):
        self.name = name

    def bind(self, tensor, bound, outputs):
        if self.name:
            bound[self.name] = tensor
        return True


class Const(Pattern):
    """A constant tensor (initializer); bound as the `gs.Constant`."""

    def __init__(self, name: str | None = None):
        self.name = name

    def bind(self, tensor, bound, outputs):
        if not isinstance(tensor, gs.Constant):
            return False
        if self.name:
            bound[self.name] = tensor
        return True


class Op(Pattern):
    """A node of one of `ops` in the default domain whose leading inputs match `inputs`.

    As an inner pattern it matches the producer of a tensor, which (when `exclusive`) must have
    no other consumer and not be a graph output, since the rewrite will absorb it.
    """

    def __init__(self, ops: str | tuple[str, ...], *inputs: Pattern, name: str | None = None,
                 exclusive: bool = True):
        self.ops = (ops,) if isinstance(ops, str) else tuple(ops)
        self.inputs = inputs
        self.name = name
        self.exclusive = exclusive

    def match(self, node: gs.Node, graph: gs.Graph) -> MatchResult:
        bound: dict = {}
        outputs = frozenset(id(t) for t in graph.outputs)
        return MatchResult.ok(**bound) if self._bind_node(node, bound, outputs) else MatchResult.no_match()

    def bind(self, tensor, bound, outputs):
        node = producer(tensor)
        if node is None or (self.exclusive and (len(tensor.outputs) != 1 or id(tensor) in outputs)):
            return False
        return self._bind_node(node, bound, outputs)

    def _bind_node(self, node: gs.Node, bound: dict, outputs: frozenset) -> bool:
        if node.op not in self.ops or node.domain not in ("", "ai.onnx", None):
            return False
        if len(node.inputs) < len(self.inputs):
            return False
        if not all(p.bind(t, bound, outputs) for p, t in zip(self.inputs, node.inputs)):
            return False
        if self.name:
            bound[self.name] = node
        return True
