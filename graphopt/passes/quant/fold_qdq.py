"""fold-qdq: store fake-quantized weights as integers, and drop DequantizeLinear->QuantizeLinear round trips.

Matches: (1) QuantizeLinear of a float32 constant with constant float32 scale and zero point, per
tensor or per axis, to int8, uint8, int16, uint16, int4 or uint4 (the fake-quant weights that
quantization-aware training exports); (2) QuantizeLinear reading a DequantizeLinear with the same
scale, zero point, type and axis.
Rewrites: (1) the node becomes the integer constant it computes, which its readers (DequantizeLinear)
read, so the weight takes a quarter of the space; (2) the QuantizeLinear's readers read the
DequantizeLinear's input (a Q->DQ->Q chain collapses to its first Q).
Refuses: a weight also read by a node other than QuantizeLinear (storing it twice would grow the
model), a scale or zero point computed at run time, a QuantizeLinear whose output is a graph
output, a weight or scale that is not float32, blocked quantization, and other quantized types.
Guarantees: EXACT, bit for bit: the integers are onnxruntime's (float32 x / scale, rounded half to
even, plus the zero point, saturated); (q - z) * s / s rounds back to q for |q| < 2^16 and a normal,
finite scale, which (2) checks. Idempotent. NO_WEIGHT_QDQ holds after a run that refused nothing.
Verified by: tests/passes/quant/test_fold_qdq.py against onnxruntime (sizes: docs/passes/fold-qdq.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from graphopt.ir.errors import Refused
from graphopt.ir.graph import constant_nbytes, is_graph_output, np_dtype, producer
from graphopt.passes.base import EXACT, PassContext, PassInfo, PassResult, RewritePass
from graphopt.pattern import MatchResult, Rewriter, Rule, check_replacement

# ONNX type -> (lowest, highest, numpy type the integers are stored as).
QTYPES: dict[int, tuple[int, int, type]] = {
    TensorProto.INT8: (-128, 127, np.int8),
    TensorProto.UINT8: (0, 255, np.uint8),
    TensorProto.INT16: (-32768, 32767, np.int16),
    TensorProto.UINT16: (0, 65535, np.uint16),
    TensorProto.INT4: (-8, 7, ml_dtypes.int4),
    TensorProto.UINT4: (0, 15, ml_dtypes.uint4),
}
SUB_BYTE = (TensorProto.INT4, TensorProto.UINT4)


@dataclass(frozen=True)
class QParams:
    """What a QuantizeLinear or DequantizeLinear maps with; `axis` is None when per-tensor."""
    scale: np.ndarray
    zero_point: np.ndarray
    qtype: int
    axis: int | None

    def same_as(self, other: "QParams") -> bool:
        return (self.qtype == other.qtype and self.axis == other.axis
                and self.scale.shape == other.scale.shape and np.array_equal(self.scale, other.scale)
                and np.array_equal(self.zero_point.astype(np.int64), other.zero_point.astype(np.int64)))


def onnx_type(tensor: gs.Tensor) -> int | None:
    if tensor.dtype is None:
        return None
    return onnx.helper.np_dtype_to_tensor_dtype(np_dtype(tensor.dtype))


def qparams(node: gs.Node, rank: int | None, qtype: int | None) -> QParams:
    """The parameters of a Q or DQ node; raises `Refused` when they cannot be read. `qtype` is the
    integer side's type when the node has no zero point to say it (a DequantizeLinear's input)."""
    scale, zero = node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None
    if not isinstance(scale, gs.Constant):
        raise Refused(f"scale '{scale.name}' of {node.op} '{node.name}' is computed at run time")
    if zero is not None and not zero.is_empty() and not isinstance(zero, gs.Constant):
        raise Refused(f"zero point '{zero.name}' of {node.op} '{node.name}' is computed at run time")
    if node.attrs.get("block_size", 0):
        raise Refused(f"{node.op} '{node.name}' uses blocked quantization, which fold-qdq does not fold")
    s = scale.values
    if s.dtype != np.float32:
        raise Refused(f"scale of {node.op} '{node.name}' is {s.dtype}; only float32 scales are folded")
    if zero is not None and not zero.is_empty():
        qtype, z = onnx_type(zero), zero.values
    elif node.op == "DequantizeLinear":
        if qtype is None:
            raise Refused(f"type of '{node.inputs[0].name}' is unknown and '{node.name}' has no zero point to tell it")
        z = np.zeros(s.shape, np.int64)
    else:
        qtype = node.attrs.get("output_dtype") or TensorProto.UINT8  # the spec's default
        z = np.zeros(s.shape, np.int64)
    if qtype not in QTYPES:
        name = TensorProto.DataType.Name(qtype) if qtype else "unknown"
        raise Refused(f"{node.op} '{node.name}' quantizes to {name}; fold-qdq folds {_type_names()}")
    return QParams(s, z, qtype, _axis(node, s, rank))


def _axis(node: gs.Node, scale: np.ndarray, rank: int | None) -> int | None:
    if scale.size == 1:
        return None  # a one-element scale is per-tensor to onnxruntime whatever the axis says
    axis = node.attrs.get("axis", 1)
    return axis + rank if axis < 0 and rank is not None else axis


def _type_names() -> str:
    return ", ".join(TensorProto.DataType.Name(t).lower() for t in QTYPES)


def quantize(x: np.ndarray, p: QParams) -> np.ndarray:
    """What onnxruntime's QuantizeLinear computes: rint(x / scale) + zero point, saturated."""
    shape = [1] * x.ndim
    if p.axis is not None:
        shape[p.axis] = -1
    scale = p.scale.reshape(shape) if p.axis is not None else p.scale.reshape(())
    zero = p.zero_point.astype(np.float32).reshape(scale.shape)
    low, high, storage = QTYPES[p.qtype]
    q = np.clip(np.rint(x / scale) + zero, low, high)  # float32 throughout, as onnxruntime does
    return q.astype(np.int32).astype(storage)


