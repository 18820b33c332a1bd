"""Weight grids for `quantize`: symmetric integer weights behind DequantizeLinear, int8 or int4, per
tensor, per output channel or per group along the input (K) axis; scales by min-max or MSE search;
rounding to nearest or by GPTQ (gptq.py) against those scales.

Layouts, in the node's own weight layout (what DequantizeLinear reads):
- per tensor: one scale; per channel: `axis` = the output-channel axis (0 for Conv and a transB
  Gemm, else the last), one scale per output;
- per group (`group_size` > 0, opset 21's blocked form): `axis` = the input axis (1 for Conv and a
  transB Gemm, else 0), `block_size` = group_size; the scale has the weight's shape with that axis
  cut to ceil(size / group_size). A MatMul/Gemm group is group_size consecutive K inputs of one
  output; a Conv group is group_size input channels at one kernel position of one output.
Integers: int8 in [-127, 127] (symmetric, so no int8 kernel ever meets -128), int4 in [-8, 7];
zero point 0. int4 is stored as an ONNX INT4 tensor (two per byte); graphsurgeon cannot write
numpy's int4, so it is handed over as a TensorProto (and never read back through `.values`, which
would turn it into a numpy array that no longer exports).
Verified by: tests/passes/quant/test_gptq.py and tests/passes/quant/test_quantize.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from graphopt.ir.graph import attr
from graphopt.passes import activations
from graphopt.passes.quant.gptq import act_order, gptq

BITS = (8, 4)
SCALE_METHODS = ("minmax", "mse")
# MSE search: scale = shrink · amax / qmax for shrink from 1 down to MIN_SHRINK in SHRINK_STEPS
# steps; clipping more than half the range never wins on weights.
MIN_SHRINK, SHRINK_STEPS = 0.5, 51


def levels(bits: int) -> tuple[int, int]:
    """(lowest, highest) integer of the symmetric grid: int8, int8 on 7 bits (quantize's
    reduce_range, as onnxruntime's: no pair of u8 x s8 products, 2 x 255 x 64, overflows 16 bits), int4."""
    return {8: (-127, 127), 7: (-64, 64), 4: (-8, 7)}[bits]


def output_axis(node: gs.Node) -> int:
    """The output-channel axis of the node's weight (input 1): 0 for Conv and transB Gemm, else the last."""
    return 0 if node.op == "Conv" or (node.op == "Gemm" and attr(node, "transB", 0)) else len(node.inputs[1].shape) - 1


def input_axis(node: gs.Node) -> int:
    """The input (K) axis of the node's weight: 1 for Conv (channels) and transB Gemm, else 0."""
    return 1 if node.op == "Conv" or (node.op == "Gemm" and attr(node, "transB", 0)) else 0


@dataclass(frozen=True)
class Layout:
    """Which elements share a scale: `axis` None is per tensor; `block_size` 0 is per channel."""
    axis: int | None
    block_size: int = 0

    @staticmethod
    def of(node: gs.Node, per_channel: bool, group_size: int) -> "Layout":
        if group_size:
            return Layout(input_axis(node), group_size)
        return Layout(output_axis(node) if per_channel else None)

    def groups(self, w: np.ndarray) -> np.ndarray:
        """`w` as [scales, members]: the elements of each scale on a row, in the scale's C order
        (a short last block padded with zeros, which every grid rounds exactly)."""
        if self.axis is None:
            return w.reshape(1, -1)
        if not self.block_size:
            return np.moveaxis(w, self.axis, 0).reshape(w.shape[self.axis], -1)
        moved = np.moveaxis(w, self.axis, -1)
        blocks = -(-moved.shape[-1] // self.block_size)
        padded = np.zeros(moved.shape[:-1] + (blocks * self.block_size,), w.dtype)
        padded[..., :moved.shape[-1]] = moved
        return padded.reshape(-1, self.block_size)

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.axis is None:
            return ()
        if not self.block_size:
            return (shape[self.axis],)
        return tuple(-(-d // self.block_size) if i == self.axis else d for i, d in enumerate(shape))

    def scales(self, per_group: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """One value per row of `groups` (in its order) as DequantizeLinear's scale tensor."""
        if not self.block_size:
            return per_group.reshape(self.scale_shape(shape))
        blocked = self.scale_shape(shape)
        moved = blocked[:self.axis] + blocked[self.axis + 1:] + (blocked[self.axis],)
        return np.moveaxis(per_group.reshape(moved), -1, self.axis)

    def expand(self, scale: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """The scale of every element of a weight of `shape`."""
        if self.axis is None:
            return np.full(shape, scale, np.float32)
        if not self.block_size:
            view = [1] * len(shape)
            view[self.axis] = -1
            return np.broadcast_to(scale.reshape(view), shape).copy()
        return np.repeat(scale, self.block_size, axis=self.axis).take(range(shape[self.axis]), axis=self.axis)


def choose_scale(w: np.ndarray, layout: Layout, bits: int, method: str = "minmax") -> np.ndarray:
    """float32 scales in DequantizeLinear's shape: amax / qmax per scale ("minmax"), or the
    shrunk amax with the least squared rounding error of the scale's own elements ("mse")."""
    groups = layout.groups(np.asarray(w, np.float32))
    qmin, qmax = levels(bits)
    amax = np.abs(groups).max(axis=1, initial=0.0)
    best = np.where(amax > 0, amax / qmax, 1.0)
    if method == "mse":
        best_error = np.full(len(groups), np.inf)
        for shrink in np.linspace(1.0, MIN_SHRINK, SHRINK_STEPS):
            scale = np.where(amax > 0, shrink * amax / qmax, 1.0)[:, None]
            error = ((groups - np.clip(np.rint(groups / scale), qmin, qmax) * scale) ** 2).sum(axis=1)
            better = error < best_error
            best, best_error = np.where(better, scale[:, 0], best), np.where(better, error, best_error)
    return np.array(layout.scales(best.astype(np.float32), w.shape), order="C")  # keeps a scalar 0-D


def round_nearest(w: np.ndarray, element_scale: np.ndarray, bits: int) -> np.ndarray:
    """Each weight to the nearest integer of its grid (half to even), saturated; int8 storage."""
    qmin, qmax = levels(bits)
    return np.clip(np.rint(w / element_scale), qmin, qmax).astype(np.int8)


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight's integers (int8 storage for both widths, in the node's layout), its scales in
    DequantizeLinear's shape, and how they map (layout, bits)."""
    q: np.ndarray
    scale: np.ndarray
    layout: Layout
    bits: int

    def dequantized(self) -> np.ndarray:
        return self.q.astype(np.float32) * self.layout.expand(self.scale, self.q.shape)

    @property
    def channel_scale(self) -> np.ndarray | None:
        """The scale per output channel (or per tensor) a bias at input x weight scale needs; None
        for per-group scales, which have no single scale per channel."""
        return None if self.layout.block_size else self.scale

    def stored(self, name: str) -> np.ndarray | LazyValues:
        """The integers as a constant's values: int8, or an INT4 TensorProto (see the module note)."""
        if self.bits != 4:
            return self.q
        return LazyValues(numpy_helper.from_array(self.q.astype(ml_dtypes.int4), name))


def quantize_nearest(w: np.ndarray, layout: Layout, bits: int, scale_method: str = "minmax") -> QuantizedWeight:
    scale = choose_scale(w, layout, bits, scale_method)
    return QuantizedWeight(round_nearest(w, layout.expand(scale, w.shape), bits), scale, layout, bits)


def quantize_gptq(node: gs.Node, layout: Layout, bits: int, scale_method: str, hessian: np.ndarray,
                  rows: int | None = None, damping: float = 0.01, block_size: int = 128,
                  ordered: bool = True) -> QuantizedWeight:
    """The node's weight with scales chosen first (as for nearest rounding), then rounded by GPTQ
    against them, group by group of a grouped Conv, in the matrix view of `activations`
    (`hessian` [groups, K, K]); `ordered`: act-order (descending diag H)."""
    w = np.asarray(node.inputs[1].values, np.float32)
    scale = choose_scale(w, layout, bits, scale_method)
    qmin, qmax = levels(bits)
    weights = activations.weight_matrix(node, w)
    scales = activations.weight_matrix(node, layout.expand(scale, w.shape))
    q = np.stack([gptq(weights[g], scales[g], hessian[g], qmin, qmax, damping, block_size,
                       act_order(hessian[g]) if ordered else None, rows) for g in range(len(weights))])
    return QuantizedWeight(np.rint(activations.weight_values(node, q)).astype(np.int8), scale, layout, bits)


def quantize_weight(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values, float32 scale): symmetric over [-127, 127], per channel along `axis`."""
    qw = quantize_nearest(np.asarray(w, np.float32), Layout(axis), 8)
    return qw.q, qw.scale
