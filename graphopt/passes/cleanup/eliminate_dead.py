"""eliminate-dead: remove nodes that no graph output depends on, and constants no node reads.

Matches: every node and initializer unreachable from the graph outputs.
Rewrites: removes them. Graph inputs are never removed (they are the model's interface).
Refuses: nothing.
Guarantees: EXACT (only unused work is removed); idempotent.
Verified by: tests/passes/cleanup/test_eliminate_dead.py against onnxruntime.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from graphopt.passes.base import EXACT, Pass, PassContext, PassInfo, PassResult


def _constants(graph: gs.Graph) -> int:
    return sum(isinstance(t, gs.Constant) for t in graph.tensors().values())


class EliminateDead(Pass):
    name = "eliminate-dead"
    info = PassInfo(EXACT)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        nodes, constants = len(graph.nodes), _constants(graph)
        graph.cleanup(remove_unused_graph_inputs=False)
        removed = {"nodes_removed": nodes - len(graph.nodes), "initializers_removed": constants - _constants(graph)}
        return PassResult(any(removed.values()), removed)