def _stored(name: str, q: np.ndarray, qtype: int) -> np.ndarray | LazyValues:
    # graphsurgeon writes numpy arrays byte by byte; int4 must go through onnx to be packed.
    return LazyValues(numpy_helper.from_array(q, name)) if qtype in SUB_BYTE else q


# -- rule 1: QuantizeLinear on a constant weight -> integer constant ----------------------------
def match_weight(node: gs.Node, graph: gs.Graph) -> MatchResult:
    weight = node.inputs[0]
    if not isinstance(weight, gs.Constant):
        return MatchResult.no_match()
    out = node.outputs[0]
    if is_graph_output(graph, out):
        raise Refused(f"output '{out.name}' of QuantizeLinear '{node.name}' is a graph output")
    others = [n for n in weight.outputs if n.op != "QuantizeLinear"]
    if others or is_graph_output(graph, weight):
        reader = f"{others[0].op} '{others[0].name}'" if others else "the graph outputs"
        raise Refused(f"weight '{weight.name}' is shared with {reader}; it stays float")
    w = weight.values
    if w.dtype != np.float32:
        raise Refused(f"weight '{weight.name}' is {w.dtype}; only float32 weights are folded")
    if np.isnan(w).any():
        raise Refused(f"weight '{weight.name}' holds NaN, which has no integer value")
    p = qparams(node, w.ndim, None)
    if p.axis is not None and (p.axis >= w.ndim or w.shape[p.axis] != p.scale.size):
        raise Refused(f"QuantizeLinear '{node.name}' has {p.scale.size} scales for axis {p.axis} of weight "
                      f"'{weight.name}' {list(w.shape)}")
    return MatchResult.ok(weight=w, params=p)


def fold_weight(rw: Rewriter, node: gs.Node, m: MatchResult) -> None:
    p = m["params"]
    rw.fold(node, [_stored(node.outputs[0].name, quantize(m["weight"], p), p.qtype)])


# -- rule 2: DequantizeLinear -> QuantizeLinear with equal parameters -> nothing ----------------
def match_round_trip(node: gs.Node, graph: gs.Graph) -> MatchResult:
    dq = producer(node.inputs[0])
    if dq is None or dq.op != "DequantizeLinear" or dq.domain not in ("", "ai.onnx", None):
        return MatchResult.no_match()
    source = dq.inputs[0]
    rank = None if source.shape is None else len(source.shape)
    first, second = qparams(dq, rank, onnx_type(source)), qparams(node, rank, None)
    if not first.same_as(second):
        raise Refused(f"DequantizeLinear '{dq.name}' and QuantizeLinear '{node.name}' "
                      "differ in scale, zero point, type or axis")
    if not _round_trips(first.scale):
        raise Refused(f"scale of '{dq.name}' is zero, subnormal or not finite")
    check_replacement(graph, node.outputs[0], source)
    return MatchResult.ok(source=source)


def _round_trips(scale: np.ndarray) -> bool:
    """(q - z) * s / s rounds back to q in float32 for |q - z| < 2^16 when s is normal and
    (q - z) * s cannot overflow."""
    s = np.abs(scale.astype(np.float64))
    return bool(np.all(np.isfinite(s)) and np.all(s >= np.finfo(np.float32).tiny)
                and np.all(s * 2**16 < np.finfo(np.float32).max))


def drop_round_trip(rw: Rewriter, node: gs.Node, m: MatchResult) -> None:
    rw.replace_uses(node.outputs[0], m["source"])
    rw.remove(node)


class FoldQDQ(RewritePass):
    name = "fold-qdq"
    info = PassInfo(EXACT, opset=(10, onnx.defs.onnx_opset_version()))
    rules = (Rule("fold-weight-qdq", ("QuantizeLinear",), match_weight, fold_weight),
             Rule("drop-dq-q", ("QuantizeLinear",), match_round_trip, drop_round_trip))

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        before = _constant_bytes(graph)
        result = super().run(graph, ctx)
        result.stats["constant_bytes"] = {"before": before, "after": _constant_bytes(graph)}
        return result


def _constant_bytes(graph: gs.Graph) -> int:
    return sum(constant_nbytes(t) for t in graph.tensors().values() if isinstance(t, gs.Constant))
