"""prune-magnitude: unstructured pruning of Conv, ConvTranspose, Gemm, MatMul weights, by magnitude
(Han et al. 2015) or from calibration data (Wanda, Sun et al. 2023; SparseGPT, Frantar & Alistarh 2023).

Matches: each such node with a constant weight (Gemm and MatMul: the constant operand, B when
both are), with its bias when `prune_bias`; `include` / `exclude`, `skip_first` / `skip_last`.
Rewrites: the `sparsity` fraction of each layer's weights to zero (scope="layer"), under one
magnitude threshold (scope="global"), or spread over layers by measured sensitivity
(allocation="sensitivity"). Which weights of a layer go is the `method`'s choice: the smallest
magnitudes, or (wanda, sparsegpt: graphopt.passes.prune.sparsegpt) those whose loss changes the
layer's output least on the calibration inputs, SparseGPT also updating the weights it keeps. With
--data the default is sparsegpt with sensitivity allocation (the best measured on digits); without,
magnitude and uniform. Layers the row view does not cover (ConvTranspose, a constant A) fall back
to magnitude, and say so in their decision. The zeros are stored: the model compresses smaller,
runs no faster.
Refuses: a weight (or pruned bias) shared with another node, a graph output, or not floating point.
Guarantees: LOSSY(cosine >= 0.85) at the default sparsity 0.5; exactly the layer's count of zeros;
sparsity 0 changes nothing; idempotent at the same options. Details: docs/passes/prune-magnitude.md.
Verified by: tests/passes/prune/test_magnitude.py against onnxruntime.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir.data import input_specs, random_feeds
from graphopt.ir.errors import PipelineError
from graphopt.ir.graph import np_dtype
from graphopt.ir.verify import TOPOSORTED
from graphopt.passes import activations, sensitivity
from graphopt.passes.base import (LOSSY, Layer, LayerOptions, LayerPass, PassContext, PassInfo, PassResult,
                                  option)
from graphopt.passes.prune.sparsegpt import LayerHessian, split_count
from graphopt.passes.weights import check_weight
from graphopt.pattern import Rewriter

PRUNABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul")
METHODS = ("auto", "magnitude", "wanda", "sparsegpt")
# What method="auto" means with the user's --data: the best measured on the digits CNN
# (docs/passes/prune-magnitude.md). Without data it means magnitude: random inputs say nothing.
DATA_METHOD = "sparsegpt"
ALLOCATIONS = ("auto", "uniform", "sensitivity")
DATA_ALLOCATION = "sensitivity"


@dataclass(frozen=True)
class Prunable:
    """A node and the indices of its inputs that are pruned together (the weight first)."""
    node: gs.Node
    inputs: tuple[int, ...]

    @property
    def tensors(self) -> list[gs.Constant]:
        return [self.node.inputs[i] for i in self.inputs]

    @property
    def size(self) -> int:
        return int(sum(np.prod(t.shape, dtype=np.int64) for t in self.tensors))

    def flat(self) -> np.ndarray:
        return np.concatenate([t.values.ravel() for t in self.tensors])

    def zeros(self) -> int:
        return int(sum(t.values.size - np.count_nonzero(t.values) for t in self.tensors))


@dataclass(frozen=True)
class Cut:
    """How one layer is pruned: by `method`, with the layer's `hessian` for a data-aware one;
    `count` values (prune-magnitude; prune-n-m keeps N of M instead); `fallback`: why a layer
    the options wanted pruned from data is pruned by magnitude."""
    method: str
    hessian: LayerHessian | None = None
    count: int = 0
    fallback: str = ""

    def with_count(self, count: int) -> Cut:
        return Cut(self.method, self.hessian, count, self.fallback)


def weight_index(node: gs.Node) -> int | None:
    """Which input holds the node's constant weight, or None (an activation product, not a layer)."""
    candidates = (1, 0) if node.op in ("Gemm", "MatMul") else (1,)
    found = [i for i in candidates if len(node.inputs) > i and isinstance(node.inputs[i], gs.Constant)]
    return found[0] if found else None


def prunable(node: gs.Node, prune_bias: bool) -> Prunable:
    """The node's weight, and its bias when `prune_bias` (a MatMul's bias is a separate Add)."""
    has_bias = node.op != "MatMul" and len(node.inputs) > 2 and not node.inputs[2].is_empty()
    return Prunable(node, (weight_index(node),) + ((2,) if prune_bias and has_bias else ()))


