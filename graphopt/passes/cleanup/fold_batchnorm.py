"""fold-batchnorm: fold an inference BatchNormalization into the Conv, ConvTranspose, Gemm or
MatMul that feeds it.

Matches: BatchNormalization (inference: one output, training_mode 0) with constant parameters,
whose input comes from one of those ops with a constant weight (and constant bias, if any).
Rewrites: W' = s W and b' = s (b - mean) + beta with s = gamma / sqrt(var + eps) on the
producer's output-channel axis, computed in float64; the BatchNormalization is removed.
Refuses: a weight or bias shared with another node, a producer whose output has other readers or
is a graph output, a channel axis that is not the producer's output-channel axis (MatMul of rank
other than 2), training mode.
Guarantees: EXACT; idempotent.
Verified by: tests/passes/cleanup/test_fold_batchnorm.py against onnxruntime.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir.graph import is_graph_output
from graphopt.ir.verify import SHAPES_INFERRED
from graphopt.passes.base import EXACT, PassInfo, Refused, RewritePass
from graphopt.pattern import Const, MatchResult, Op, Rewriter, Rule

PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
PATTERN = Op("BatchNormalization", Op(PRODUCERS, name="op", exclusive=False),
             Const("gamma"), Const("beta"), Const("mean"), Const("var"), name="bn")


def match(node: gs.Node, graph: gs.Graph) -> MatchResult:
    m = PATTERN.match(node, graph)
    if not m:
        return m
    op, bn = m["op"], m["bn"]
    out = op.outputs[0]
    if len(out.outputs) > 1 or is_graph_output(graph, out):
        raise Refused(f"output of {op.op} '{op.name}' is also read elsewhere")
    if bn.attrs.get("training_mode", 0) or len([t for t in bn.outputs if not t.is_empty()]) > 1:
        raise Refused("BatchNormalization is in training mode")
    weight_index = 1
    if len(op.inputs) <= weight_index or not isinstance(op.inputs[weight_index], gs.Constant):
        raise Refused(f"{op.op} '{op.name}' has no constant weight")
    for t in op.inputs[1:]:
        if isinstance(t, gs.Variable) and not t.is_empty():
            raise Refused(f"{op.op} '{op.name}' has a non-constant input '{t.name}'")
        if len(t.outputs) > 1:
            raise Refused(f"weight '{t.name}' is shared with another node")
    channels = m["gamma"].values.size
    why = _channel_problem(op, channels)
    if why:
        raise Refused(why)
    return m


def _channel_problem(op: gs.Node, channels: int) -> str | None:
    w = op.inputs[1].values
    if op.op == "Conv":
        have = w.shape[0]
    elif op.op == "ConvTranspose":
        have = w.shape[1] * op.attrs.get("group", 1)
    elif op.op == "Gemm":
        have = w.shape[0] if op.attrs.get("transB", 0) else w.shape[1]
    else:
        rank = None if op.outputs[0].shape is None else len(op.outputs[0].shape)
        if w.ndim != 2 or rank != 2:
            return f"MatMul '{op.name}' output rank {rank}: BatchNormalization channels are not its columns"
        have = w.shape[1]
    return None if have == channels else f"{op.op} has {have} output channels, BatchNormalization {channels}"


def rewrite(rw: Rewriter, node: gs.Node, m: MatchResult) -> None:
    op = m["op"]
    gamma, beta, mean, var = (m[k].values.astype(np.float64) for k in ("gamma", "beta", "mean", "var"))
    scale = gamma / np.sqrt(var + node.attrs.get("epsilon", 1e-5))
    shift = beta - mean * scale  # y = scale * x + shift
    w = op.inputs[1].values
    dtype = w.dtype
    if op.op == "Conv":
        new_w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    elif op.op == "ConvTranspose":
        g = op.attrs.get("group", 1)
        grouped = w.reshape((g, w.shape[0] // g) + w.shape[1:])
        new_w = (grouped * scale.reshape((g, 1, -1) + (1,) * (w.ndim - 2))).reshape(w.shape)
    elif op.op == "Gemm" and op.attrs.get("transB", 0):
        new_w = w * scale[:, None]
    else:
        new_w = w * scale[None, :]
    rw.set_input(op, 1, rw.constant(f"{op.name}_bn_weight", new_w.astype(dtype)))
    folded = op.outputs[0]  # for MatMul, the Add added below takes over this tensor
    if op.op == "MatMul":
        _add_bias(rw, op, shift.astype(dtype))
    else:
        _fold_bias(rw, op, scale, shift, dtype)
    rw.replace_uses(node.outputs[0], folded)
    rw.remove(node)


def _fold_bias(rw: Rewriter, op: gs.Node, scale: np.ndarray, shift: np.ndarray, dtype) -> None:
    has_bias = len(op.inputs) > 2 and not op.inputs[2].is_empty()
    bias = op.inputs[2].values.astype(np.float64) if has_bias else np.zeros_like(shift)
    if op.op == "Gemm":
        bias = bias * op.attrs.get("beta", 1.0)
        rw.set_attr(op, "beta", 1.0)
    new_bias = rw.constant(f"{op.name}_bn_bias", (bias * scale + shift).astype(dtype))
    rw.set_input(op, 2, new_bias)


def _add_bias(rw: Rewriter, op: gs.Node, shift: np.ndarray) -> None:
    out = op.outputs[0]
    product = rw.variable(f"{op.name}_out", dtype=out.dtype, shape=out.shape)
    rw.set_output(op, 0, product)
    rw.add_node("Add", [product, rw.constant(f"{op.name}_bn_shift", shift)], [out], name=f"{op.name}_bn_add")


class FoldBatchNorm(RewritePass):
    name = "fold-batchnorm"
    info = PassInfo(EXACT, requires=frozenset({SHAPES_INFERRED}))
    rules = (Rule("fold-batchnorm", ("BatchNormalization",), match, rewrite),)
