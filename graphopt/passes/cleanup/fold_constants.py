"""fold-constants: evaluate nodes whose inputs are all constants, once, at compile time.

Matches: nodes of the default domain whose inputs are constants (or folded in this pass), and
`Shape` (with start/end) / `Size` of tensors whose shape is static.
Rewrites: each such node's outputs become initializers, computed by onnxruntime with graph
optimisations off.
Refuses: results that would grow the model by more than `max_growth_bytes`, outputs that are
graph outputs, nodes onnxruntime cannot evaluate. Never folds QuantizeLinear/DequantizeLinear
(turning quantized weights into int8 initializers is fold-qdq's job), random ops, or subgraphs.
Guarantees: EXACT; idempotent.
Verified by: tests/passes/cleanup/test_fold_constants.py against onnxruntime.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import ort
from graphopt.ir.graph import constant_nbytes, export, is_graph_output, static_shape
from graphopt.ir.verify import SHAPES_INFERRED, TOPOSORTED
from graphopt.passes.base import EXACT, Pass, PassContext, PassInfo, PassResult, Refusal, option
from graphopt.pattern import Rewriter

NEVER_FOLD = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
    "If", "Loop", "Scan", "SequenceMap", "Constant",
})
# Ops that can turn a few bytes into many; folded only when their output size is known and small.
GENERATORS = frozenset({"ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Pad", "Upsample", "OneHot"})


@dataclass(frozen=True)
class Options:
    max_growth_bytes: int = option(1 << 20, "refuse a fold whose results are this many bytes larger than its inputs")
    max_rounds: int = option(16, "at most this many rounds of folding")


class FoldConstants(Pass):
    name = "fold-constants"
    info = PassInfo(EXACT, requires=frozenset({TOPOSORTED, SHAPES_INFERRED}))
    Options = Options

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        rewriter, refused = Rewriter(graph), {}
        folded = _fold_constant_nodes(graph, rewriter)
        for _ in range(self.options.max_rounds):
            count = _fold_shapes(graph, rewriter) + self._fold_round(graph, rewriter, refused)
            rewriter.commit()
            if not count:
                break
            folded += count
        return PassResult(folded > 0, {"folded": folded}, [Refusal(n, r) for n, r in refused.items()])

    def _fold_round(self, graph: gs.Graph, rewriter: Rewriter, refused: dict) -> int:
        candidates = [n for n in graph.nodes if _foldable(n, graph, refused)]
        if not candidates:
            return 0
        values = _evaluate(graph, candidates, refused)
        count = 0
        for node in candidates:
            outs = [values.get(t.name) for t in node.outputs]
            if any(v is None for v in outs):
                continue
            growth = sum(v.nbytes for v in outs) - sum(
                constant_nbytes(t) for t in node.inputs if isinstance(t, gs.Constant))
            if growth > self.options.max_growth_bytes:
                refused[node.name] = f"result would grow the model by {growth} bytes"
                continue
            rewriter.fold(node, outs)
            count += 1
        return count


def _fold_constant_nodes(graph: gs.Graph, rewriter: Rewriter) -> int:
    """Constant nodes holding a tensor (as Paddle and some exporters write weights) become
    initializers as they are, so later passes see weights; the other forms (value_float, ...)
    are small and evaluated with the rest."""
    count = 0
    for node in graph.nodes:
        value = node.attrs.get("value")
        if node.op == "Constant" and isinstance(value, gs.Constant) and not is_graph_output(graph, node.outputs[0]):
            rewriter.fold(node, [value.values])
            count += 1
    if count:
        rewriter.commit()
    return count


def _foldable(node: gs.Node, graph: gs.Graph, refused: dict) -> bool:
    if node.op in NEVER_FOLD or node.domain not in ("", "ai.onnx", None) or not node.outputs:
        return False
    if not all(t.is_empty() or isinstance(t, gs.Constant) for t in node.inputs):
        return False
    if not any(isinstance(t, gs.Constant) for t in node.inputs) and node.op != "Constant":
        return False  # nothing to fold from (e.g. an op with only optional inputs)
    if any(is_graph_output(graph, t) for t in node.outputs):
        refused[node.name] = "output is a graph output"
        return False
    if node.op in GENERATORS and not _small_output(node):
        refused[node.name] = "output size unknown or large; folding would grow the model"
        return False
    return True


def _small_output(node: gs.Node, limit_elements: int = 1 << 18) -> bool:
    shapes = [static_shape(t) for t in node.outputs]
    return all(s is not None and int(np.prod(s)) <= limit_elements for s in shapes)


def _evaluate(graph: gs.Graph, nodes: list[gs.Node], refused: dict) -> dict[str, np.ndarray]:
    """Run `nodes` in onnxruntime: all at once, or one by one if the batch fails."""
    try:
        return _run_nodes(graph, nodes)
    except Exception:  # noqa: BLE001 - find which node onnxruntime rejects
        values = {}
        for node in nodes:
            try:
                values.update(_run_nodes(graph, [node]))
            except Exception as e:  # noqa: BLE001 - onnxruntime raises several unrelated types
                refused[node.name] = f"onnxruntime cannot evaluate it: {str(e).splitlines()[0][:200]}"
        return values


def _run_nodes(graph: gs.Graph, nodes: list[gs.Node]) -> dict[str, np.ndarray]:
    outputs = [t for n in nodes for t in n.outputs if not t.is_empty()]
    sub = gs.Graph(nodes=nodes, inputs=[], outputs=outputs, opset=graph.opset,
                   import_domains=graph.import_domains, ir_version=graph.ir_version)
    return ort.run(export(sub), {})


def _fold_shapes(graph: gs.Graph, rewriter: Rewriter) -> int:
    count = 0
    for node in graph.nodes:
        if node.op not in ("Shape", "Size") or not node.outputs or is_graph_output(graph, node.outputs[0]):
            continue
        shape = static_shape(node.inputs[0])
        if shape is None:
            continue
        if node.op == "Size":
            value = np.array(int(np.prod(shape)), dtype=np.int64)
        else:
            start, end = node.attrs.get("start", 0), node.attrs.get("end", len(shape))
            # Python slicing clamps out-of-range starts and ends exactly as Shape-15 does.
            value = np.array(shape[start:end], dtype=np.int64)
        rewriter.fold(node, [value])
        count += 1
    return count
