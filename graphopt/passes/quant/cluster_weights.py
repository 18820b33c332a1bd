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
correlate); pruned zeros stay zero. Given those choices the layer's output error is quadratic in
the centroids, so they are then refit by least squares (`refit_centroids`: the post-training form
of Deep Compression's centroid fine-tuning), and the walk repeated from the refit codebook; the
round of least output error is kept (digits layers at 50% sparsity: output error 3.6x below
nearest-centroid's at 2 bits, 4.4x at 3; the walk alone gave 2.3x and 4x).
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

from graphopt.ir.errors import PipelineError
from graphopt.ir.verify import TOPOSORTED
from graphopt.kernels.kmeans import INITS, kmeans_1d
from graphopt.passes import activations
from graphopt.passes.base import LOSSY, Layer, LayerOptions, PassContext, PassInfo, option
from graphopt.passes.quant.codebook import (WEIGHTINGS, Codebook, CodebookPass, layer_statistics, resolve_weighting,
                                            with_opset)
from graphopt.passes.quant.gptq import act_order, compensate, output_error

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


def compensated(node: gs.Node, book: Codebook, stats: activations.LayerStats, damping: float,
                rounds: int = 2) -> Codebook:
    """`book` refined on the layer's output error tr((W - W') H (W - W')ᵀ): each weight's centroid
    chosen by GPTQ's column walk (act-order; the centroid nearest to the weight as earlier columns'
    errors moved it) instead of its nearest, then the centroids refit by least squares to those
    choices (`refit_centroids`), `rounds` times; the round of least output error is kept."""
    matrix = activations.weight_matrix(node).astype(np.float64)  # [groups, outputs, K]
    zero = matrix == 0
    reserved = bool(zero.any()) and book.values[0] == 0  # index 0 is the pruned zero
    values = book.values.astype(np.float64)
    best = None
    for _ in range(rounds):
        choices = values[1:] if reserved else values
        labels = _walk(matrix, zero if reserved else None, choices, stats, damping)
        for candidate in (choices, refit_centroids(matrix, labels, stats.hessian, choices)):
            decoded = np.where(labels < 0, 0.0, candidate[np.maximum(labels, 0)])
            error = sum(output_error(matrix[g], decoded[g], stats.hessian[g]) for g in range(len(matrix)))
            if best is None or error < best[0]:
                best = (error, candidate, labels)
        values = np.concatenate([[0.0], best[1]]) if reserved else best[1]
    _, choices, labels = best
    indices = np.where(labels < 0, 0, labels + int(reserved))
    book_values = (np.concatenate([[0.0], choices]) if reserved else choices).astype(np.float32)
    indices = activations.weight_values(node, indices.astype(np.float32)).astype(book.indices.dtype)
    return Codebook(book_values, indices, book.scale)


def _walk(matrix: np.ndarray, zero: np.ndarray | None, choices: np.ndarray, stats: activations.LayerStats,
          damping: float) -> np.ndarray:
    """GPTQ's column walk over a codebook: each weight's label (its index in `choices`; -1 where
    `zero` keeps a pruned zero), in `matrix`'s [groups, outputs, K] shape."""
    labels = np.empty(matrix.shape, np.int64)
    for g in range(matrix.shape[0]):
        def nearest(column: np.ndarray, j: int, g: int = g) -> np.ndarray:
            at = np.abs(column[:, None] - choices[None, :]).argmin(axis=1)
            labels[g][:, j] = at if zero is None else np.where(zero[g][:, j], -1, at)
            return np.where(labels[g][:, j] < 0, 0.0, choices[at])
        compensate(matrix[g], stats.hessian[g], nearest, damping, order=act_order(stats.hessian[g]),
                   rows=stats.rows_seen)
    return labels


# Rows of the one-hot label tensor [rows, K, centroids] built at a time by refit_centroids.
REFIT_CHUNK = 1 << 22


def refit_centroids(matrix: np.ndarray, labels: np.ndarray, hessian: np.ndarray, centroids: np.ndarray,
                    ridge: float = 1e-6) -> np.ndarray:
    """The centroids c minimising Σ_g tr((W_g - c[L_g]) H_g (W_g - c[L_g])ᵀ) for fixed labels L
    (-1: a kept zero, not a centroid's): the decoded weight is linear in c, so this is a
    least squares in len(c) unknowns, G c = b with G[k,l] = Σ_rows o_kᵀ H o_l and b[k] = Σ_rows o_kᵀ H w
    (o_k: the row's indicator of label k). `ridge` (relative to mean diag G) pulls a centroid no
    weight uses to where it was. Deep Compression trains its centroids by gradient descent on the
    loss; this is the post-training form: the exact optimum of the layer's output error."""
    n = centroids.size
    gram, rhs = np.zeros((n, n)), np.zeros(n)
    for g in range(matrix.shape[0]):
        h = np.asarray(hessian[g], np.float64)
        step = max(1, REFIT_CHUNK // (matrix.shape[2] * n))
        for r0 in range(0, matrix.shape[1], step):
            onehot = labels[g, r0:r0 + step, :, None] == np.arange(n)  # [rows, K, n]
            rows, k = onehot.shape[:2]
            h_onehot = h @ onehot.transpose(1, 0, 2).reshape(k, rows * n)  # H o_k, every row at once
            h_onehot = h_onehot.reshape(k, rows, n).transpose(1, 0, 2)
            gram += onehot.reshape(-1, n).T.astype(np.float64) @ h_onehot.reshape(-1, n)
            rhs += np.einsum("rkn,rk->n", h_onehot, matrix[g, r0:r0 + step])
    lam = ridge * max(float(np.mean(np.diag(gram))), 1e-30)
    return np.linalg.solve(gram + lam * np.eye(n), rhs + lam * centroids)


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
        return resolve_weighting(self.options.weighting, ctx)

    def importance(self, graph: gs.Graph, layers: list[Layer], ctx: PassContext) -> dict[str, np.ndarray | str]:
        """Per layer, its calibration statistics, or why it has none (plain k-means then)."""
        return layer_statistics(graph, layers, ctx, "cluster statistics") if self.weighting(ctx) == "data" else {}

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
