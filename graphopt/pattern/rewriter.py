"""The only mutation API passes use. Every change to a graph goes through a `Rewriter`.

New nodes are appended and the graph is re-sorted on `commit`, so a rewrite can build its
replacement in any order. Graph outputs keep their names: replacing an output tensor renames
the replacement, and a replacement that would make an output alias an input or a constant is
refused by `check_replacement` before anything changes.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir.errors import Refused
from graphopt.ir.graph import constant_values, is_graph_input, is_graph_output, unique_name


def check_replacement(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    """Raise `Refused` if `old` cannot be replaced by `new` everywhere. Pure."""
    if not is_graph_output(graph, old):
        return
    if isinstance(new, gs.Constant):
        raise Refused(f"graph output '{old.name}' would become a constant")
    if is_graph_input(graph, new):
        raise Refused(f"graph output '{old.name}' would alias graph input '{new.name}'")
    if is_graph_output(graph, new):
        raise Refused(f"graph output '{old.name}' would alias graph output '{new.name}'")


class Rewriter:
    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.changes = 0
        self._names: set[str] | None = None

    # -- construction ------------------------------------------------------------------------
    def name(self, prefix: str) -> str:
        if self._names is None:
            self._names = {n.name for n in self.graph.nodes} | set(self.graph.tensors())
        return unique_name(self._names, prefix)

    def constant(self, prefix: str, values: np.ndarray) -> gs.Constant:
        name = self.name(prefix)
        return gs.Constant(name, constant_values(name, values))

    def variable(self, prefix: str, dtype=None, shape=None) -> gs.Variable:
        return gs.Variable(self.name(prefix), dtype=dtype, shape=shape)

    def add_node(self, op: str, inputs: list[gs.Tensor], outputs: list[gs.Tensor],
                 attrs: dict | None = None, name: str | None = None) -> gs.Node:
        node = gs.Node(op, self.name(name or op), attrs=dict(attrs or {}), inputs=list(inputs),
                       outputs=list(outputs))
        self.graph.nodes.append(node)
        self.changes += 1
        return node

    # -- edits -------------------------------------------------------------------------------
    def set_input(self, node: gs.Node, index: int, tensor: gs.Tensor) -> None:
        """Set input `index`; one past the last input appends (optional inputs such as a bias)."""
        if index == len(node.inputs):
            node.inputs.append(tensor)
        else:
            node.inputs[index] = tensor
        self.changes += 1

    def set_output(self, node: gs.Node, index: int, tensor: gs.Tensor) -> None:
        node.outputs[index] = tensor
        self.changes += 1

    def set_attr(self, node: gs.Node, key: str, value) -> None:
        node.attrs[key] = value
        self.changes += 1

    def replace_uses(self, old: gs.Tensor, new: gs.Tensor) -> None:
        """Every reader of `old` reads `new`; a graph output keeps its name."""
        try:
            check_replacement(self.graph, old, new)
        except Refused as e:  # a rule that rewrites without having checked: a bug
            raise ValueError(f"refused replacement: {e.reason}") from None
        for consumer in list(old.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is old:
                    consumer.inputs[i] = new
        if is_graph_output(self.graph, old):
            self.graph.outputs = [new if t is old else t for t in self.graph.outputs]
            old.name, new.name = new.name, old.name
            new.dtype = new.dtype or old.dtype
            new.shape = new.shape if new.shape is not None else old.shape
        self.changes += 1

    def remove(self, node: gs.Node) -> None:
        """Detach `node`; `commit` drops it."""
        node.inputs.clear()
        node.outputs.clear()
        self.changes += 1

    def set_values(self, tensor: gs.Constant, values: np.ndarray) -> None:
        tensor.values = constant_values(tensor.name, values)
        self.changes += 1

    def set_constant_input(self, node: gs.Node, index: int, values: np.ndarray) -> gs.Constant:
        """Input `index` of `node` holds `values` from now on (a weight resized, say).

        Changed in place when `node` is its only reader; otherwise `node` gets a new constant, so
        the other readers keep theirs.
        """
        tensor = node.inputs[index]
        if not isinstance(tensor, gs.Constant):
            raise TypeError(f"input {index} of '{node.name}' is '{tensor.name}', not a constant")
        if len(tensor.outputs) == 1 and not is_graph_output(self.graph, tensor):
            self.set_values(tensor, values)
            return tensor
        fresh = self.constant(tensor.name, values)
        self.set_input(node, index, fresh)
        return fresh

    def set_shape(self, tensor: gs.Variable, shape: list) -> None:
        """Record a tensor's new shape, for a rewrite that changes it (channels removed, say)."""
        tensor.shape = list(shape)
        self.changes += 1

    def fold(self, node: gs.Node, values: list[np.ndarray]) -> None:
        """Turn each output of `node` into a constant holding the matching value, and drop `node`."""
        outputs = list(node.outputs)
        node.outputs.clear()
        for tensor, value in zip(outputs, values):
            tensor.to_constant(constant_values(tensor.name, value))
        node.inputs.clear()
        self.changes += 1

    def commit(self) -> None:
        """Drop detached nodes and unused tensors (never graph inputs), and re-sort."""
        self.graph.cleanup(remove_unused_graph_inputs=False).toposort()
