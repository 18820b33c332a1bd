"""What data-aware passes learn from calibration data: each layer's inputs, as the rows its weight
multiplies, streamed batch by batch.

A layer is a Conv, ConvTranspose-free Gemm or MatMul with a constant weight. Its output is, per
group g, `rows_g @ W_g.T` (plus bias), where `W_g` is the layer's weight as a matrix
[outputs of the group, K] (`weight_matrix`) and `rows_g` its input as [positions, K]
(`layer_rows`): a Conv's input is unfolded (im2col, in the weight's (C, kh, kw) order), a Gemm's is
its A (transposed when transA), a MatMul's is its activation with every leading axis flattened. So
a method written for a dense matrix (SparseGPT, GPTQ, ThiNet's least squares, whitened SVD)
handles every layer kind through these two views.

`statistics` runs the model once over the calibration data in onnxruntime, the layers' inputs
added as outputs, and accumulates per layer and group the input's second moment H = Σ xᵀx / n
(K × K, float64: the Hessian of the layer's squared output error, up to a factor 2), and, when
`keep_rows` is given, a bounded random sample of the rows (for least-squares refits). Memory is
one batch of activations plus the K × K statistics, never the whole data set.

H is estimated from at most `ROWS_PER_K`·K rows per layer (or `MIN_ROWS`), drawn uniformly at random
from every batch in proportion: a sample covariance's relative error falls as √(K/n), and GPTQ
estimates its Hessians from 20-60 rows per column; a 56x56 convolution of 128 images has 700 per
column, most of the time of a data-aware pass on ResNet-18 for no better estimate.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import ort
from graphopt.ir.data import Batching, input_specs
from graphopt.ir.errors import PipelineError
from graphopt.ir.graph import attr
from graphopt.passes.quant.calibrate import with_outputs

LAYER_OPS = ("Conv", "Gemm", "MatMul")
ROWS_PER_K = 256
MIN_ROWS = 65536
Progress = Callable[[int, int], None]


def weight_input(node: gs.Node) -> int | None:
    """Which input of a layer holds its constant weight: 1 for Conv and Gemm/MatMul (B), 0 for a
    MatMul/Gemm whose only constant operand is A; None for an activation product."""
    candidates = (1, 0) if node.op in ("Gemm", "MatMul") else (1,)
    found = [i for i in candidates if len(node.inputs) > i and isinstance(node.inputs[i], gs.Constant)]
    return found[0] if found else None


def supported(node: gs.Node) -> str | None:
    """Why the row/matrix views do not cover this layer, or None when they do."""
    if node.op not in LAYER_OPS:
        return f"{node.op} is not one of {', '.join(LAYER_OPS)}"
    w = weight_input(node)
    if w is None:
        return "no constant weight (an activation product)"
    if node.op in ("Gemm", "MatMul") and w != 1:
        return "the constant operand is A (x @ W with W on the left is not a layer the views cover)"
    if node.op == "MatMul" and len(node.inputs[1].shape) != 2:
        return f"the weight has rank {len(node.inputs[1].shape)}, not 2"
    if node.op == "Conv" and len(node.inputs[1].shape) != 4:
        return "only 2-D convolutions are unfolded"
    return None


def groups(node: gs.Node) -> int:
    return int(attr(node, "group", 1)) if node.op == "Conv" else 1


def weight_matrix(node: gs.Node, values: np.ndarray | None = None) -> np.ndarray:
    """The weight as [groups, outputs per group, K] (a copy). `values` replaces the node's own."""
    w = np.asarray(node.inputs[1].values if values is None else values)
    if node.op == "Conv":
        g = groups(node)
        return w.reshape(g, w.shape[0] // g, -1).copy()
    if node.op == "Gemm" and int(attr(node, "transB", 0)):
        return w[None].copy()  # B is [N, K] already
    return w.T[None].copy()  # B is [K, N]


def weight_values(node: gs.Node, matrix: np.ndarray) -> np.ndarray:
    """The inverse of `weight_matrix`: [groups, outputs, K] back in the node's weight layout."""
    shape = node.inputs[1].shape
    dtype = node.inputs[1].values.dtype
    if node.op == "Conv":
        return matrix.reshape(shape).astype(dtype)
    if node.op == "Gemm" and int(attr(node, "transB", 0)):
        return matrix[0].reshape(shape).astype(dtype)
    return matrix[0].T.reshape(shape).astype(dtype)


def layer_rows(node: gs.Node, x: np.ndarray) -> np.ndarray:
    """The layer's input `x` as [groups, positions, K]: the rows its weight matrix multiplies."""
    x = np.asarray(x, np.float32)
    if node.op == "Conv":
        return _unfold(node, x)
    if node.op == "Gemm":
        x = x.T if int(attr(node, "transA", 0)) else x
        return x.reshape(1, -1, x.shape[-1])
    return x.reshape(1, -1, x.shape[-1])


def _unfold(node: gs.Node, x: np.ndarray) -> np.ndarray:
    """im2col of an NCHW input for the node's kernel, strides, pads and dilations, grouped."""
    kh, kw = node.inputs[1].shape[2:]
    sh, sw = attr(node, "strides", [1, 1])
    dh, dw = attr(node, "dilations", [1, 1])
    pads = _pads(node, x.shape[2:], (kh, kw), (sh, sw), (dh, dw))
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    n, c, h, w = x.shape
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((n, c, kh, kw, oh, ow), np.float32)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = x[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
    g = groups(node)
    # [n, g, c/g, kh, kw, oh, ow] -> [g, n * oh * ow, c/g * kh * kw]
    cols = cols.reshape(n, g, c // g, kh, kw, oh, ow).transpose(1, 0, 5, 6, 2, 3, 4)
    return cols.reshape(g, n * oh * ow, -1)


def _pads(node: gs.Node, spatial, kernel, strides, dilations) -> list[int]:
    auto = attr(node, "auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", "VALID"):
        return list(attr(node, "pads", [0, 0, 0, 0])) if auto == "NOTSET" else [0, 0, 0, 0]
    pads = [0, 0, 0, 0]
    for a, (size, k, s, d) in enumerate(zip(spatial, kernel, strides, dilations)):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        pads[a], pads[a + 2] = (small, large) if auto == "SAME_UPPER" else (large, small)
    return pads


@dataclass
class LayerStats:
    """One layer's calibration statistics: H [groups, K, K] = mean of xᵀx over the rows seen,
    the mean row [groups, K], and a random sample of rows [groups, ≤ keep_rows, K] when asked for."""
    hessian: np.ndarray
    rows_seen: int = 0
    rows: np.ndarray | None = None
    mean: np.ndarray | None = None
    _pool: list[np.ndarray] = field(default_factory=list, repr=False)
    _sum: np.ndarray | None = field(default=None, repr=False)


def statistics(graph: gs.Graph, nodes: Sequence[gs.Node], feeds: dict[str, np.ndarray], batch_size: int = 32,
               keep_rows: int = 0, seed: int = 0, progress: Progress | None = None) -> dict[str, LayerStats]:
    """Per node name: the second moment of its input rows over all of `feeds`, and up to
    `keep_rows` rows sampled uniformly at random (without replacement, per batch in proportion)."""
    for node in nodes:
        reason = supported(node)
        if reason:
            raise PipelineError(f"node '{node.name}': no calibration statistics: {reason}")
    names = sorted({node.inputs[0].name for node in nodes})
    batching = Batching.of(input_specs(graph), feeds)
    if batching.samples == 0:
        raise PipelineError("calibration data is empty: pass --data with at least one sample")
    session = ort.session(with_outputs(graph, names))
    rng = np.random.default_rng(seed)
    # Every batch gives the same share of the kept rows, so the sample is uniform over the data.
    per_batch = -(-keep_rows // -(-batching.samples // (batching.run or batch_size)))
    stats: dict[str, LayerStats] = {}
    done = 0
    for batch in batching.batches(feeds, batch_size):
        outputs = ort.run(session, batch)
        size = min(batching.run or batch_size, batching.samples - done)
        for node in nodes:
            rows = _sampled(layer_rows(node, outputs[node.inputs[0].name]), size / batching.samples, rng)
            _accumulate(stats, node, rows, per_batch, rng)
        done += size
        if progress:
            progress(done, batching.samples)
    for s in stats.values():
        s.hessian /= max(s.rows_seen, 1)
        s.mean = s._sum / max(s.rows_seen, 1)
        if keep_rows:
            pooled = np.concatenate(s._pool, axis=1)
            s.rows = pooled[:, rng.permutation(pooled.shape[1])[:keep_rows]]
            s._pool.clear()
    return stats


def _sampled(rows: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """This batch's `share` of the layer's row budget, drawn without replacement."""
    budget = max(ROWS_PER_K * rows.shape[2], MIN_ROWS)
    keep = int(np.ceil(budget * share))
    if rows.shape[1] <= keep:
        return rows
    return rows[:, np.sort(rng.choice(rows.shape[1], keep, replace=False))]


def _accumulate(stats: dict[str, LayerStats], node: gs.Node, rows: np.ndarray, keep: int,
                rng: np.random.Generator) -> None:
    s = stats.get(node.name)
    if s is None:
        s = stats[node.name] = LayerStats(np.zeros((rows.shape[0], rows.shape[2], rows.shape[2]), np.float64))
    # A batched float32 matmul, which BLAS runs (np.einsum's loop took 8x as long, float64 2x),
    # summed across batches in float64: one batch's sums of ≤ 10^5 products keep ~1e-5 relative.
    s.hessian += rows.transpose(0, 2, 1) @ rows
    s._sum = rows.sum(axis=1, dtype=np.float64) + (0.0 if s._sum is None else s._sum)
    s.rows_seen += rows.shape[1]
    if keep:
        s._pool.append(rows[:, rng.choice(rows.shape[1], min(rows.shape[1], keep), replace=False)])

