"""ternarize: weights to three values per layer, the post-training form of Trained Ternary
Quantization (Zhu et al. 2017) with Ternary Weight Networks' threshold (Li & Liu 2016).

Matches: Conv, Gemm and MatMul with a constant float32 weight, by include/exclude; `keep` leaves
the first and the last such layer (graph order) in float, as both papers do (keep=none: all).
Rewrites, weighting=none (the form of the papers): each weight to a codebook {0, -Wn, +Wp} and
UINT4 indices (graphopt.passes.quant.codebook): with t = threshold x mean|w|, weights in [-t, t]
become 0, Wp = mean of w over w > t and Wn = mean of |w| over w < -t (TTQ's two scales; given which
weights are positive, negative and zero, these are the scales of least squared error). The
threshold is TWN's 0.7 mean|w|, not TTQ's 0.05 max|w|: without retraining, TWN's rule is the
approximate least-squares choice for bell-shaped weights, and it does not hang on one outlier the
way a fraction of max|w| does (TTQ's factor was tuned for training, where the scales learn to make
up for it).
weighting=data (the default with --data): the codebook {0, -1, +1} times one scale per output
channel (a Mul after the Gather), both chosen on the layer's output error tr((W - W') H (W - W')ᵀ)
over the calibration rows: starting from TWN's pattern per channel, GPTQ's column walk
(graphopt.passes.quant.gptq.compensate) picks each weight's -1/0/+1 with the channel scales fixed,
then each channel's scale is refit by least squares (a = tᵀHw / tᵀHt), `rounds` times, the round of
least error kept. Per channel, because a model whose BatchNorm was folded (canonicalize) has
channels whose magnitudes differ by BN's gain, which one pair of layer scales cannot follow without
the retraining TTQ does (MNIST-1D CNN, first and last kept: 63.9% with per-layer scales, 94.8% this
way, fp32 96.6%; bench/deep_compression.py).
Refuses: a weight shared with another node or that is a graph output, a weight that is not
float32, fewer than 3 weights; below opset 21 outside the manager (which upgrades for UINT4).
Guarantees: LOSSY(cosine >= 0.65), measured on the builders (lowest: mobilenet 0.69 with first and
last kept, 0.75 without) and the digits CNN (0.93 kept, 0.82 not; top-1 98.9% -> 96.7% / 76.1%); at
most 3 distinct values per layer (per output channel with weighting=data); zeros stay zeros;
idempotent (a coded layer is skipped). Decisions per layer: threshold, the scales, the share of
zeros, weighting, weight SQNR, bytes.
Verified by: tests/passes/quant/test_ternarize.py against onnxruntime.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphopt.ir.errors import PipelineError
from graphopt.ir.verify import TOPOSORTED
from graphopt.passes import activations
from graphopt.passes.base import LOSSY, Layer, PassContext, PassInfo, option
from graphopt.passes.quant.codebook import (WEIGHTINGS, Codebook, CodebookPass, KeepOptions, layer_statistics,
                                            output_axis, resolve_weighting, with_opset)
from graphopt.passes.quant.gptq import act_order, compensate, output_error


@dataclass(frozen=True)
class Options(KeepOptions):
    threshold: float = option(0.7, "weights with |w| <= threshold x mean|w| become 0 (TWN's 0.7; with data, "
                                   "the start the column walk refines)")
    weighting: str | None = option("auto", "'data': -1/0/+1 and per-channel scales chosen on the layer's output "
                                    "error over the calibration data; 'none': TTQ's two per-layer scales; "
                                    "'auto': data with --data")
    damping: float = option(0.01, "weighting=data: added to diag H as a fraction of its mean")
    rounds: int = option(3, "weighting=data: column walks, each followed by a least-squares refit of the scales")

    def __post_init__(self):
        self.check_keep("ternarize")
        if self.weighting is None:  # the pipeline parser reads `weighting=none` as None
            object.__setattr__(self, "weighting", "none")
        if self.weighting not in WEIGHTINGS:
            raise PipelineError(f"ternarize: weighting={self.weighting!r} must be one of {', '.join(WEIGHTINGS)}")
        if self.damping < 0 or self.rounds < 1:
            raise PipelineError(f"ternarize: damping={self.damping} must be >= 0 and rounds={self.rounds} >= 1")
        if not self.threshold >= 0:
            raise PipelineError(f"ternarize: threshold={self.threshold} must be >= 0 (a multiple of mean|w|)")


def ternary(values: np.ndarray, factor: float = 0.7) -> tuple[Codebook, float]:
    """`values` as the codebook [0, -Wn, +Wp] with indices 0 / 1 / 2, and the threshold used."""
    w = np.asarray(values, np.float32)
    t = float(factor * np.mean(np.abs(w), dtype=np.float64))
    pos, neg = w > t, w < -t
    wp = float(np.mean(w[pos], dtype=np.float64)) if pos.any() else 0.0
    wn = float(np.mean(-w[neg], dtype=np.float64)) if neg.any() else 0.0
    indices = np.where(pos, 2, np.where(neg, 1, 0)).astype(np.uint8)
    return Codebook(np.array([0.0, -wn, wp], np.float32), indices), t


def fitted(node, stats: activations.LayerStats, factor: float = 0.7, damping: float = 0.01,
           rounds: int = 3) -> Codebook:
    """The layer's weight as {0, -1, +1} x a scale per output channel, of least output error on
    the rows `stats` describes (see the module note); pruned zeros stay zero."""
    matrix = activations.weight_matrix(node).astype(np.float64)  # [groups, outputs, K]
    codes = np.empty(matrix.shape, np.int8)
    scales = np.empty(matrix.shape[:2])
    for g, (w, h) in enumerate(zip(matrix, stats.hessian)):
        codes[g], scales[g] = _fit_group(w, np.asarray(h, np.float64), factor, damping, rounds, stats.rows_seen)
    weight = node.inputs[1]
    axis = output_axis(node, 1, len(weight.shape))
    shape = [1] * len(weight.shape)
    shape[axis] = -1
    indices = activations.weight_values(node, np.where(codes < 0, 1, np.where(codes > 0, 2, 0)).astype(np.float32))
    return Codebook(np.array([0.0, -1.0, 1.0], np.float32), indices.astype(np.uint8),
                    scales.reshape(shape).astype(np.float32))


def _fit_group(w: np.ndarray, h: np.ndarray, factor: float, damping: float, rounds: int,
               rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes [outputs, K] in {-1, 0, 1} and scales [outputs] for one group's weight `w`."""
    threshold = factor * np.mean(np.abs(w), axis=1, keepdims=True)
    codes = np.sign(w) * (np.abs(w) > threshold)
    zero = w == 0
    best = None
    for _ in range(rounds):
        scales = _scales(w, codes, h)
        error = output_error(w, codes * scales[:, None], h)
        if best is None or error < best[0]:
            best = (error, codes, scales)
        safe = np.where(scales != 0, scales, 1.0)

        def to_codes(column: np.ndarray, j: int) -> np.ndarray:
            return np.where(zero[:, j], 0.0, np.clip(np.rint(column / safe), -1, 1) * scales)
        walked = compensate(w, h, to_codes, damping, order=act_order(h), rows=rows)
        codes = np.sign(walked) * (walked != 0) * np.sign(safe)[:, None]
    scales = _scales(w, codes, h)
    if output_error(w, codes * scales[:, None], h) < best[0]:
        best = (None, codes, scales)
    return best[1].astype(np.int8), best[2]


