"""lower-int8: run quantized layers as integer operators instead of float math between Q and DQ.

Matches: the QDQ layers `quantize` emits: a Conv, Gemm or MatMul reading a per-tensor int8/uint8
DequantizeLinear, with an int8 weight behind DequantizeLinear (per tensor or per output channel,
zero points 0) and an int32 bias at scale input x weight, read by a QuantizeLinear (perhaps through
a Relu) or as float; and DQ -> MaxPool / Flatten / Reshape / Relu / Concat -> Q with one scale.
Rewrites: QLinearConv, QLinearMatMul, or ConvInteger / MatMulInteger -> Add(bias) -> Cast -> Mul
[-> QuantizeLinear]; Relu before Q as Max(y, zero point); pass-through ops on the integers (every
form, and why: docs/passes/lower-int8.md). Then, with activations="uint8" (or "auto", the default,
where this host's onnxruntime computes u8 x s8 exactly: shift_uint8.u8s8_inexact), int8 activations
become uint8 (shift_uint8.py: values and zero points + 128; weights stay int8, for u8 x s8 kernels).
Refuses: per-channel activations, uint8 or int4 weights, per-group (blocked) weight scales, non-zero
weight zero points, float or shared weights, a float input (weight-only quantization), a bias not
int32 at scale input x weight, a scale or zero point computed at run time, Gemm with transA, alpha
or beta, pass-through ops requantized differently; for uint8, an activation that is a graph input
or output or meets an op the shift does not know. Refused layers stay valid QDQ.
Guarantees: each integer tensor is within one step of the QDQ layer run in float (the same integer
sums, rounded once); the uint8 shift is exact. The steps compound through depth, so the model's
outputs are held to TOLERANCE(0, ATOL x max(1, max|y|)). Decisions: each node's form.
Verified by: tests/passes/quant/test_lower_int8.py against the QDQ model in onnxruntime.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto

from graphopt.ir.errors import PipelineError
from graphopt.ir.graph import attr, is_graph_output, np_dtype, producer
from graphopt.passes.base import TOLERANCE, Pass, PassContext, PassInfo, PassResult, Refusal, Refused, option
from graphopt.passes.quant.fold_qdq import QTYPES, QParams, onnx_type, qparams
from graphopt.passes.quant.shift_uint8 import to_uint8, u8s8_inexact
from graphopt.pattern import MatchResult, Rewriter, Rule, apply_rules, check_replacement

LAYERS = ("Conv", "Gemm", "MatMul")
PASS_THROUGH = ("MaxPool", "Flatten", "Reshape", "Relu", "Concat")
ACTIVATION_TYPES = (TensorProto.INT8, TensorProto.UINT8)
# Bias scale must be input scale x weight scale; quantize computes it in float32, so equal up to
# one float32 rounding.
BIAS_SCALE_RTOL = 1e-6
# Output error as a fraction of the output's largest magnitude. Each layer is within one step of
# the QDQ model, but a step flipped early propagates: 2% of max|y| through a 2-layer encoder, 7%
# through 12 layers (docs/passes/lower-int8.md); twice the deepest measured.
ATOL = 0.15


@dataclass(frozen=True)
class Layer:
    """A matched QDQ layer: the integer tensors and parameters the integer form is built from."""
    x: gs.Tensor            # the activation's integers (the input of its DequantizeLinear)
    xp: QParams
    weight: gs.Constant     # int8, in the layer's own layout
    wp: QParams
    bias: gs.Constant | None  # int32, 1-D
    quantize: gs.Node | None  # the QuantizeLinear the output goes to; None: the output stays float
    relu: gs.Node | None
    yp: QParams | None


def _dq(tensor: gs.Tensor) -> gs.Node | None:
    node = producer(tensor)
    return node if node is not None and node.op == "DequantizeLinear" else None


def _storage(qtype: int) -> type:
    return QTYPES[qtype][2]


def _activation(node: gs.Node) -> QParams:
    """The scalar parameters of an activation's DequantizeLinear or QuantizeLinear; raises `Refused`."""
    dq = node.op == "DequantizeLinear"
    tensor = node.inputs[0] if dq else node.outputs[0]  # the integer side
    p = qparams(node, None if tensor.shape is None else len(tensor.shape), onnx_type(tensor) if dq else None)
    if p.axis is not None:
        raise Refused(f"activation '{tensor.name}' is quantized per channel; integer kernels take one scale")
    if p.qtype not in ACTIVATION_TYPES:
        raise Refused(f"activation '{tensor.name}' is {TensorProto.DataType.Name(p.qtype)}, not int8 or uint8")
    scale = p.scale.reshape(())
    if not (np.isfinite(scale) and scale >= np.finfo(np.float32).tiny):
        raise Refused(f"scale of '{node.name}' is zero, subnormal or not finite")
    return QParams(scale, p.zero_point.reshape(()), p.qtype, None)


