"""prune-magnitude: unstructured magnitude pruning of the constant weights of Conv, ConvTranspose,
Gemm and MatMul (Han et al. 2015).

Matches: each such node with a floating-point constant weight (Conv and ConvTranspose input W;
for Gemm and MatMul the constant operand, B when both are), with its bias when `prune_bias` (Conv,
ConvTranspose, Gemm; a MatMul's bias is a separate Add and is never pruned). Layers are chosen by
`include` / `exclude` (node names or op types) and `skip_first` / `skip_last` (the first and last
such node in graph order). The `sparsity` fraction of smallest-magnitude values (weight and pruned
bias taken together) is set to zero: in every layer (`scope="layer"`), or under one threshold
across layers (`scope="global"`), or, with `allocation="sensitivity"`, at per-layer ratios that
spread `sparsity` as a global budget over the layers by their measured sensitivity
(graphopt.passes.sensitivity, on the calibration data or random inputs, at `ratios`; zeros
already there count toward the budget).
Refuses, with the reason in stats, a weight (or pruned bias) shared with another node, one that is
a graph output, and one that is not floating point. The graph's structure is unchanged: the zeros
are stored, so the saved model compresses smaller (report: compressed_bytes); onnxruntime does not
run it faster.
Guarantees: LOSSY(cosine >= 0.85), the bound the tests hold every bundled builder and the digits
CNN to at the default sparsity 0.5 with per-layer thresholds (random-weight builders are the worst
case: Gaussian weights have few small values to spare; global or sensitivity allocation does
better). At sparsity 0 the output is identical; idempotent at the same options.
Verified by: tests/passes/prune/test_magnitude.py against onnxruntime.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir.data import input_specs, random_feeds
from graphopt.ir.errors import PipelineError
from graphopt.ir.graph import np_dtype
from graphopt.ir.verify import TOPOSORTED
from graphopt.passes import sensitivity
from graphopt.passes.base import LOSSY, Pass, PassContext, PassInfo, PassResult
from graphopt.passes.weights import weight_refusal
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


@dataclass
class Selection:
    layers: list[Prunable] = field(default_factory=list)
    refused: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


def weight_index(node: gs.Node) -> int | None:
    """Which input holds the node's constant weight, or None (an activation product, not a layer)."""
    candidates = (1, 0) if node.op in ("Gemm", "MatMul") else (1,)
    found = [i for i in candidates if len(node.inputs) > i and isinstance(node.inputs[i], gs.Constant)]
    return found[0] if found else None


def select_layers(graph: gs.Graph, include: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
                  skip_first: bool = False, skip_last: bool = False, prune_bias: bool = False) -> Selection:
    """The layers to prune, and those refused (unsafe) or skipped (by the options), with reasons."""
    candidates = [(n, i) for n in graph.nodes if n.op in PRUNABLE and n.domain in ("", "ai.onnx", None)
                  and (i := weight_index(n)) is not None]
    _check_names(candidates, include, "include")
    _check_names(candidates, exclude, "exclude")
    selection = Selection()
    for position, (node, index) in enumerate(candidates):
        skip = _skip_reason(node, position, len(candidates), include, exclude, skip_first, skip_last)
        if skip:
            selection.skipped.append({"node": node.name, "reason": skip})
            continue
        layer = _prunable(node, index, prune_bias)
        why = next((r for t in layer.tensors if (r := weight_refusal(graph, t, "prune"))), None)
        if why:
            selection.refused.append({"node": node.name, "reason": why})
        else:
            selection.layers.append(layer)
    return selection


def _check_names(candidates: list, names: tuple[str, ...], option: str) -> None:
    known = {n.name for n, _ in candidates} | set(PRUNABLE)
    unknown = [name for name in names if name not in known]
    if unknown:
        layers = ", ".join(n.name for n, _ in candidates) or "none"
        raise PipelineError(f"{option}: no prunable layer or op named {', '.join(unknown)} "
                            f"(ops: {', '.join(PRUNABLE)}; layers: {layers})")


def _skip_reason(node: gs.Node, position: int, count: int, include, exclude, skip_first, skip_last) -> str | None:
    if include and node.name not in include and node.op not in include:
        return "not in include"
    if node.name in exclude or node.op in exclude:
        return "excluded"
    if skip_first and position == 0:
        return "first layer (skip_first)"
    if skip_last and position == count - 1:
        return "last layer (skip_last)"
    return None


def _prunable(node: gs.Node, weight: int, prune_bias: bool) -> Prunable:
    has_bias = node.op != "MatMul" and len(node.inputs) > 2 and not node.inputs[2].is_empty()
    return Prunable(node, (weight,) + ((2,) if prune_bias and has_bias else ()))


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


