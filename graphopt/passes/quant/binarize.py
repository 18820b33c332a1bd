"""binarize: weights to sign(w) x alpha per output channel, XNOR-Net's binary weights (Rastegari et al.
2016), post-training.

Matches: Conv, Gemm and MatMul with a constant float32 weight, by include/exclude; `keep` leaves
the first and the last such layer (graph order) in float, as the paper does (keep=none: all).
Rewrites: each weight to the codebook {-1, +1}, UINT4 sign indices and a per-output-channel scale
alpha = mean|w| over the channel (the scale of least squared error for sign(w)), applied by a Mul
after the Gather (graphopt.passes.quant.codebook): one codebook per layer, no per-channel tables.
sign(0) is +1 (XNOR-Net's), so a pruned weight becomes +alpha: binarizing undoes pruning.
Refuses: a weight shared with another node or that is a graph output, a weight that is not
float32, fewer than 2 weights; below opset 21 outside the manager (which upgrades for UINT4).
Guarantees: LOSSY(cosine >= 0.6) with the first and last layer kept (lowest measured: the
transformer builder 0.68; digits 0.82, top-1 98.9% -> 76.9%), 0.15 with keep=none (a two-layer net
0.19; digits 0.58, top-1 46.5%): without the retraining XNOR-Net does, binary weights lose much, and
that low bound only catches a collapse: --max-drop (with labels) or --min-cosine is what refuses
a keep=none model that costs too much; at most 2
distinct values per output channel; idempotent (a coded layer is skipped). Decisions per layer:
alpha's range, weight SQNR, bytes.
Verified by: tests/passes/quant/test_binarize.py against onnxruntime.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir.verify import TOPOSORTED
from graphopt.passes.base import LOSSY, Layer, PassContext, PassInfo
from graphopt.passes.quant.codebook import Codebook, CodebookPass, KeepOptions, output_axis, with_opset


@dataclass(frozen=True)
class Options(KeepOptions):
    def __post_init__(self):
        self.check_keep("binarize")


def binary(values: np.ndarray, axis: int | None) -> Codebook:
    """`values` as sign codes (0: -1, 1: +1) times alpha = mean|w| per index along `axis` (None: one alpha)."""
    w = np.asarray(values, np.float32)
    others = tuple(a for a in range(w.ndim) if a != axis)
    alpha = np.mean(np.abs(w), axis=others, keepdims=True, dtype=np.float64).astype(np.float32)
    return Codebook(np.array([-1.0, 1.0], np.float32), (w >= 0).astype(np.uint8), alpha)


class Binarize(CodebookPass):
    """Post-training binary weights: sign(w) x mean|w| per output channel (XNOR-Net)."""

    name = "binarize"
    info = PassInfo(LOSSY("cosine", 0.6), requires=frozenset({TOPOSORTED}))
    Options = Options

    def __init__(self, **options):
        super().__init__(**options)
        with_opset(self)
        if set(self.options.keep) != {"first", "last"}:
            self.info = dataclasses.replace(self.info, semantics=LOSSY("cosine", 0.15))

    def codebook_size(self) -> int:
        return 2

    def encode(self, layer: Layer, ctx: PassContext, weights: np.ndarray | None) -> tuple[Codebook, dict]:
        weight: gs.Constant = layer.node.inputs[layer.match]
        book = binary(weight.values, output_axis(layer.node, layer.match, len(weight.shape)))
        return book, {"alpha_min": round(float(book.scale.min()), 6), "alpha_max": round(float(book.scale.max()), 6)}
