"""prune-magnitude: unstructured magnitude pruning of Conv, ConvTranspose, Gemm, MatMul weights (Han et al. 2015).

Matches: each such node with a constant weight (Gemm and MatMul: the constant operand, B when
both are), with its bias when `prune_bias`; `include` / `exclude`, `skip_first` / `skip_last`.
Rewrites: the `sparsity` fraction of smallest magnitudes to zero, in every layer (scope="layer"),
under one threshold (scope="global"), or spread over layers by measured sensitivity
(allocation="sensitivity"). The zeros are stored: the model compresses smaller, runs no faster.
Refuses: a weight (or pruned bias) shared with another node, a graph output, or not floating point.
Guarantees: LOSSY(cosine >= 0.85) at the default sparsity 0.5; sparsity 0 changes nothing;
idempotent at the same options. Details: docs/passes/prune-magnitude.md.
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
from graphopt.passes import sensitivity
from graphopt.passes.base import (LOSSY, Layer, LayerOptions, LayerPass, PassContext, PassInfo, PassResult,
                                  option)
from graphopt.passes.weights import check_weight
from graphopt.pattern import Rewriter

PRUNABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul")


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
    """The layer choice of the passes that zero weights in place (prune-magnitude, prune-n-m)."""
    skip_first: bool = option(False, "leave the first prunable layer (in graph order) whole")
    skip_last: bool = option(False, "leave the last prunable layer (in graph order) whole")


class WeightPruning(LayerPass):
    """Zeroing weights in place, layer by layer: the nodes of PRUNABLE with a constant weight.

    A subclass plans each layer (`plan` / `plan_layer`) and zeroes by `prune`; each layer's
    decision is its parameters, its zeros after the pass and those the pass added. Options must
    derive from WeightOptions.
    """

    ops = PRUNABLE

    def prunes_bias(self) -> bool:
        return False

    def prune(self, rw: Rewriter, target: Prunable, plan) -> None:
        raise NotImplementedError

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

    def rewrite(self, rw: Rewriter, layer: Layer, plan) -> dict:
        target: Prunable = layer.match
        before = target.zeros()
        self.prune(rw, target, plan)
        zeros = target.zeros()  # the rewriter sets values at once
        return {"op": layer.node.op, "params": target.size, "zeros": zeros, "zeroed": zeros - before,
                "sparsity": round(zeros / target.size, 4)}

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = super().run(graph, ctx)
        decisions = result.decisions.values()
        size = sum(d["params"] for d in decisions)
        result.stats["sparsity"] = round(sum(d["zeros"] for d in decisions) / size, 4) if size else 0.0
        result.stats["params_zeroed"] = sum(d["zeroed"] for d in decisions)
        return result


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
    allocation: str = option("uniform", "'uniform', or 'sensitivity': per-layer sparsities by measured "
                                        "sensitivity that meet `sparsity` overall (scope='layer')")
    prune_bias: bool = option(False, "prune each layer's bias together with its weight")
    ratios: tuple[float, ...] = option((0.25, 0.5, 0.7, 0.8, 0.9, 0.95),
                                       "sparsities each layer is measured at for allocation='sensitivity'")

    def __post_init__(self):
        if not 0 <= self.sparsity <= 1:
            raise PipelineError(f"prune-magnitude: sparsity={self.sparsity} must be a fraction in [0, 1]")
        if self.scope not in ("layer", "global"):
            raise PipelineError(f"prune-magnitude: scope={self.scope!r} must be 'layer' or 'global'")
        if self.allocation not in ("uniform", "sensitivity"):
            raise PipelineError(f"prune-magnitude: allocation={self.allocation!r} must be 'uniform' or 'sensitivity'")
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

    def plan(self, layers: list[Layer], graph: gs.Graph, ctx: PassContext,
             result: PassResult) -> list[tuple[Layer, int]]:
        """How many values each layer loses, from all layers at once (a threshold or a budget)."""
        result.stats.update(scope=self.options.scope, allocation=self.options.allocation)
        return list(zip(layers, self._counts(graph, [layer.match for layer in layers], ctx, result.stats)))

    def prune(self, rw: Rewriter, target: Prunable, count: int) -> None:
        prune_layer(rw, target, count)

    def _counts(self, graph: gs.Graph, targets: list[Prunable], ctx: PassContext, stats: dict) -> list[int]:
        sparsity = self.options.sparsity
        if not targets:
            return []
        if self.options.scope == "global":
            return global_counts(targets, sparsity)
        if self.options.allocation == "uniform":
            return [round(sparsity * t.size) for t in targets]
        sizes = [t.size for t in targets]
        goal = round(sparsity * sum(sizes))
        if sum(t.zeros() for t in targets) >= goal:
            # Zeros already there count toward the budget; measuring again would only move it around.
            stats["budget"] = "already met"
            return [0] * len(targets)
        feeds = ctx.feeds if ctx.feeds is not None else random_feeds(input_specs(graph), ctx.seed, batch=8)
        report = (lambda done, total: ctx.progress("sensitivity", done, total)) if ctx.progress else None
        table = sensitivity.analyze_pass(graph, self, self.options.ratios, feeds, progress=report)
        ratios = sensitivity.allocate(table, sparsity)
        stats["sensitivity"] = table.as_dict()
        stats["allocated"] = {name: round(r, 4) for name, r in ratios.items()}
        return budget_counts(sizes, [ratios[t.node.name] for t in targets], goal)

    # -- sensitivity.Layerwise: the ratio is the layer's sparsity --------------------------------
    def layers(self, graph: gs.Graph) -> list[sensitivity.Layer]:
        return [sensitivity.Layer(layer.name, layer.node.op, layer.match.size)
                for layer in self.select(graph, PassResult(False))]

    def apply_layer(self, graph: gs.Graph, layer: sensitivity.Layer, ratio: float) -> None:
        target = self.examine(next(n for n in graph.nodes if n.name == layer.name), graph)
        prune_layer(Rewriter(graph), target, round(ratio * target.size))