def prune_layer(rw: Rewriter, layer: Prunable, count: int) -> bool:
    """Zero the `count` smallest magnitudes of the layer's tensors taken together."""
    pruned, changed = zero_smallest(layer.flat(), count)
    if not changed:
        return False
    offset = 0
    for tensor in layer.tensors:
        n = int(np.prod(tensor.shape, dtype=np.int64))
        rw.set_values(tensor, pruned[offset:offset + n].reshape(tensor.shape).astype(np_dtype(tensor.dtype)))
        offset += n
    return True


def global_counts(layers: list[Prunable], sparsity: float) -> list[int]:
    """How many values each layer loses under one magnitude threshold across all of them."""
    magnitudes = np.concatenate([np.abs(layer.flat().astype(np.float32)) for layer in layers])
    count = round(sparsity * magnitudes.size)
    if count == 0:
        return [0] * len(layers)
    chosen = np.argpartition(magnitudes, count - 1)[:count] if count < magnitudes.size else np.arange(count)
    bounds = np.cumsum([layer.size for layer in layers])
    return np.bincount(np.searchsorted(bounds, chosen, side="right"), minlength=len(layers)).tolist()


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
class Options:
    sparsity: float = 0.5
    scope: str = "layer"
    allocation: str = "uniform"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    prune_bias: bool = False
    skip_first: bool = False
    skip_last: bool = False
    ratios: tuple[float, ...] = (0.25, 0.5, 0.7, 0.8, 0.9, 0.95)

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


class PruneMagnitude(Pass):
    name = "prune-magnitude"
    info = PassInfo(LOSSY("cosine", 0.85), requires=frozenset({TOPOSORTED}))
    Options = Options

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        o = self.options
        selection = self._select(graph)
        layers = selection.layers
        stats: dict = {"scope": o.scope, "allocation": o.allocation}
        zeros_before = sum(layer.zeros() for layer in layers)
        counts = self._counts(graph, layers, ctx, stats)
        rw = Rewriter(graph)
        modified = False
        for layer, count in zip(layers, counts):
            modified |= prune_layer(rw, layer, count)
        if modified:
            rw.commit()
        zeros = [layer.zeros() for layer in layers]
        size = sum(layer.size for layer in layers)
        stats.update({
            "sparsity": round(sum(zeros) / size, 4) if size else 0.0,
            "params_zeroed": sum(zeros) - zeros_before,
            "layers": {layer.node.name: {"op": layer.node.op, "params": layer.size,
                                         "sparsity": round(z / layer.size, 4)} for layer, z in zip(layers, zeros)},
            "refused": selection.refused, "skipped": selection.skipped})
        return PassResult(modified, stats)

    def _select(self, graph: gs.Graph) -> Selection:
        o = self.options
        return select_layers(graph, o.include, o.exclude, o.skip_first, o.skip_last, o.prune_bias)

    def _counts(self, graph: gs.Graph, layers: list[Prunable], ctx: PassContext, stats: dict) -> list[int]:
        sparsity = self.options.sparsity
        if not layers:
            return []
        if self.options.scope == "global":
            return global_counts(layers, sparsity)
        if self.options.allocation == "uniform":
            return [round(sparsity * layer.size) for layer in layers]
        sizes = [layer.size for layer in layers]
        target = round(sparsity * sum(sizes))
        if sum(layer.zeros() for layer in layers) >= target:
            # Zeros already there count toward the budget; measuring again would only move it around.
            stats["budget"] = "already met"
            return [0] * len(layers)
        feeds = ctx.feeds if ctx.feeds is not None else random_feeds(input_specs(graph), ctx.seed, batch=8)
        report = (lambda done, total: ctx.progress("sensitivity", done, total)) if ctx.progress else None
        table = sensitivity.analyze_pass(graph, self, self.options.ratios, feeds, progress=report)
        ratios = sensitivity.allocate(table, sparsity)
        stats["sensitivity"] = table.as_dict()
        stats["allocated"] = {name: round(r, 4) for name, r in ratios.items()}
        return budget_counts(sizes, [ratios[layer.node.name] for layer in layers], target)

    # -- sensitivity.Layerwise: the ratio is the layer's sparsity --------------------------------
    def layers(self, graph: gs.Graph) -> list[sensitivity.Layer]:
        return [sensitivity.Layer(layer.node.name, layer.node.op, layer.size) for layer in self._select(graph).layers]

    def apply_layer(self, graph: gs.Graph, layer: sensitivity.Layer, ratio: float) -> None:
        node = next(n for n in graph.nodes if n.name == layer.name)
        target = _prunable(node, weight_index(node), self.options.prune_bias)
        prune_layer(Rewriter(graph), target, round(ratio * target.size))