def _output_axis(node: gs.Node) -> int:
    return 0 if node.op == "Conv" or (node.op == "Gemm" and attr(node, "transB", 0)) else 1


# -- rule 1: a QDQ Conv / Gemm / MatMul -> integer operator ------------------------------------
def match_layer(node: gs.Node, graph: gs.Graph) -> MatchResult:
    if len(node.inputs) < 2:
        return MatchResult.no_match()
    xdq = _dq(node.inputs[0])
    if xdq is None:
        if _dq(node.inputs[1]) is not None:
            raise Refused(f"input '{node.inputs[0].name}' is float (weight-only quantization); "
                          "integer kernels need a quantized input")
        return MatchResult.no_match()  # a float layer: nothing to lower
    xp = _activation(xdq)
    wq, wp = _weight(node, graph)
    if node.op == "Gemm" and (attr(node, "transA", 0) or attr(node, "alpha", 1.0) != 1.0
                              or attr(node, "beta", 1.0) != 1.0):
        raise Refused(f"Gemm '{node.name}' uses transA, alpha or beta")
    bias = _bias(node, xp, wp)
    q, relu = _output_quantizer(node, graph)
    yp = _activation(q) if q is not None else None
    return MatchResult.ok(layer=Layer(xdq.inputs[0], xp, wq, wp, bias, q, relu, yp))


def _weight(node: gs.Node, graph: gs.Graph) -> tuple[gs.Constant, QParams]:
    w = node.inputs[1]
    dq = _dq(w)
    if dq is None:
        kind = "a float constant" if isinstance(w, gs.Constant) else "computed at run time"
        raise Refused(f"weight '{w.name}' is {kind}, not an int8 constant behind DequantizeLinear")
    wq = dq.inputs[0]
    # The type is read from the tensor, not its values: reading an INT4 constant's values turns it
    # into a numpy array graphsurgeon can no longer export.
    if not isinstance(wq, gs.Constant) or np_dtype(wq.dtype) != np.int8:
        what = np_dtype(wq.dtype).name if isinstance(wq, gs.Constant) else "computed at run time"
        raise Refused(f"weight '{wq.name}' is {what}: not an int8 constant (integer kernels take int8 weights; "
                      "int4 weights stay behind DequantizeLinear, which onnxruntime runs)")
    if dq.attrs.get("block_size", 0):
        raise Refused(f"weight '{wq.name}' has a scale per group of inputs (block_size); integer kernels take "
                      "one scale per output channel")
    if len(w.outputs) != 1 or len(wq.outputs) != 1 or is_graph_output(graph, w) or is_graph_output(graph, wq):
        raise Refused(f"weight '{wq.name}' is shared with another node")
    if (node.op == "Conv" and wq.values.ndim < 3) or (node.op != "Conv" and wq.values.ndim != 2):
        raise Refused(f"weight '{wq.name}' has rank {wq.values.ndim}")
    wp = qparams(dq, wq.values.ndim, TensorProto.INT8)
    if np.any(wp.zero_point != 0):
        raise Refused(f"weight '{wq.name}' has non-zero zero points; integer kernels take symmetric weights")
    if wp.axis is not None and wp.axis != _output_axis(node):
        raise Refused(f"weight '{wq.name}' is quantized along axis {wp.axis}, not its output channels")
    return wq, wp


