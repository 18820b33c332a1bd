"""Named invariants over a `gs.Graph`, checked around every pass.

Each invariant can check a graph; some can also establish themselves (a pass that `requires`
TOPOSORTED gets a sorted graph). `Signature` captures a graph's interface so that a pass can be
checked for keeping input and output names, dtypes and shapes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.ir.graph import infer_shapes, np_dtype, skeleton_of

TOPOSORTED = "TOPOSORTED"
SHAPES_INFERRED = "SHAPES_INFERRED"
NO_WEIGHT_QDQ = "NO_WEIGHT_QDQ"
UNIQUE_NAMES = "UNIQUE_NAMES"
NODES_NAMED = "NODES_NAMED"
CHECKER = "CHECKER"


@dataclass(frozen=True)
class Invariant:
    name: str
    check: Callable[[gs.Graph], list[str]]
    establish: Callable[[gs.Graph], object] | None = None


def _toposorted(graph: gs.Graph) -> list[str]:
    seen = {id(t) for t in graph.inputs} | {id(t) for t in graph.tensors().values() if isinstance(t, gs.Constant)}
    problems = []
    for node in graph.nodes:
        for t in node.inputs:
            if not t.is_empty() and id(t) not in seen and t.inputs:
                problems.append(f"node '{node.name}' reads '{t.name}' before it is produced")
        seen.update(id(t) for t in node.outputs)
    return problems


def _shapes_inferred(graph: gs.Graph) -> list[str]:
    return [f"tensor '{t.name}' has no dtype" for node in graph.nodes for t in node.outputs
            if isinstance(t, gs.Variable) and t.dtype is None and t.outputs]


def _no_weight_qdq(graph: gs.Graph) -> list[str]:
    return [f"node '{n.name}' quantizes constant '{n.inputs[0].name}' at run time" for n in graph.nodes
            if n.op == "QuantizeLinear" and isinstance(n.inputs[0], gs.Constant)]


def _unique_names(graph: gs.Graph) -> list[str]:
    seen, dups = set(), []
    for n in graph.nodes:
        if n.name and n.name in seen:
            dups.append(f"node name '{n.name}' is used twice")
        seen.add(n.name)
    producers: dict[str, int] = {}
    for n in graph.nodes:
        for t in n.outputs:
            if t.name:  # "" marks an omitted optional output, not a name
                producers[t.name] = producers.get(t.name, 0) + 1
    return dups + [f"tensor '{k}' is produced {v} times" for k, v in producers.items() if v > 1]


def _nodes_named(graph: gs.Graph) -> list[str]:
    return [f"a {n.op} node has no name" for n in graph.nodes if not n.name]


def name_nodes(graph: gs.Graph) -> None:
    """Name every unnamed node `<op>_<n>`, unique in the graph. Exporters often leave names empty,
    and passes report, include/exclude and key their per-layer decisions by node name."""
    taken = {n.name for n in graph.nodes}
    counter = 0
    for node in graph.nodes:
        if node.name:
            continue
        while f"{node.op}_{counter}" in taken:
            counter += 1
        node.name = f"{node.op}_{counter}"
        taken.add(node.name)


def _checker(graph: gs.Graph) -> list[str]:
    try:
        onnx.checker.check_model(skeleton_of(graph))
    except onnx.checker.ValidationError as e:
        return [str(e).strip().splitlines()[0]]
    return []


INVARIANTS = {inv.name: inv for inv in (
    Invariant(TOPOSORTED, _toposorted, lambda g: g.toposort()),
    Invariant(SHAPES_INFERRED, _shapes_inferred, infer_shapes),
    Invariant(NO_WEIGHT_QDQ, _no_weight_qdq),
    Invariant(UNIQUE_NAMES, _unique_names),
    Invariant(NODES_NAMED, _nodes_named, name_nodes),
    Invariant(CHECKER, _checker),
)}
# Checked after every pass when verification is on, whatever the pass declares.
ALWAYS = (TOPOSORTED, UNIQUE_NAMES, CHECKER)


def check(graph: gs.Graph, names) -> list[str]:
    """Problems found, each prefixed with the invariant's name; [] when all hold."""
    return [f"{name}: {p}" for name in names for p in INVARIANTS[name].check(graph)]


@dataclass(frozen=True)
class Signature:
    """A graph's interface: names, dtypes and shapes of its inputs and outputs."""
    inputs: tuple
    outputs: tuple

    @classmethod
    def of(cls, graph: gs.Graph) -> "Signature":
        def describe(tensors):
            return tuple((t.name, None if t.dtype is None else np_dtype(t.dtype).name,
                          None if t.shape is None else tuple(t.shape)) for t in tensors)
        return cls(describe(graph.inputs), describe(graph.outputs))

    def differences(self, other: "Signature") -> list[str]:
        problems = []
        for kind, mine, theirs in (("input", self.inputs, other.inputs), ("output", self.outputs, other.outputs)):
            if [m[0] for m in mine] != [t[0] for t in theirs]:
                problems.append(f"graph {kind}s changed from {[m[0] for m in mine]} to {[t[0] for t in theirs]}")
                continue
            for m, t in zip(mine, theirs):
                if m[1] != t[1] or not _shapes_compatible(m[2], t[2]):
                    problems.append(f"graph {kind} '{m[0]}' changed from {m[1]}{list(m[2] or [])} "
                                    f"to {t[1]}{list(t[2] or [])}")
        return problems


def _shapes_compatible(a: tuple | None, b: tuple | None) -> bool:
    """Same rank and equal wherever both dimensions are known; a symbolic dimension may become known."""
    if a is None or b is None:
        return True
    known = (int, np.integer)
    return len(a) == len(b) and all(x == y for x, y in zip(a, b) if isinstance(x, known) and isinstance(y, known))
