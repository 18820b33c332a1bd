"""prune-n-m: N:M semi-structured sparsity, 2:4 by default (NVIDIA ASP; Mishra et al. 2021), chosen
by magnitude or from calibration data (Wanda; SparseGPT's N:M mode, Frantar & Alistarh 2023).

Matches: the layers of prune-magnitude (same `include` / `exclude` / `skip_first` / `skip_last`).
Rewrites: in every run of M consecutive weights along the axis each output sums over, all but N
to zero, as sparse tensor cores take them: Conv input channels at each output channel and kernel
tap, ConvTranspose input channels, the K axis of Gemm and MatMul. Biases stay. `method` chooses the
N: the largest magnitudes, or (wanda, sparsegpt: graphopt.passes.prune.sparsegpt) those whose loss
changes the layer's output least on the calibration inputs, SparseGPT also updating the weights it
keeps. With --data the default is sparsegpt; without, magnitude. The data-aware methods visit a
Conv's im2col columns tap by tap so that each run of M is M consecutive columns; layers the row
view does not cover (ConvTranspose, a constant A, a batched MatMul weight) fall back to magnitude.
Refuses: a layer whose reduction size (input channels per group for convolutions, K otherwise)
is not a multiple of M; as prune-magnitude, a weight shared, a graph output, or not floating point.
Guarantees: LOSSY(cosine >= 0.8) at 2:4 (bundled builders, digits CNN); every run of M holds at
most N non-zeros; idempotent.
Verified by: tests/passes/prune/test_n_m.py against onnxruntime, reading the pattern back from the
saved model with reduction axes written out per op; the math by tests/passes/prune/test_sparsegpt.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir.errors import PipelineError
from graphopt.ir.verify import TOPOSORTED
from graphopt.passes import activations
from graphopt.passes.base import LOSSY, Layer, PassContext, PassInfo, PassResult, Refused, option
from graphopt.passes.prune.magnitude import Cut, Prunable, WeightOptions, WeightPruning, set_weight_matrix
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
class Options(WeightOptions):
    n: int = option(2, "weights kept in each run of m")
    m: int = option(4, "length of the runs along the reduction axis")

    def __post_init__(self):
        self.check("prune-n-m")
        if not 0 < self.n < self.m:
            raise PipelineError(f"prune-n-m: need 0 < n < m (got n={self.n}, m={self.m})")
        if self.block_size % self.m:
            raise PipelineError(f"prune-n-m: block_size={self.block_size} must be a multiple of m={self.m}, "
                                "so that no run of m straddles two blocks")


class PruneNM(WeightPruning):
    name = "prune-n-m"
    info = PassInfo(LOSSY("cosine", 0.8), requires=frozenset({TOPOSORTED}))
    Options = Options

    def examine(self, node: gs.Node, graph: gs.Graph) -> Prunable:
        target = super().examine(node, graph)
        shape = target.tensors[0].shape
        length = group_size(node, shape[reduction_axis(node, target.inputs[0], len(shape))])
        if length % self.options.m:
            raise Refused(f"reduction size {length} of {node.op} '{node.name}' is not a multiple of {self.options.m}")
        return target

    def plan(self, layers: list[Layer], graph: gs.Graph, ctx: PassContext,
             result: PassResult) -> list[tuple[Layer, Cut]]:
        cuts = self.calibrate(graph, layers, ctx) if layers else {}
        return [(layer, cuts[layer.name]) for layer in layers]

    def column_order(self, node: gs.Node) -> np.ndarray | None:
        """A Conv's im2col columns are (channel, tap); visited tap by tap, the runs of M input
        channels at one tap (the layout sparse kernels take) are M consecutive columns."""
        if node.op != "Conv":
            return None
        channels, height, width = node.inputs[1].shape[1:]
        return np.arange(channels * height * width).reshape(channels, height * width).T.ravel()

    def prune(self, rw: Rewriter, target: Prunable, plan: Cut) -> None:
        if plan.hessian is not None:
            matrix = activations.weight_matrix(target.node)
            set_weight_matrix(rw, target.node, plan.hessian.prune(matrix, plan.method,
                                                                  n_m=(self.options.n, self.options.m)))
            return
        weight = target.tensors[0]
        values = weight.values
        pruned = keep_n_of_m(values, reduction_axis(target.node, target.inputs[0], values.ndim),
                             self.options.n, self.options.m)
        if not np.array_equal(pruned, values):
            rw.set_values(weight, pruned)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = super().run(graph, ctx)
        result.stats["pattern"] = f"{self.options.n}:{self.options.m}"
        return result
