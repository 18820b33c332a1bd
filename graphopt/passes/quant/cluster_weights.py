"""cluster-weights: weight sharing by k-means, the second stage of Deep Compression (Han et al. 2016).

Matches: Conv, Gemm and MatMul with a constant float32 weight (the constant operand), by
include/exclude.
Rewrites: each layer's weight to one codebook of 2^bits float32 centroids and an index per weight
(graphopt.passes.quant.codebook: UINT4 indices at bits <= 4, UINT8 above; Cast -> Gather rebuilds
the weight). The centroids are a 1-D k-means (graphopt.kernels.kmeans, Lloyd from `init`: linear,
the paper's recommendation, density or random). A layer holding exact zeros (pruned) keeps them
exactly: index 0 is 0.0 and only the nonzeros share the other 2^bits - 1 centroids.
weighting=data (the default with --data) weighs each weight's squared error by the second moment of
the input it multiplies (diag of the layer's input Hessian H from graphopt.passes.activations; for
a Conv its im2col column's), so the centroids sit where the weights that matter are; then each
weight's centroid is chosen GPTQ's way (graphopt.passes.quant.gptq.compensate): a column at a time,
the nearest centroid, its error spread over the columns not yet chosen through H⁻¹, so that the
layer's output on the calibration data moves least (nearest-centroid alone ignores how inputs
correlate); pruned zeros stay zero.
Refuses: a weight shared with another node or that is a graph output, a weight that is not
float32, a layer with fewer weights than 2^bits; below opset 21 at bits <= 4 outside the manager
(which upgrades the model for UINT4).
Guarantees: LOSSY(cosine >= 0.98) at the default bits=4 (0.8, 0.93, 0.99 at 2, 3, 5 bits; 0.995
above), measured on the builders' random weights (the hardest case) and the digits CNN; at most
2^bits distinct values per layer; zeros stay zeros; idempotent (a coded layer is skipped). Run it after fold-constants / canonicalize: folding Gather of constants
would turn the codebook back into a float weight. Decisions per layer: bits, centroids used,
weight SQNR (dB), bytes before and after, weighting.
Verified by: tests/passes/quant/test_cluster_weights.py against onnxruntime (and TVM).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir.data import input_specs, random_feeds
from graphopt.ir.errors import PipelineError
from graphopt.ir.verify import TOPOSORTED
from graphopt.kernels.kmeans import INITS, kmeans_1d
from graphopt.passes import activations
from graphopt.passes.base import LOSSY, Layer, LayerOptions, PassContext, PassInfo, option
from graphopt.passes.quant.codebook import Codebook, CodebookPass, with_opset
from graphopt.passes.quant.gptq import act_order, compensate

WEIGHTINGS = ("auto", "none", "data")
# Declared output cosine by bits, measured on the builders (random weights, the hardest case) and
# the digits CNN; the gate holds the pass to it when the user sets no gate of their own.
# Lowest measured (random inputs, two seeds): bits=2 0.847 (resnet), 3 0.946 (transformer), 4 0.983,
# 5 0.994, 6 0.998; digits with --data: 0.915, 0.984, 0.994, 0.999.
BOUNDS = {2: 0.8, 3: 0.93, 4: 0.98, 5: 0.99}
HIGH_BITS_BOUND = 0.995


@dataclass(frozen=True)
class Options(LayerOptions):
    bits: int = option(4, "index bits: 2^bits shared values per layer (2..8)")
    init: str = option("linear", "k-means start: 'linear' (evenly spaced between min and max, Deep "
                                 "Compression's choice), 'density' (quantiles) or 'random' (seeded sample)")
    weighting: str | None = option("auto", "'data': each weight's squared error weighed by its input's second "
                                    "moment (diag H); 'none': plain k-means; 'auto': data with --data")
    damping: float = option(0.01, "weighting=data: added to diag H as a fraction of its mean, so inputs the "
                                  "data never drives still pull their weights a little")
    max_iter: int = option(300, "Lloyd iterations at most per layer")

    def __post_init__(self):
        if self.weighting is None:  # the pipeline parser reads `weighting=none` as None
            object.__setattr__(self, "weighting", "none")
        if not 2 <= self.bits <= 8:
            raise PipelineError(f"cluster-weights: bits={self.bits} must be 2..8 (UINT4 or UINT8 indices)")
        if self.init not in INITS:
            raise PipelineError(f"cluster-weights: init={self.init!r} must be one of {', '.join(INITS)}")
        if self.weighting not in WEIGHTINGS:
            raise PipelineError(f"cluster-weights: weighting={self.weighting!r} must be one of "
                                f"{', '.join(WEIGHTINGS)}")
        if self.damping < 0:
            raise PipelineError(f"cluster-weights: damping={self.damping} must be >= 0")
        if self.max_iter < 1:
            raise PipelineError(f"cluster-weights: max_iter={self.max_iter} must be positive")


def cluster(values: np.ndarray, bits: int, weights: np.ndarray | None = None, init: str = "linear",
            seed: int = 0, max_iter: int = 300) -> Codebook:
    """`values` as a codebook of 2^bits entries; exact zeros (when there are any) keep index 0 = 0.0.
    With `weights`, the weighted k-means starts from the plain one's centroids: Lloyd only lowers
    its objective, so the weighted error is never worse than plain k-means' (from `init`, a
    weighted run can settle in a worse local optimum)."""
    k = 1 << bits
    w = np.asarray(values, np.float32)
    nonzero = w != 0
    shared = k if nonzero.all() else k - 1
    book = np.zeros(k, np.float32)
    indices = np.zeros(w.shape, np.uint8)
    if nonzero.any():
        centroids, labels = kmeans_1d(w[nonzero], shared, None, init, seed, max_iter)
        if weights is not None:
            centroids, labels = kmeans_1d(w[nonzero], shared, weights[nonzero], max_iter=max_iter, start=centroids)
        book[k - shared:] = centroids
        indices[nonzero] = labels + (k - shared)
    return Codebook(book, indices)


def weighted_error(original: np.ndarray, decoded: np.ndarray, weights: np.ndarray) -> float:
    """sum(weights * (original - decoded)^2): the diagonal-Hessian proxy of the output error."""
    d = np.asarray(original, np.float64) - np.asarray(decoded, np.float64)
    return float(np.sum(weights * d * d))


def diag_importance(node: gs.Node, hessian: np.ndarray, damping: float) -> np.ndarray:
    """Each weight's input second moment, in the weight's layout: diag H of its column, per group."""
    diag = np.diagonal(hessian, axis1=1, axis2=2)  # [groups, K]
    diag = diag + damping * diag.mean(axis=1, keepdims=True)
    matrix = activations.weight_matrix(node)
    return activations.weight_values(node, np.broadcast_to(diag[:, None, :], matrix.shape)).astype(np.float64)


def compensated(node: gs.Node, book: Codebook, stats: activations.LayerStats, damping: float) -> Codebook:
    """`book`'s centroids, each weight's chosen by GPTQ's column walk (act-order) instead of its
    nearest: the centroid nearest to the weight as earlier columns' errors moved it."""
    matrix = activations.weight_matrix(node)  # [groups, outputs, K]
    zero = matrix == 0
    reserved = bool(zero.any()) and book.values[0] == 0  # index 0 is the pruned zero
    choices = book.values[1:] if reserved else book.values
    rounded = np.empty(matrix.shape, np.float64)
    for g in range(matrix.shape[0]):
        def nearest(column: np.ndarray, j: int, g: int = g) -> np.ndarray:
            picked = choices[np.abs(column[:, None] - choices[None, :]).argmin(axis=1)].astype(np.float64)
            return np.where(zero[g][:, j], 0.0, picked) if reserved else picked
        rounded[g] = compensate(matrix[g], stats.hessian[g], nearest, damping, order=act_order(stats.hessian[g]),
                                rows=stats.rows_seen)
    decoded = activations.weight_values(node, rounded.astype(np.float32))
    # Every value is one of the centroids: its index is where it sits in the (sorted) codebook.
    order = np.argsort(book.values, kind="stable")
    at = np.clip(np.searchsorted(book.values[order], decoded), 0, len(order) - 1)
    indices = order[at]
    if reserved:
        indices[decoded == 0] = 0
    return Codebook(book.values, indices.astype(book.indices.dtype), book.scale)