def _bias(node: gs.Node, xp: QParams, wp: QParams) -> gs.Constant | None:
    if node.op == "MatMul" or len(node.inputs) < 3 or node.inputs[2].is_empty():
        return None
    b = node.inputs[2]
    dq = _dq(b)
    if dq is None or not isinstance(dq.inputs[0], gs.Constant) or dq.inputs[0].values.dtype != np.int32:
        raise Refused(f"bias '{b.name}' is not an int32 constant behind DequantizeLinear")
    bq = dq.inputs[0]
    scale, zero = dq.inputs[1], dq.inputs[2] if len(dq.inputs) > 2 else None
    if not isinstance(scale, gs.Constant) or (zero is not None and not zero.is_empty()
                                              and not (isinstance(zero, gs.Constant) and np.all(zero.values == 0))):
        raise Refused(f"bias '{b.name}' has a computed scale or a non-zero zero point")
    expected = np.float32(xp.scale) * wp.scale
    if bq.values.ndim != 1 or len(bq.outputs) != 1 or len(b.outputs) != 1 \
            or not np.allclose(scale.values, expected, rtol=BIAS_SCALE_RTOL, atol=0):
        raise Refused(f"bias '{bq.name}' is not a 1-D int32 at scale input x weight read only by '{node.name}'")
    return bq


def _output_quantizer(node: gs.Node, graph: gs.Graph) -> tuple[gs.Node | None, gs.Node | None]:
    """(QuantizeLinear, Relu between or None) that the layer's output goes to alone, or (None, None)."""
    out, relu = node.outputs[0], None
    for _ in range(2):
        readers = list(out.outputs)
        if is_graph_output(graph, out) or len(readers) != 1:
            return None, None
        if readers[0].op == "QuantizeLinear" and readers[0].inputs[0] is out:
            return readers[0], relu
        if readers[0].op != "Relu" or relu is not None:
            return None, None
        relu, out = readers[0], readers[0].outputs[0]
    return None, None


def lower_layer(rw: Rewriter, node: gs.Node, m: MatchResult) -> str:
    L: Layer = m["layer"]
    xz = rw.constant(node.name + "_x_zero_point", np.asarray(L.xp.zero_point).astype(_storage(L.xp.qtype)))
    # QLinearConv / QLinearMatMul take one activation type in and out, and QLinearMatMul no bias.
    qlinear = L.quantize is not None and L.yp.qtype == L.xp.qtype and (node.op != "Gemm" or L.bias is None)
    if qlinear:
        y, form = _qlinear(rw, node, L, xz), ("QLinearConv" if node.op == "Conv" else "QLinearMatMul")
    else:
        y, form = _integer(rw, node, L, xz)
    target = node.outputs[0]
    if L.quantize is not None:
        if L.relu is not None and not _at_minimum(L.yp):
            y = _max(rw, y, L.yp, node.name + "_relu")
            form += "+Max"
        target = L.quantize.outputs[0]
        rw.remove(L.quantize)
        if L.relu is not None:
            rw.remove(L.relu)
    rw.remove(node)
    _write_into(rw, y, target)
    return form


def _write_into(rw: Rewriter, y: gs.Variable, target: gs.Variable) -> None:
    """Make the new node that computes `y` write `target` (whose producer is gone) instead, so the
    integer tensor keeps the QuantizeLinear's output name and a float output keeps its own."""
    rw.set_output(producer(y), 0, target)


def _y_params(rw: Rewriter, prefix: str, yp: QParams) -> list[gs.Constant]:
    return [rw.constant(prefix + "_y_scale", np.asarray(yp.scale, np.float32)),
            rw.constant(prefix + "_y_zero_point", np.asarray(yp.zero_point).astype(_storage(yp.qtype)))]


def _weight_in_kn(rw: Rewriter, node: gs.Node, L: Layer) -> gs.Constant:
    """The weight as MatMul's right operand [K, N]: a Gemm with transB is transposed offline."""
    if node.op == "Gemm" and attr(node, "transB", 0):
        return rw.constant(L.weight.name + "_kn", np.ascontiguousarray(L.weight.values.T))
    return L.weight


def _qlinear(rw: Rewriter, node: gs.Node, L: Layer, xz: gs.Constant) -> gs.Variable:
    prefix = node.name
    xs = rw.constant(prefix + "_x_scale", np.asarray(L.xp.scale, np.float32))
    ws = rw.constant(prefix + "_w_scale", L.wp.scale)
    wz = rw.constant(prefix + "_w_zero_point", np.zeros(L.wp.scale.shape, np.int8))
    y = rw.variable(prefix + "_quantized", dtype=_storage(L.yp.qtype), shape=L.quantize.outputs[0].shape)
    if node.op == "Conv":
        bias = [L.bias] if L.bias is not None else []
        inputs = [L.x, xs, xz, L.weight, ws, wz, *_y_params(rw, prefix, L.yp), *bias]
        rw.add_node("QLinearConv", inputs, [y], dict(node.attrs), name=prefix)
    else:
        rw.add_node("QLinearMatMul", [L.x, xs, xz, _weight_in_kn(rw, node, L), ws, wz, *_y_params(rw, prefix, L.yp)],
                    [y], name=prefix)
    return y


