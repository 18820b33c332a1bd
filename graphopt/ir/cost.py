"""Cost of a graph: multiply-accumulates per node and element counts, shared by passes and reports."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir.graph import static_shape
from graphopt.ir.ops import is_winograd_conv


def count(shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) if shape is not None else 0


def _dims(tensor: gs.Tensor) -> tuple[int, ...] | None:
    """Shape with symbolic dimensions as 1, or None if the rank is unknown."""
    if tensor.shape is None:
        return None
    return tuple(int(d) if isinstance(d, (int, np.integer)) and d >= 0 else 1 for d in tensor.shape)


def macs(node: gs.Node) -> int:
    """Multiply-accumulates of one node; 0 for ops that are not products or whose shapes are unknown.
    Symbolic dims count as 1: `graphopt.ir.shapes.specialize` gives them concrete values first."""
    if node.op in ("Conv", "ConvInteger", "QLinearConv"):
        w_index = 3 if node.op == "QLinearConv" else 1
        out, w = _dims(node.outputs[0]), static_shape(node.inputs[w_index])
        if out is None or w is None:
            return 0
        return count(out) * count(w[1:])
    if is_winograd_conv(node):
        return _winograd_macs(node)
    if node.op == "ConvTranspose":
        x, w = _dims(node.inputs[0]), static_shape(node.inputs[1])
        if x is None or w is None:
            return 0
        return count(x) * count(w[1:])
    if node.op in ("Gemm", "MatMul", "MatMulInteger", "QLinearMatMul"):
        out = _dims(node.outputs[0])
        a = _dims(node.inputs[0])
        if out is None or a is None or not a:
            return 0
        k = a[0] if node.op == "Gemm" and node.attrs.get("transA", 0) else a[-1]
        return count(out) * k
    if node.op in ("LSTM", "GRU", "RNN"):
        return _recurrent_macs(node)
    return 0


def _recurrent_macs(node: gs.Node) -> int:
    """Every step multiplies each direction's input and hidden state by its gate weights: W
    [dirs, gates*H, I] and R [dirs, gates*H, H] once per sequence element and batch entry."""
    x, w, r = _dims(node.inputs[0]), static_shape(node.inputs[1]), static_shape(node.inputs[2])
    if x is None or w is None or r is None or len(x) != 3:
        return 0
    steps = x[0] * x[1]  # seq x batch in either layout
    return steps * (count(w) + count(r))


def _winograd_macs(node: gs.Node) -> int:
    """The element-wise products of F(m x m, 3 x 3): (m+2)^2 per output tile, channel pair and
    image; the tile transforms are additions and a few scalings, not counted."""
    out, w = _dims(node.outputs[0]), static_shape(node.inputs[1])
    if out is None or w is None or len(out) != 4:
        return 0
    m = int(node.attrs.get("tile", 4))
    tiles = -(-out[2] // m) * -(-out[3] // m)
    return out[0] * tiles * (m + 2) ** 2 * out[1] * w[1]