@dataclass(frozen=True)
class WeightOptions(LayerOptions):
    """The options of the passes that zero weights in place (prune-magnitude, prune-n-m): which
    layers, and which weights of a layer (the method). Options derived from it call `check`."""
    skip_first: bool = option(False, "leave the first prunable layer (in graph order) whole")
    skip_last: bool = option(False, "leave the last prunable layer (in graph order) whole")
    method: str = option("auto", "which weights go: 'magnitude' (the smallest), 'wanda' (smallest |W| x input "
                                 "RMS per output), 'sparsegpt' (least output error, the rest updated); 'auto': "
                                 "sparsegpt with --data, magnitude without")
    damping: float = option(0.01, "sparsegpt: added to the Hessian's diagonal, as a fraction of its mean")
    block_size: int = option(128, "sparsegpt: columns whose mask is chosen together")

    def check(self, pass_name: str) -> None:
        if self.method not in METHODS:
            raise PipelineError(f"{pass_name}: method={self.method!r} must be one of {', '.join(METHODS)}")
        if not self.damping > 0:
            raise PipelineError(f"{pass_name}: damping={self.damping} must be positive (0.01: 1% of mean(diag H))")
        if self.block_size < 1:
            raise PipelineError(f"{pass_name}: block_size={self.block_size} must be a positive number of columns")


class WeightPruning(LayerPass):
    """Zeroing weights in place, layer by layer: the nodes of PRUNABLE with a constant weight.

    A subclass plans each layer (`plan` / `plan_layer`) as a `Cut` and zeroes by `prune`; each
    layer's decision is its parameters, its zeros after the pass, those the pass added, and the
    method. Options must derive from WeightOptions.
    """

    ops = PRUNABLE

    def prunes_bias(self) -> bool:
        return False

    def prune(self, rw: Rewriter, target: Prunable, plan: Cut) -> None:
        raise NotImplementedError

    def column_order(self, node: gs.Node) -> np.ndarray | None:
        """The order a data-aware method visits the weight matrix's K columns in (None: as they are)."""
        return None

    def method(self, ctx: PassContext | None) -> str:
        """The method the options choose in this context ('auto' resolved)."""
        if self.options.method != "auto":
            return self.options.method
        return DATA_METHOD if ctx is not None and ctx.from_data else "magnitude"

    def calibrate(self, graph: gs.Graph, layers: list[Layer], ctx: PassContext) -> dict[str, Cut]:
        """Each layer's Cut (count 0): the Hessian of its inputs on the calibration data when the
        method is data-aware, streamed once for all layers; magnitude where the row view does not
        cover the layer."""
        method = self.method(ctx)
        if method == "magnitude":
            return {layer.name: Cut("magnitude") for layer in layers}
        why = {layer.name: no_rows(layer.node) for layer in layers}
        nodes = [layer.node for layer in layers if why[layer.name] is None]
        stats = {}
        if nodes:
            feeds = ctx.feeds if ctx.feeds is not None else random_feeds(input_specs(graph), ctx.seed, batch=8)
            report = (lambda done, total: ctx.progress("calibrate", done, total)) if ctx.progress else None
            stats = activations.statistics(graph, nodes, feeds, progress=report)
        o = self.options
        return {layer.name: Cut(method, LayerHessian(s.hessian, o.damping, o.block_size,
                                                     self.column_order(layer.node), s.rows_seen))
                if (s := stats.get(layer.name)) else Cut("magnitude", fallback=f"{method}: {why[layer.name]}")
                for layer in layers}

    def candidates(self, graph: gs.Graph) -> list[gs.Node]:
        return [n for n in super().candidates(graph) if weight_index(n) is not None]

    def skip_reason(self, position: int, nodes: list[gs.Node]) -> str | None:
        if self.options.skip_first and position == 0:
            return "first layer (skip_first)"
        if self.options.skip_last and position == len(nodes) - 1:
            return "last layer (skip_last)"
        return None

    def examine(self, node: gs.Node, graph: gs.Graph) -> Prunable:
        target = prunable(node, self.prunes_bias())
        for tensor in target.tensors:
            check_weight(graph, tensor, "prune")
        return target

    def rewrite(self, rw: Rewriter, layer: Layer, plan: Cut) -> dict:
        target: Prunable = layer.match
        before = target.zeros()
        self.prune(rw, target, plan)
        zeros = target.zeros()  # the rewriter sets values at once
        return {"op": layer.node.op, "params": target.size, "zeros": zeros, "zeroed": zeros - before,
                "sparsity": round(zeros / target.size, 4), "method": plan.method,
                **({"fallback": plan.fallback} if plan.fallback else {})}

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = super().run(graph, ctx)
        decisions = result.decisions.values()
        size = sum(d["params"] for d in decisions)
        result.stats["sparsity"] = round(sum(d["zeros"] for d in decisions) / size, 4) if size else 0.0
        result.stats["params_zeroed"] = sum(d["zeroed"] for d in decisions)
        result.stats["method"] = self.method(ctx)
        return result


