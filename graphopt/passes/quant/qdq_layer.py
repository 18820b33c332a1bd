"""The QDQ rewrite of one layer, shared by `quantize` and what it measures (sensitivity, bias shifts).

A layer's weight (input 1) goes behind DequantizeLinear as integers (weight_quant.QuantizedWeight:
int8 or int4, per tensor, channel or group); a 1-D bias becomes int32 at scale input x weight when
the input is quantized and the weight has one scale per channel (float otherwise, and the
decision says why); `insert_pair` puts QuantizeLinear -> DequantizeLinear after an activation.
Verified by: tests/passes/quant/test_quantize.py (against onnxruntime).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import fidelity
from graphopt.ir.graph import attr
from graphopt.passes.quant.weight_quant import QuantizedWeight
from graphopt.pattern import Rewriter


@dataclass(frozen=True)
class QParams:
    scale: np.ndarray  # float32, scalar or per channel
    zero_point: np.ndarray  # int8 / uint8 / int32, same shape


def dequantized(rw: Rewriter, prefix: str, values, scale: np.ndarray, zero_point: np.ndarray | None,
                axis: int | None, block_size: int = 0, shape: list[int] | None = None) -> gs.Variable:
    """DequantizeLinear of the constant `values` (a zero point of None is left out: 0 of the
    integers' type, as an int4 weight needs no second int4 tensor)."""
    out = rw.variable(prefix + "_dequantized", dtype=np.float32, shape=shape or list(np.shape(values)))
    attrs = {"axis": axis} if axis is not None else {}
    if block_size:
        attrs["block_size"] = block_size
    inputs = [rw.constant(prefix + "_quantized", values), rw.constant(prefix + "_scale", scale)]
    if zero_point is not None:
        inputs.append(rw.constant(prefix + "_zero_point", zero_point))
    rw.add_node("DequantizeLinear", inputs, [out], attrs)
    return out


def insert_pair(rw: Rewriter, tensor: gs.Variable, p: QParams) -> None:
    """QuantizeLinear -> DequantizeLinear after `tensor`; every reader then reads the DQ output."""
    readers = list(tensor.outputs)
    scale = rw.constant(tensor.name + "_scale", np.asarray(p.scale, np.float32))
    zero = rw.constant(tensor.name + "_zero_point", np.asarray(p.zero_point))
    q = rw.variable(tensor.name + "_quantized", dtype=np.asarray(p.zero_point).dtype, shape=tensor.shape)
    dq = rw.variable(tensor.name + "_dequantized", dtype=np.float32, shape=tensor.shape)
    rw.add_node("QuantizeLinear", [tensor, scale, zero], [q])
    rw.add_node("DequantizeLinear", [q, scale, zero], [dq])
    for reader in readers:
        for i, t in enumerate(reader.inputs):
            if t is tensor:
                rw.set_input(reader, i, dq)


def quantize_layer(rw: Rewriter, node: gs.Node, qw: QuantizedWeight, input_scale: np.ndarray | None,
                   shift: np.ndarray | None = None) -> dict:
    """Weight (and bias, when its input is quantized) to integers behind DequantizeLinear; the
    layer's decision: op, weight bits and SQNR, and the bias's form when it stays float."""
    w = node.inputs[1]
    name, values = w.name, w.values.astype(np.float32)
    zero = np.zeros_like(qw.scale, np.int8) if qw.bits != 4 else None
    rw.set_input(node, 1, dequantized(rw, name, qw.stored(name + "_quantized"), qw.scale, zero, qw.layout.axis,
                                      qw.layout.block_size, shape=list(values.shape)))
    info = {"op": node.op, "weight_bits": qw.bits,
            "weight_sqnr_db": round(float(fidelity.measure(values, qw.dequantized()).sqnr_db), 2)}
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if not (isinstance(bias, gs.Constant) and bias.values.ndim == 1 and len(bias.outputs) == 1
            and attr(node, "beta", 1.0) == 1.0):
        return info
    b = bias.values.astype(np.float32) - (shift if shift is not None else 0.0)
    if input_scale is None:
        if shift is not None:
            rw.set_constant_input(node, 2, b)
        return info
    if qw.channel_scale is None:
        rw.set_constant_input(node, 2, b)
        info["bias"] = "float (per-group weight scales give no single int32 scale per channel)"
        return info
    bscale = (np.float32(input_scale) * qw.channel_scale).astype(np.float32) * np.ones(b.shape, np.float32)
    bq = np.round(b / bscale)
    if np.abs(bq).max(initial=0) < 2**31 - 1:
        rw.set_input(node, 2, dequantized(rw, bias.name, bq.astype(np.int32), bscale, np.zeros(b.shape, np.int32), 0))
    else:
        rw.set_constant_input(node, 2, b)
        info["bias"] = "float (int32 would overflow at scale input x weight)"
    return info


def apply_one(graph: gs.Graph, node: gs.Node, qw: QuantizedWeight, params: dict[str, QParams]) -> None:
    """Quantize `node` of `graph` alone: its weight, and its input when `params` has it."""
    rw = Rewriter(graph)
    x = node.inputs[0]
    quantize_layer(rw, node, qw, params[x.name].scale if x.name in params else None)
    if x.name in params:
        insert_pair(rw, x, params[x.name])
    rw.commit()
