"""quantize(mode=dynamic): int8 weights stored as integers, activations quantized at run time.

Matches: the layers `quantize` selects (Conv, Gemm, MatMul with a constant float32 weight, by
include/exclude); refuses a Gemm with transA, a MatMul weight that is not 2-D, a Gemm bias computed
at run time with beta != 1, and every layer of a graph that already holds quantized operators.
Rewrites each layer into the form onnxruntime's `quantize_dynamic` writes, which its graph
optimizer fuses into one DynamicQuantizeMatMul (MatMulIntegerToFloat) kernel:

    x -> DynamicQuantizeLinear -> (q uint8, scale, zero point)      one per activation, shared
    MatMulInteger(q, W int8 [K, N], zero point, 0) -> Cast(float) -> Mul(scale x w_scale) [-> Add(bias)]
    ConvInteger(q, W int8, zero point, 0)          -> Cast(float) -> Mul(scale x w_scale[C,1..]) [-> Add(bias)]

DynamicQuantizeLinear takes each run's own range [min(x, 0), max(x, 0)] of the whole tensor (per
tensor, asymmetric uint8). Weights are symmetric int8 in [-127, 127] (rounded as the pass's
`rounding` option says: GPTQ with data), per output channel (`per_channel`) or per tensor; the
weight scale, a Gemm's alpha, and the run-time activation scale multiply the int32 sums in float.
A Gemm's weight is transposed offline when transB; its bias C (times beta) and a Conv's bias are
added in float. ConvInteger takes one weight zero point (onnxruntime refuses a vector), so a Conv
gets a scalar 0 and its per-channel scales go into the Mul.

Per-token scales (one per row) would need QuantizeLinear with a run-time scale per row and a
signed x signed MatMulInteger, which onnxruntime does not fuse and runs 3x slower than the
unsigned x signed kernel (docs/passes/quantize.md): this mode is per tensor, as onnxruntime's is.

Guarantees: LOSSY(cosine >= 0.99), as static quantize. Decisions: per layer, form and weight SQNR.
Verified by: tests/passes/quant/test_dynamic.py (against onnxruntime's quantize_dynamic, the float
model and lower-int8).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from graphopt.ir import fidelity
from graphopt.ir.data import input_specs, random_feeds
from graphopt.ir.errors import PipelineError, Refused
from graphopt.ir.graph import attr
from graphopt.passes.base import Layer, PassContext, PassResult
from graphopt.passes.quant.weight_quant import QuantizedWeight
from graphopt.pattern import Rewriter

if TYPE_CHECKING:
    from graphopt.passes.quant.insert_qdq import Options, Quantize

# Operators that mean the graph is quantized already (by this pass, by quantize, or by training).
QUANTIZED_OPS = ("DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearConv",
                 "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")


def check_options(o: Options) -> None:
    """Options that mode=dynamic cannot honour are errors, not silently ignored."""
    def bad(name: str, why: str) -> PipelineError:
        return PipelineError(f"quantize: {name}={getattr(o, name)!r} {why} with mode=dynamic")
    if o.weight_bits != 8:
        raise bad("weight_bits", "is not 8: MatMulInteger and ConvInteger take int8 weights")
    if o.group_size:
        raise bad("group_size", "is not 0: per-group scales cannot scale the integer sums after the product")
    if o.keep_float != 0:
        raise bad("keep_float", "is not supported (the sensitivity measure quantizes layers in QDQ form)")
    if o.bias_correction:
        raise bad("bias_correction", "is not supported: run-time activation scales leave no fixed shift")


def chosen(o: Options, graph: gs.Graph, ctx: PassContext) -> bool:
    """Whether quantize runs in dynamic mode: asked for, or mode=auto on a transformer-like graph
    with --data and options that dynamic mode honours (docs/passes/quantize.md: on the corpus's
    BERT encoders it beats static int8 on output cosine and on onnxruntime latency)."""
    if o.mode != "auto":
        return o.mode == "dynamic"
    try:
        check_options(o)
    except PipelineError:
        return False
    return ctx.from_data and transformer_like(graph)


def transformer_like(graph: gs.Graph) -> bool:
    """Attention: a Softmax, and a MatMul of two computed operands (queries x keys)."""
    return any(n.op == "Softmax" for n in graph.nodes) and any(
        n.op == "MatMul" and not any(isinstance(t, gs.Constant) for t in n.inputs) for n in graph.nodes)


def check_unquantized(graph: gs.Graph) -> None:
    """Raises `Refused` when the graph holds quantized operators already: a second run leaves
    alone what the first left in float."""
    found = sorted({n.op for n in graph.nodes if n.op in QUANTIZED_OPS})
    if found:
        raise Refused(f"graph already has {', '.join(found)} (quantized): quantize the float model")


def examine(node: gs.Node) -> None:
    """Raises `Refused` for a layer the integer operators cannot compute."""
    w = node.inputs[1].values
    if node.op == "Gemm" and attr(node, "transA", 0):
        raise Refused("Gemm with transA (MatMulInteger takes A as it is)")
    if node.op in ("Gemm", "MatMul") and w.ndim != 2:
        raise Refused(f"weight has rank {w.ndim}, not 2 (MatMulInteger's right operand is one [K, N] matrix)")
    if node.op == "Conv" and w.ndim < 3:
        raise Refused(f"Conv weight has rank {w.ndim}")
    bias = _bias(node)
    if node.op == "Conv" and bias is not None and not isinstance(bias, gs.Constant):
        raise Refused(f"Conv bias '{bias.name}' is computed at run time")
    if node.op == "Gemm" and bias is not None and not isinstance(bias, gs.Constant) and attr(node, "beta", 1.0) != 1.0:
        raise Refused("Gemm bias computed at run time with beta != 1")


def run(pass_: Quantize, graph: gs.Graph, ctx: PassContext) -> PassResult:
    """`quantize` with mode=dynamic: select, round the weights, rewrite every accepted layer."""
    result = PassResult(False)
    layers = pass_.select(graph, result)
    mode = "dynamic" if pass_.options.mode == "dynamic" else "dynamic (auto: transformer-like, --data)"
    result.stats.update(mode=mode, activations="per tensor, at run time (DynamicQuantizeLinear)")
    try:
        check_unquantized(graph)
    except Refused as e:
        for layer in layers:
            result.refuse(layer.name, e.reason)
        return result
    accepted = _accepted(layers, result)
    if not accepted:
        return result
    feeds = ctx.feeds if ctx.feeds is not None else random_feeds(input_specs(graph), ctx.seed, batch=8)
    rounding = pass_.rounding(ctx)
    result.stats["rounding"] = rounding
    bits = pass_.options.weight_grid(uint8_activations=True)  # DynamicQuantizeLinear writes uint8
    if bits != pass_.options.weight_bits:
        result.stats["reduce_range"] = pass_.options.reduce_range_reason()
    weights, how = pass_.weights(graph, accepted, feeds, rounding, ctx, bits)
    rw = Rewriter(graph)
    quantized: dict[str, tuple[gs.Variable, gs.Variable, gs.Variable]] = {}
    for node in accepted:
        decision = rewrite(rw, node, weights[node.name], quantized)
        result.decisions[node.name] = {**decision, "rounding": how[node.name]}
    rw.commit()
    result.modified = rw.changes > 0
    result.stats["activations_quantized"] = len(quantized)
    return result


def _accepted(layers: list[Layer], result: PassResult) -> list[gs.Node]:
    accepted = []
    for layer in layers:
        try:
            examine(layer.node)
        except Refused as e:
            result.refuse(layer.name, e.reason)
            continue
        accepted.append(layer.node)
    return accepted


def _quantized_input(rw: Rewriter, x: gs.Variable,
                     done: dict[str, tuple[gs.Variable, gs.Variable, gs.Variable]]) -> tuple[gs.Variable, ...]:
    """(q, scale, zero point) of `x`: one DynamicQuantizeLinear per activation, shared by its layers."""
    if x.name not in done:
        q = rw.variable(x.name + "_quantized", dtype=np.uint8, shape=x.shape)
        scale = rw.variable(x.name + "_scale", dtype=np.float32, shape=[])
        zero = rw.variable(x.name + "_zero_point", dtype=np.uint8, shape=[])
        rw.add_node("DynamicQuantizeLinear", [x], [q, scale, zero], name=x.name + "_quantize")
        done[x.name] = (q, scale, zero)
    return done[x.name]


def rewrite(rw: Rewriter, node: gs.Node, qw: QuantizedWeight,
            done: dict[str, tuple[gs.Variable, gs.Variable, gs.Variable]]) -> dict:
    """Replace `node` by the integer product of its run-time quantized input and `qw`, scaled
    back to float into the node's own output tensor."""
    prefix, out = node.name, node.outputs[0]
    q, x_scale, x_zero = _quantized_input(rw, node.inputs[0], done)
    w_float = node.inputs[1].values.astype(np.float32)
    scale = np.asarray(qw.scale, np.float32)
    acc = rw.variable(prefix + "_int32", dtype=np.int32, shape=out.shape)
    if node.op == "Conv":
        form = "ConvInteger"
        # One weight zero point only (onnxruntime); the weights are symmetric, so a scalar 0 is exact.
        wz = rw.constant(prefix + "_w_zero_point", np.array(0, np.int8))
        rw.add_node(form, [q, rw.constant(prefix + "_w_quantized", qw.q), x_zero, wz], [acc], dict(node.attrs),
                    name=prefix)
        channels = [-1] + [1] * (qw.q.ndim - 2)  # per-channel values broadcast over NC...
        multiplier = scale.reshape(channels) if scale.ndim else scale
        bias = _bias(node)
        if bias is not None:
            bias = rw.constant(bias.name + "_nchw", bias.values.astype(np.float32).reshape(channels))
    else:
        form = "MatMulInteger"
        q_kn = qw.q.T if node.op == "Gemm" and attr(node, "transB", 0) else qw.q
        wz = rw.constant(prefix + "_w_zero_point", np.zeros(scale.shape, np.int8))
        rw.add_node(form, [q, rw.constant(prefix + "_w_quantized", np.ascontiguousarray(q_kn)), x_zero, wz], [acc],
                    name=prefix)
        multiplier = (scale * np.float32(attr(node, "alpha", 1.0))).astype(np.float32)
        bias = _gemm_bias(rw, node) if node.op == "Gemm" else None
    real = rw.variable(prefix + "_float", dtype=np.float32, shape=out.shape)
    rw.add_node("Cast", [acc], [real], {"to": TensorProto.FLOAT}, name=prefix + "_cast")
    factor = rw.variable(prefix + "_multiplier", dtype=np.float32, shape=list(multiplier.shape))
    rw.add_node("Mul", [x_scale, rw.constant(prefix + "_w_scale", multiplier)], [factor], name=prefix + "_scales")
    rw.remove(node)
    scaled = out if bias is None else rw.variable(prefix + "_scaled", dtype=np.float32, shape=out.shape)
    rw.add_node("Mul", [real, factor], [scaled], name=prefix + "_rescale")
    if bias is not None:
        rw.add_node("Add", [scaled, bias], [out], name=prefix + "_bias")
    form = f"DynamicQuantizeLinear+{form}+Cast+Mul" + ("+Add" if bias is not None else "")
    return {"op": node.op, "form": form, "weight_bits": qw.bits,
            "weight_sqnr_db": round(float(fidelity.measure(w_float, qw.dequantized()).sqnr_db), 2)}


def _bias(node: gs.Node) -> gs.Tensor | None:
    return node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None


def _gemm_bias(rw: Rewriter, node: gs.Node) -> gs.Tensor | None:
    """beta x C, folded when C is a constant; C itself (beta is 1, as `examine` checks) otherwise."""
    bias = _bias(node)
    if bias is None or not isinstance(bias, gs.Constant):
        return bias
    return rw.constant(bias.name + "_scaled", (bias.values * np.float32(attr(node, "beta", 1.0))).astype(np.float32))