def no_rows(node: gs.Node) -> str | None:
    """Why the layer has no calibration rows to learn from, or None when it has."""
    if isinstance(node.inputs[0], gs.Constant):
        return activations.supported(node) or "its input is a constant, not calibration data"
    return activations.supported(node)


def set_weight_matrix(rw: Rewriter, node: gs.Node, matrix: np.ndarray) -> None:
    """Write a [groups, rows, K] matrix back into the node's weight, when it changed anything."""
    values = activations.weight_values(node, matrix)
    if not np.array_equal(values, node.inputs[1].values):
        rw.set_values(node.inputs[1], values)


def zero_smallest(values: np.ndarray, count: int) -> tuple[np.ndarray, bool]:
    """A copy of `values` with its `count` smallest magnitudes set to zero, and whether any of them
    was not zero already. Where there are more zeros than `count`, nothing changes."""
    flat = values.ravel().copy()
    if count <= 0:
        return flat.reshape(values.shape), False
    drop = np.argpartition(np.abs(flat), count - 1)[:count] if count < flat.size else slice(None)
    changed = bool(np.any(flat[drop] != 0))
    flat[drop] = 0
    return flat.reshape(values.shape), changed


def prune_layer(rw: Rewriter, target: Prunable, count: int) -> bool:
    """Zero the `count` smallest magnitudes of the layer's tensors taken together."""
    pruned, changed = zero_smallest(target.flat(), count)
    if not changed:
        return False
    offset = 0
    for tensor in target.tensors:
        n = int(np.prod(tensor.shape, dtype=np.int64))
        rw.set_values(tensor, pruned[offset:offset + n].reshape(tensor.shape).astype(np_dtype(tensor.dtype)))
        offset += n
    return True


def prune_from_data(rw: Rewriter, target: Prunable, cut: Cut) -> None:
    """Zero `cut.count` values of the layer by its data-aware method. A pruned bias takes its share
    of the count by magnitude: it multiplies a constant 1, so its magnitude is its Wanda score."""
    shares = split_count(cut.count, [int(np.prod(t.shape, dtype=np.int64)) for t in target.tensors])
    node = target.node
    set_weight_matrix(rw, node, cut.hessian.prune(activations.weight_matrix(node), cut.method, count=int(shares[0])))
    if len(target.tensors) > 1:
        bias = target.tensors[1]
        pruned, changed = zero_smallest(bias.values, int(shares[1]))
        if changed:
            rw.set_values(bias, pruned.astype(np_dtype(bias.dtype)))


def global_counts(targets: list[Prunable], sparsity: float) -> list[int]:
    """How many values each layer loses under one magnitude threshold across all of them."""
    magnitudes = np.concatenate([np.abs(t.flat().astype(np.float32)) for t in targets])
    count = round(sparsity * magnitudes.size)
    if count == 0:
        return [0] * len(targets)
    chosen = np.argpartition(magnitudes, count - 1)[:count] if count < magnitudes.size else np.arange(count)
    bounds = np.cumsum([t.size for t in targets])
    return np.bincount(np.searchsorted(bounds, chosen, side="right"), minlength=len(targets)).tolist()


def budget_counts(sizes: list[int], ratios: list[float], total: int) -> list[int]:
    """Integer counts near `size * ratio` that add up to `total` (largest remainders round up)."""
    exact = np.array(sizes, np.float64) * np.array(ratios, np.float64)
    # The epsilon keeps a ratio of exactly k/size from flooring to k - 1 through float rounding.
    counts = np.minimum(np.floor(exact + 1e-6).astype(np.int64), sizes)
    short = total - int(counts.sum())
    if short > 0:
        for i in np.argsort(-(exact - counts), kind="stable")[:short]:
            counts[i] += 1
    return counts.tolist()


@dataclass(frozen=True)
class Options(WeightOptions):
    sparsity: float = option(0.5, "fraction of the weights set to zero (with allocation='sensitivity', "
                                  "over all chosen layers together)")
    scope: str = option("layer", "'layer': each layer loses `sparsity`; 'global': one magnitude "
                                 "threshold across layers")
    allocation: str = option("auto", "'uniform', or 'sensitivity': per-layer sparsities by measured "
                                     "sensitivity that meet `sparsity` overall (scope='layer'); 'auto': "
                                     "sensitivity with --data, uniform without")
    prune_bias: bool = option(False, "prune each layer's bias together with its weight")
    ratios: tuple[float, ...] = option((0.25, 0.5, 0.7, 0.8, 0.9, 0.95),
                                       "sparsities each layer is measured at for allocation='sensitivity'")

    def __post_init__(self):
        self.check("prune-magnitude")
        if not 0 <= self.sparsity <= 1:
            raise PipelineError(f"prune-magnitude: sparsity={self.sparsity} must be a fraction in [0, 1]")
        if self.scope not in ("layer", "global"):
            raise PipelineError(f"prune-magnitude: scope={self.scope!r} must be 'layer' or 'global'")
        if self.allocation not in ALLOCATIONS:
            raise PipelineError(f"prune-magnitude: allocation={self.allocation!r} must be one of "
                                f"{', '.join(ALLOCATIONS)}")
        if self.allocation == "sensitivity" and self.scope != "layer":
            raise PipelineError("prune-magnitude: allocation='sensitivity' chooses a ratio per layer; "
                                "use it with scope='layer'")
        sensitivity.check_ratios(self.ratios)