def no_rows(layer: Layer) -> str | None:
    """Why the layer has no input moments to weigh its weights by, or None when it has."""
    if layer.match != 1:
        return "the constant operand is A, which the row view does not cover"
    if isinstance(layer.node.inputs[0], gs.Constant):
        return "its input is a constant, not calibration data"
    return activations.supported(layer.node)


class ClusterWeights(CodebookPass):
    """Deep Compression's weight sharing: one k-means codebook per layer, zeros kept."""

    name = "cluster-weights"
    info = PassInfo(LOSSY("cosine", BOUNDS[4]), requires=frozenset({TOPOSORTED}))
    Options = Options

    def __init__(self, **options):
        super().__init__(**options)
        with_opset(self)
        bound = BOUNDS.get(self.options.bits, HIGH_BITS_BOUND)
        self.info = dataclasses.replace(self.info, semantics=LOSSY("cosine", bound))

    def codebook_size(self) -> int:
        return 1 << self.options.bits

    def weighting(self, ctx: PassContext | None) -> str:
        """The weighting the options choose in this context ('auto' resolved)."""
        if self.options.weighting != "auto":
            return self.options.weighting
        return "data" if ctx is not None and ctx.from_data else "none"

    def importance(self, graph: gs.Graph, layers: list[Layer], ctx: PassContext) -> dict[str, np.ndarray | str]:
        """Per layer, diag H in the weight's layout, or why it has none (plain k-means then)."""
        if self.weighting(ctx) != "data":
            return {}
        why = {layer.name: no_rows(layer) for layer in layers}
        nodes = [layer.node for layer in layers if why[layer.name] is None]
        stats = {}
        if nodes:
            feeds = ctx.feeds if ctx.feeds is not None else random_feeds(input_specs(graph), ctx.seed, batch=8)
            report = (lambda done, total: ctx.progress("cluster statistics", done, total)) if ctx.progress else None
            stats = activations.statistics(graph, nodes, feeds, progress=report)
        return {layer.name: stats.get(layer.name) or f"none (data: {why[layer.name]})" for layer in layers}

    def encode(self, layer: Layer, ctx: PassContext, stats: activations.LayerStats | str | None
               ) -> tuple[Codebook, dict]:
        o = self.options
        values = layer.node.inputs[layer.match].values
        fallback = stats if isinstance(stats, str) else None
        stats = None if fallback else stats
        weights = None if stats is None else diag_importance(layer.node, stats.hessian, o.damping)
        book = cluster(values, o.bits, weights, o.init, ctx.seed, o.max_iter)
        if stats is not None:
            book = compensated(layer.node, book, stats, o.damping)
        how = fallback or ("data" if weights is not None else "none")
        return book, {"bits": o.bits, "init": o.init, "weighting": how, "zeros_kept": int(np.sum(values == 0))}

    def run(self, graph: gs.Graph, ctx: PassContext):
        result = super().run(graph, ctx)
        result.stats.update(bits=self.options.bits, init=self.options.init, weighting=self.weighting(ctx))
        if self.weighting(ctx) == "data" and not ctx.from_data and result.decisions:
            result.stats["warning"] = "weighting=data without --data: input moments measured on random inputs"
        return result