def _integer(rw: Rewriter, node: gs.Node, L: Layer, xz: gs.Constant) -> tuple[gs.Variable, str]:
    """Integer product, int32 bias, then scaled to float; quantized again when a Q follows."""
    prefix, out = node.name, node.outputs[0]
    # ConvInteger takes one weight zero point only; the weights are symmetric, so a scalar 0 is exact.
    wz = rw.constant(prefix + "_w_zero_point", np.array(0, np.int8))
    acc = rw.variable(prefix + "_int32", dtype=np.int32, shape=out.shape)
    # Per-channel values broadcast along the output channels: axis 1 of NCHW, the last of [M, N].
    channel_shape = [-1] + [1] * (L.weight.values.ndim - 2) if node.op == "Conv" else [-1]
    if node.op == "Conv":
        form = "ConvInteger"
        rw.add_node(form, [L.x, L.weight, xz, wz], [acc], dict(node.attrs), name=prefix)
    else:
        form = "MatMulInteger"
        rw.add_node(form, [L.x, _weight_in_kn(rw, node, L), xz, wz], [acc], name=prefix)
    if L.bias is not None:
        biased = rw.variable(prefix + "_biased", dtype=np.int32, shape=out.shape)
        bias = L.bias if node.op != "Conv" else rw.constant(L.bias.name + "_nchw", L.bias.values.reshape(channel_shape))
        rw.add_node("Add", [acc, bias], [biased], name=prefix + "_bias")
        acc = biased
        form += "+Add"
    real = rw.variable(prefix + "_float", dtype=np.float32, shape=out.shape)
    rw.add_node("Cast", [acc], [real], {"to": TensorProto.FLOAT}, name=prefix + "_cast")
    multiplier = (np.float32(L.xp.scale) * L.wp.scale).astype(np.float32)
    if multiplier.ndim:
        multiplier = multiplier.reshape(channel_shape)
    scaled = rw.variable(prefix + "_scaled", dtype=np.float32, shape=out.shape)
    rw.add_node("Mul", [real, rw.constant(prefix + "_multiplier", multiplier)], [scaled], name=prefix + "_scale")
    form += "+Cast+Mul"
    if L.quantize is None:
        return scaled, form
    y = rw.variable(prefix + "_quantized", dtype=_storage(L.yp.qtype), shape=L.quantize.outputs[0].shape)
    rw.add_node("QuantizeLinear", [scaled, *_y_params(rw, prefix, L.yp)], [y], name=prefix + "_requantize")
    return y, form + "+QuantizeLinear"


def _at_minimum(p: QParams) -> bool:
    return int(p.zero_point) == QTYPES[p.qtype][0]


def _max(rw: Rewriter, y: gs.Variable, p: QParams, name: str) -> gs.Variable:
    """Relu on the integers: max(q, zero point)."""
    out = rw.variable(name, dtype=y.dtype, shape=y.shape)
    zero = rw.constant(name + "_floor", np.asarray(p.zero_point).astype(_storage(p.qtype)))
    rw.add_node("Max", [y, zero], [out], name=name)
    return out


# -- rule 2: DQ -> pass-through op -> Q with the same parameters -> the op on the integers ------
def match_pass_through(node: gs.Node, graph: gs.Graph) -> MatchResult:
    data = node.inputs if node.op == "Concat" else node.inputs[:1]
    dqs = [_dq(t) for t in data]
    if not data or any(dq is None for dq in dqs):
        return MatchResult.no_match()
    params = [_activation(dq) for dq in dqs]
    out = node.outputs[0]
    readers = list(out.outputs)
    q = readers[0] if len(readers) == 1 and readers[0].op == "QuantizeLinear" else None
    yp = _activation(q) if q is not None and len(node.outputs) == 1 and not is_graph_output(graph, out) else None
    if yp is None or not all(p.same_as(yp) for p in params):
        raise Refused(f"{node.op} '{node.name}' is not requantized alone with its input's scale and zero point")
    if node.op == "Relu" and _at_minimum(yp):
        check_replacement(graph, q.outputs[0], dqs[0].inputs[0])
    return MatchResult.ok(ints=[dq.inputs[0] for dq in dqs], quantize=q, params=yp)