class PruneMagnitude(WeightPruning):
    name = "prune-magnitude"
    info = PassInfo(LOSSY("cosine", 0.85), requires=frozenset({TOPOSORTED}))
    Options = Options

    def prunes_bias(self) -> bool:
        return self.options.prune_bias

    def allocation(self, ctx: PassContext | None) -> str:
        """The allocation the options choose in this context ('auto' resolved)."""
        o = self.options
        if o.scope == "global":
            return "global"
        if o.allocation != "auto":
            return o.allocation
        return DATA_ALLOCATION if ctx is not None and ctx.from_data else "uniform"

    def plan(self, layers: list[Layer], graph: gs.Graph, ctx: PassContext,
             result: PassResult) -> list[tuple[Layer, Cut]]:
        """How many values each layer loses, from all layers at once (a threshold or a budget), and
        by which method."""
        result.stats.update(scope=self.options.scope, allocation=self.allocation(ctx))
        cuts = self.calibrate(graph, layers, ctx) if layers else {}
        counts = self._counts(graph, layers, cuts, ctx, result.stats)
        return [(layer, cuts[layer.name].with_count(count)) for layer, count in zip(layers, counts)]

    def prune(self, rw: Rewriter, target: Prunable, plan: Cut) -> None:
        if plan.hessian is None:
            prune_layer(rw, target, plan.count)
        else:
            prune_from_data(rw, target, plan)

    def _counts(self, graph: gs.Graph, layers: list[Layer], cuts: dict[str, Cut], ctx: PassContext,
                stats: dict) -> list[int]:
        sparsity = self.options.sparsity
        targets = [layer.match for layer in layers]
        allocation = self.allocation(ctx)
        if not targets:
            return []
        if allocation == "global":
            return global_counts(targets, sparsity)
        if allocation == "uniform":
            return [round(sparsity * t.size) for t in targets]
        sizes = [t.size for t in targets]
        goal = round(sparsity * sum(sizes))
        if sum(t.zeros() for t in targets) >= goal:
            # Zeros already there count toward the budget; measuring again would only move it around.
            stats["budget"] = "already met"
            return [0] * len(targets)
        feeds = ctx.feeds if ctx.feeds is not None else random_feeds(input_specs(graph), ctx.seed, batch=8)
        report = (lambda done, total: ctx.progress("sensitivity", done, total)) if ctx.progress else None

        def apply(trial: gs.Graph, layer: sensitivity.Layer, ratio: float) -> None:
            self._apply(trial, layer, ratio, cuts[layer.name])

        table = sensitivity.analyze(graph, self._sensitivity_layers(layers), apply, self.options.ratios, feeds,
                                    progress=report)
        ratios = sensitivity.allocate(table, sparsity)
        stats["sensitivity"] = table.as_dict()
        stats["allocated"] = {name: round(r, 4) for name, r in ratios.items()}
        return budget_counts(sizes, [ratios[t.node.name] for t in targets], goal)

    def _apply(self, graph: gs.Graph, layer: sensitivity.Layer, ratio: float, cut: Cut) -> None:
        target = self.examine(next(n for n in graph.nodes if n.name == layer.name), graph)
        self.prune(Rewriter(graph), target, cut.with_count(round(ratio * target.size)))

    @staticmethod
    def _sensitivity_layers(layers: list[Layer]) -> list[sensitivity.Layer]:
        return [sensitivity.Layer(layer.name, layer.node.op, layer.match.size) for layer in layers]

    # -- sensitivity.Layerwise (graphopt sensitivity): the ratio is the layer's sparsity ---------
    def layers(self, graph: gs.Graph) -> list[sensitivity.Layer]:
        return self._sensitivity_layers(self.select(graph, PassResult(False)))

    def apply_layer(self, graph: gs.Graph, layer: sensitivity.Layer, ratio: float) -> None:
        if self.method(None) != "magnitude":
            raise PipelineError(f"prune-magnitude: per-layer sensitivity alone measures method=magnitude; "
                                f"method={self.options.method} needs the pass's calibration (run it with "
                                "allocation='sensitivity': its stats hold the table)")
        self._apply(graph, layer, ratio, Cut("magnitude"))