def _scales(w: np.ndarray, codes: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Per row, the scale a of least output error (w - a t) H (w - a t)ᵀ: a = tᵀHw / tᵀHt (0 for an all-zero row)."""
    ht = codes @ h
    den = np.einsum("ik,ik->i", ht, codes)
    return np.where(den > 0, np.einsum("ik,ik->i", ht, w) / np.where(den > 0, den, 1.0), 0.0)


class Ternarize(CodebookPass):
    """Post-training ternary weights: per layer a threshold and two scales (TTQ's form, TWN's threshold)."""

    name = "ternarize"
    info = PassInfo(LOSSY("cosine", 0.65), requires=frozenset({TOPOSORTED}))
    Options = Options

    def __init__(self, **options):
        super().__init__(**options)
        with_opset(self)

    def codebook_size(self) -> int:
        return 3

    def importance(self, graph, layers: list[Layer], ctx: PassContext) -> dict[str, activations.LayerStats | str]:
        """Per layer, its calibration statistics with weighting=data, or why it has none."""
        if resolve_weighting(self.options.weighting, ctx) != "data":
            return {}
        return layer_statistics(graph, layers, ctx, "ternarize statistics")

    def encode(self, layer: Layer, ctx: PassContext, stats: activations.LayerStats | str | None
               ) -> tuple[Codebook, dict]:
        o = self.options
        if stats is None or isinstance(stats, str):
            book, t = ternary(layer.node.inputs[layer.match].values, o.threshold)
            return book, {"threshold": round(t, 6), "wp": round(float(book.values[2]), 6),
                          "wn": round(float(-book.values[1]), 6), "zeros": round(float(np.mean(book.indices == 0)), 4),
                          "weighting": stats or "none"}
        book = fitted(layer.node, stats, o.threshold, o.damping, o.rounds)
        return book, {"threshold": f"{o.threshold} x mean|w| per channel, then walked",
                      "scale_min": round(float(book.scale.min()), 6), "scale_max": round(float(book.scale.max()), 6),
                      "zeros": round(float(np.mean(book.indices == 0)), 4), "weighting": "data"}
