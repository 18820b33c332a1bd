"""ternarize: weights to {-Wn, 0, +Wp} per layer, the post-training form of Trained Ternary
Quantization (Zhu et al. 2017) with Ternary Weight Networks' threshold (Li & Liu 2016).

Matches: Conv, Gemm and MatMul with a constant float32 weight, by include/exclude; `keep` leaves
the first and the last such layer (graph order) in float, as both papers do (keep=none: all).
Rewrites: each weight to a codebook {0, -Wn, +Wp} and UINT4 indices (graphopt.passes.quant.codebook):
with t = threshold x mean|w|, weights in [-t, t] become 0, Wp = mean of w over w > t and Wn = mean of
|w| over w < -t (TTQ's two scales; given which weights are positive, negative and zero, these are
the scales of least squared error). The threshold is TWN's 0.7 mean|w|, not TTQ's 0.05 max|w|:
without retraining, TWN's rule is the approximate least-squares choice for bell-shaped weights, and
it does not hang on one outlier the way a fraction of max|w| does (TTQ's factor was tuned for
training, where the scales learn to make up for it).
Refuses: a weight shared with another node or that is a graph output, a weight that is not
float32, fewer than 3 weights; below opset 21 outside the manager (which upgrades for UINT4).
Guarantees: LOSSY(cosine >= 0.65), measured on the builders (lowest: mobilenet 0.69 with first and
last kept, 0.75 without) and the digits CNN (0.93 kept, 0.82 not; top-1 98.9% -> 96.7% / 76.1%); at most 3 distinct values per layer; zeros stay zeros; idempotent (a coded layer is
skipped). Decisions per layer: threshold, Wp, Wn, the share of zeros, weight SQNR, bytes.
Verified by: tests/passes/quant/test_ternarize.py against onnxruntime.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphopt.ir.errors import PipelineError
from graphopt.ir.verify import TOPOSORTED
from graphopt.passes.base import LOSSY, Layer, PassContext, PassInfo, option
from graphopt.passes.quant.codebook import Codebook, CodebookPass, KeepOptions, with_opset


@dataclass(frozen=True)
class Options(KeepOptions):
    threshold: float = option(0.7, "weights with |w| <= threshold x mean|w| become 0 (TWN's 0.7)")

    def __post_init__(self):
        self.check_keep("ternarize")
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

    def encode(self, layer: Layer, ctx: PassContext, weights: np.ndarray | None) -> tuple[Codebook, dict]:
        book, t = ternary(layer.node.inputs[layer.match].values, self.options.threshold)
        return book, {"threshold": round(t, 6), "wp": round(float(book.values[2]), 6),
                      "wn": round(float(-book.values[1]), 6),
                      "zeros": round(float(np.mean(book.indices == 0)), 4)}
