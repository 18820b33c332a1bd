"""prune-n-m: N:M semi-structured sparsity (2:4 by default): in every group of M consecutive
weights along the reduction axis, only the N largest in magnitude are kept.

Matches: Conv, ConvTranspose, Gemm and MatMul with a floating-point constant weight (the layers
of prune-magnitude, chosen by the same `include` / `exclude` / `skip_first` / `skip_last`). The
groups run along the axis each output sums over, as NVIDIA's sparse tensor cores (and its ASP
library) take them: for Conv the input channels of a group, at each output channel and kernel
position (a group never spans two kernel taps); for ConvTranspose its input channels; for Gemm
and MatMul the K axis of the weight operand.
Refuses, with the reason in stats, a layer whose reduction size (input channels per group for
convolutions, K otherwise) is not a multiple of M, and, as prune-magnitude does, a weight shared
with another node, a graph output, or a weight that is not floating point. Biases are never pruned.
Guarantees: LOSSY(cosine >= 0.8), the bound the tests hold the bundled builders (random weights,
the worst case) and the digits CNN to at 2:4; every group of M holds at most N non-zeros;
idempotent.
Verified by: tests/passes/prune/test_n_m.py against onnxruntime, reading the pattern back from the
saved model.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir.errors import PipelineError
from graphopt.ir.verify import TOPOSORTED
from graphopt.passes.base import LOSSY, Pass, PassContext, PassInfo, PassResult
from graphopt.passes.prune.magnitude import Prunable, select_layers
from graphopt.pattern import Rewriter


def reduction_axis(node: gs.Node, index: int, ndim: int) -> int:
    """The axis of input `index` (the weight) that the node's outputs sum over."""
    if node.op == "Conv":
        return 1
    if node.op == "ConvTranspose":
        return 0
    if node.op == "Gemm":
        transposed = node.attrs.get("transA" if index == 0 else "transB", 0)
        return (0 if transposed else 1) if index == 0 else (1 if transposed else 0)
    if ndim == 1:  # a vector operand of MatMul is its own K axis
        return 0
    return ndim - 1 if index == 0 else ndim - 2


def group_size(node: gs.Node, axis_length: int) -> int:
    """Elements along the reduction axis that belong to one convolution group (all of them otherwise)."""
    return axis_length // node.attrs.get("group", 1) if node.op == "ConvTranspose" else axis_length


def keep_n_of_m(values: np.ndarray, axis: int, n: int, m: int) -> np.ndarray:
    """A copy of `values` with the M - N smallest magnitudes of each run of M along `axis` set to zero."""
    moved = np.moveaxis(values, axis, -1)
    groups = moved.reshape(-1, m).copy()
    drop = np.argpartition(np.abs(groups), m - n - 1, axis=1)[:, :m - n]
    np.put_along_axis(groups, drop, 0, axis=1)
    return np.moveaxis(groups.reshape(moved.shape), -1, axis)


@dataclass(frozen=True)
class Options:
    n: int = 2
    m: int = 4
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    skip_first: bool = False
    skip_last: bool = False

    def __post_init__(self):
        if not 0 < self.n < self.m:
            raise PipelineError(f"prune-n-m: need 0 < n < m (got n={self.n}, m={self.m})")


class PruneNM(Pass):
    name = "prune-n-m"
    info = PassInfo(LOSSY("cosine", 0.8), requires=frozenset({TOPOSORTED}))
    Options = Options

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        o = self.options
        selection = select_layers(graph, o.include, o.exclude, o.skip_first, o.skip_last)
        rw = Rewriter(graph)
        refused, layers, zeroed = list(selection.refused), {}, 0
        for layer in selection.layers:
            why = self._refusal(layer)
            if why:
                refused.append({"node": layer.node.name, "reason": why})
                continue
            before = layer.zeros()
            weight = layer.tensors[0]
            values = weight.values
            axis = reduction_axis(layer.node, layer.inputs[0], values.ndim)
            pruned = keep_n_of_m(values, axis, o.n, o.m)
            if not np.array_equal(pruned, values):
                rw.set_values(weight, pruned)
            zeroed += layer.zeros() - before
            layers[layer.node.name] = {"op": layer.node.op, "params": layer.size,
                                       "sparsity": round(layer.zeros() / layer.size, 4)}
        if rw.changes:
            rw.commit()
        stats = {"pattern": f"{o.n}:{o.m}", "params_zeroed": zeroed, "layers": layers,
                 "refused": refused, "skipped": selection.skipped}
        return PassResult(rw.changes > 0, stats)

    def _refusal(self, layer: Prunable) -> str | None:
        node, shape = layer.node, layer.tensors[0].shape
        axis = reduction_axis(node, layer.inputs[0], len(shape))
        length = group_size(node, shape[axis])
        if length % self.options.m:
            return (f"reduction size {length} of {node.op} '{node.name}' is not a multiple of "
                    f"{self.options.m}")
        return None