def lower_pass_through(rw: Rewriter, node: gs.Node, m: MatchResult) -> str:
    q, p, ints = m["quantize"], m["params"], m["ints"]
    if node.op == "Relu":
        # At the type's minimum the integers are already >= the zero point: Relu is the identity.
        y = ints[0] if _at_minimum(p) else _max(rw, ints[0], p, node.name)
        form = "nothing" if _at_minimum(p) else "Max"
    else:
        y = rw.variable(node.outputs[0].name + "_quantized", dtype=_storage(p.qtype), shape=q.outputs[0].shape)
        rw.add_node(node.op, ints + list(node.inputs[len(ints):]), [y], dict(node.attrs), name=node.name)
        form = node.op
    target = q.outputs[0]
    rw.remove(q)
    rw.remove(node)
    if y is ints[0]:
        rw.replace_uses(target, y)
    else:
        _write_into(rw, y, target)
    return f"{form} on {TensorProto.DataType.Name(p.qtype).lower()}"


@dataclass(frozen=True)
class Options:
    activations: str = option("auto", "'uint8': int8 activations shifted to uint8, exactly (fast u8 x s8 "
                                      "kernels); 'keep': int8; 'auto': uint8 where this host's onnxruntime "
                                      "computes u8 x s8 exactly, else int8")

    def __post_init__(self):
        if self.activations not in ("auto", "uint8", "keep"):
            raise PipelineError(f"lower-int8: activations={self.activations!r} must be 'auto', 'uint8' or 'keep'")


class LowerInt8(Pass):
    """QDQ layers to integer operators (QLinearConv, QLinearMatMul, MatMulInteger, ConvInteger)."""

    name = "lower-int8"
    Options = Options
    # Opset 13: the per-axis DequantizeLinear quantize emits; Max on integers needs 12.
    info = PassInfo(TOLERANCE(0.0, ATOL, scaled=True), opset=(13, onnx.defs.onnx_opset_version()))

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(False)

        def recorded(rewrite):
            def apply(rw: Rewriter, node: gs.Node, m: MatchResult) -> None:
                result.decisions[node.name] = {"op": node.op, "form": rewrite(rw, node, m)}
            return apply

        rules = (Rule("lower-layer", LAYERS, match_layer, recorded(lower_layer)),
                 Rule("integer-pass-through", PASS_THROUGH, match_pass_through, recorded(lower_pass_through)))
        applied = apply_rules(graph, rules)
        result.refused = [Refusal(node, reason, rule) for (node, rule), reason in applied.refused.items()]
        result.refused += run_time_quantized(graph)
        shifted = 0
        # onnxruntime is the reference the lowered model is verified against and runs in: where its
        # u8 x s8 kernels saturate, uint8 activations would be exact math computed wrongly.
        inexact = u8s8_inexact() if self.options.activations == "auto" else None
        if self.options.activations == "uint8" or (self.options.activations == "auto" and inexact is None):
            shifted, kept = to_uint8(graph)
            result.refused += kept
        result.modified = applied.modified or shifted > 0
        result.stats = {"uint8_activations": shifted, "float_ops": float_ops(graph)}
        if inexact:
            result.stats["activations"] = f"int8 kept: {inexact}"
        return result


def run_time_quantized(graph: gs.Graph) -> list[Refusal]:
    """The layers quantize(mode=dynamic) writes (MatMulInteger / ConvInteger of a DynamicQuantizeLinear
    output): integer already, their activation scale known only at run time, so nothing to lower."""
    return [Refusal(n.name, f"already integer: {n.op} of a DynamicQuantizeLinear output (dynamic quantization, "
                            "activation scale computed at run time): nothing to lower", "dynamic")
            for n in graph.nodes if n.op in ("MatMulInteger", "ConvInteger")
            and (p := producer(n.inputs[0])) is not None and p.op == "DynamicQuantizeLinear"]


def float_ops(graph: gs.Graph) -> dict[str, int]:
    """Op types of the nodes that still compute in float (their first output is float32)."""
    return dict(Counter(n.op for n in graph.nodes
                        if n.outputs and n.outputs[0].dtype in (np.float32, TensorProto.FLOAT)))
