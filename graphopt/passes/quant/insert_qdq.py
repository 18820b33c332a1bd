"""quantize: post-training int8 quantization in the QDQ format onnxruntime runs.

Matches: Conv, Gemm and MatMul nodes whose weight (input 1) is a floating-point constant, chosen
by `include` / `exclude` (node names or op types) and not kept in float by `keep_float`.
Rewrites: the weight becomes an int8 initializer behind DequantizeLinear, symmetric and
per output channel (axis 0 for Conv, the output axis of a Gemm/MatMul weight) or per tensor
(`per_channel=false`); a 1-D bias becomes int32 with scale = input scale x weight scale behind
DequantizeLinear; a QuantizeLinear->DequantizeLinear pair goes on the activation input and on the
output of each matched node (on the following Relu's output instead when a Relu is the output's
only reader, as int8 runtimes fuse it). Pass-through ops (MaxPool, Relu, Reshape, Flatten, Concat)
with quantized inputs get a pair on their output too, sharing one scale with their inputs.
Activation ranges come from calibration (graphopt.passes.quant.calibrate) on `ctx.feeds`, or on
random inputs with a warning in stats; `calibration` picks minmax, percentile, entropy or mse.
Activations are int8 symmetric (`activation_type="int8"`, zero point 0) or uint8 asymmetric.
Graph outputs stay float. `bias_correction` folds the mean output shift the weight rounding
causes (measured on the calibration data) into the bias. `keep_float` keeps the N layers whose
quantization alone costs most (SQNR of the outputs, one layer at a time) in float; "auto" keeps
those that cost 10 dB more than the median layer.
Refuses, with the reason in stats: a weight shared with another node or that is a graph output,
a constant left operand of Gemm/MatMul, opsets below 13 (per-axis DequantizeLinear), and every
layer of a graph that already holds DequantizeLinear (quantized, or fake-quant from training).
Stats: per layer, the weight SQNR and the SQNR of the layer's output in the quantized model
against the float model (errors accumulate down the graph), on up to 64 calibration samples.
Guarantees: LOSSY(cosine >= 0.99): the bound tests hold the bundled builders (random weights and
inputs; the worst measured is 0.998, the MLP with entropy calibration) and the digits CNN to; on
the digits CNN the accuracy drop is under 0.5 point and at least onnxruntime's quantize_static's.
Verified by: tests/passes/quant/test_quantize.py against onnxruntime and its quantizer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import fidelity, ort
from graphopt.ir.data import input_specs, random_feeds
from graphopt.ir.errors import PipelineError
from graphopt.ir.graph import attr, is_graph_output, opset
from graphopt.ir.verify import TOPOSORTED
from graphopt.passes.base import LOSSY, Pass, PassContext, PassInfo, PassResult
from graphopt.passes.quant import calibrate as cal
from graphopt.passes.weights import weight_refusal
from graphopt.pattern import Rewriter

QUANTIZED = ("Conv", "Gemm", "MatMul")
PASS_THROUGH = ("MaxPool", "Relu", "Reshape", "Flatten", "Concat")
ERROR_SAMPLES = 64


@dataclass(frozen=True)
class Options:
    calibration: str = "minmax"
    percentile: float = 99.99
    activation_type: str = "int8"
    per_channel: bool = True
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    bias_correction: bool = False
    keep_float: int | str = 0
    batch_size: int = 32

    def __post_init__(self):
        if self.calibration not in cal.METHODS:
            raise PipelineError(f"quantize: calibration={self.calibration!r} must be one of {', '.join(cal.METHODS)}")
        if self.activation_type not in ("int8", "uint8"):
            raise PipelineError(f"quantize: activation_type={self.activation_type!r} must be 'int8' "
                                "(symmetric) or 'uint8' (asymmetric)")
        if not (isinstance(self.keep_float, int) and self.keep_float >= 0) and self.keep_float != "auto":
            raise PipelineError(f"quantize: keep_float={self.keep_float!r} must be a layer count or 'auto'")


@dataclass(frozen=True)
class QParams:
    scale: np.ndarray  # float32, scalar or per channel
    zero_point: np.ndarray  # int8 / uint8 / int32, same shape


def weight_axis(node: gs.Node) -> int:
    """The output-channel axis of the node's weight (input 1)."""
    w = node.inputs[1]
    if node.op == "Conv":
        return 0
    if node.op == "Gemm":
        return 0 if attr(node, "transB", 0) else 1
    return len(w.shape) - 1


def select(graph: gs.Graph, o: Options) -> tuple[list[gs.Node], list[dict], list[dict]]:
    """(layers to quantize, refused with reasons, skipped by the options)."""
    layers, refused, skipped = [], [], []
    for node in graph.nodes:
        if node.op not in QUANTIZED or node.domain not in ("", "ai.onnx", None) or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        if not isinstance(weight, gs.Constant):
            if isinstance(node.inputs[0], gs.Constant):
                refused.append({"node": node.name, "reason": "constant left operand (only input 1 is quantized as a weight)"})
            continue  # an activation x activation product, or already quantized
        if (o.include and node.name not in o.include and node.op not in o.include) \
                or node.name in o.exclude or node.op in o.exclude:
            skipped.append({"node": node.name, "reason": "excluded by include/exclude"})
            continue
        why = weight_refusal(graph, weight, "quantize")
        if why:
            refused.append({"node": node.name, "reason": why})
        else:
            layers.append(node)
    known = {n.name for n in graph.nodes if n.op in QUANTIZED} | set(QUANTIZED)
    unknown = sorted(set(o.include + o.exclude) - known)
    if unknown:
        raise PipelineError(f"quantize: include/exclude: no Conv/Gemm/MatMul node or op named {', '.join(unknown)} "
                            f"(layers: {', '.join(sorted(known - set(QUANTIZED))) or 'none'})")
    return layers, refused, skipped


class _Groups:
    """Tensors that must share one scale (a pass-through op's inputs and output)."""

    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, name: str) -> str:
        while self.parent.setdefault(name, name) != name:
            name = self.parent[name]
        return name

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


def plan_activations(graph: gs.Graph, layers: list[gs.Node]) -> tuple[list[str], _Groups]:
    """The activation tensors that get a Q->DQ pair, in graph order, and their scale groups."""
    chosen: dict[str, None] = {}

    def add(t: gs.Tensor) -> bool:
        ok = isinstance(t, gs.Variable) and not is_graph_output(graph, t) and t.dtype in (None, np.float32)
        if ok:
            chosen[t.name] = None
        return ok

    for node in layers:
        add(node.inputs[0])
        out = node.outputs[0]
        readers = list(out.outputs)
        if len(readers) == 1 and readers[0].op == "Relu" and not is_graph_output(graph, out):
            add(readers[0].outputs[0])
        else:
            add(out)
    groups = _Groups()
    for node in graph.nodes:
        data = node.inputs if node.op == "Concat" else node.inputs[:1]
        if node.op in PASS_THROUGH and data and all(t.name in chosen for t in data) and add(node.outputs[0]):
            for t in data:
                groups.union(t.name, node.outputs[0].name)
    return list(chosen), groups


def activation_params(stats: dict[str, cal.TensorStats], names: list[str], groups: _Groups,
                      o: Options) -> dict[str, QParams]:
    levels = 128 if o.activation_type == "int8" else 256
    ranges: dict[str, tuple[float, float]] = {}
    for name in names:
        lo, hi = stats[name].range(o.calibration, o.percentile, levels)
        root = groups.find(name)
        glo, ghi = ranges.get(root, (0.0, 0.0))
        ranges[root] = (min(glo, lo), max(ghi, hi))
    params = {}
    for name in names:
        lo, hi = ranges[groups.find(name)]
        if o.activation_type == "int8":
            scale = max(abs(lo), abs(hi)) / 127.0 or 1.0
            params[name] = QParams(np.float32(scale), np.int8(0))
        else:
            scale = (hi - lo) / 255.0 or 1.0
            params[name] = QParams(np.float32(scale), np.uint8(np.clip(round(-lo / scale), 0, 255)))
    return params


def quantize_weight(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values, float32 scale): symmetric over [-127, 127], per channel along `axis`."""
    if axis is None:
        amax = np.abs(w).max(initial=0.0)
    else:
        amax = np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(axis=1, initial=0.0)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


def _dequantized(rw: Rewriter, prefix: str, q: np.ndarray, p: QParams, axis: int | None) -> gs.Variable:
    out = rw.variable(prefix + "_dequantized", dtype=np.float32, shape=list(q.shape))
    attrs = {"axis": axis} if axis is not None else {}
    rw.add_node("DequantizeLinear", [rw.constant(prefix + "_quantized", q), rw.constant(prefix + "_scale", p.scale),
                                     rw.constant(prefix + "_zero_point", p.zero_point)], [out], attrs)
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


def quantize_layer(rw: Rewriter, node: gs.Node, input_scale: np.ndarray | None, per_channel: bool,
                   shift: np.ndarray | None = None) -> dict:
    """Weight (and bias, when its input is quantized) to integers behind DequantizeLinear."""
    w = node.inputs[1].values.astype(np.float32)
    axis = weight_axis(node)
    q, scale = quantize_weight(w, axis if per_channel else None)
    rw.set_input(node, 1, _dequantized(rw, node.inputs[1].name, q, QParams(scale, np.zeros_like(scale, np.int8)),
                                       axis if per_channel else None))
    shape = [1] * w.ndim
    if per_channel:
        shape[axis] = -1
    wq = q.astype(np.float32) * scale.reshape(shape)
    info = {"op": node.op, "weight_sqnr_db": round(fidelity.measure(w, wq).sqnr_db, 2)}
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if isinstance(bias, gs.Constant) and bias.values.ndim == 1 and len(bias.outputs) == 1 \
            and attr(node, "beta", 1.0) == 1.0:
        b = bias.values.astype(np.float32) - (shift if shift is not None else 0.0)
        if input_scale is None:
            if shift is not None:
                rw.set_constant_input(node, 2, b)
        else:
            bscale = (np.float32(input_scale) * scale).astype(np.float32) * np.ones(b.shape, np.float32)
            bq = np.round(b / bscale)
            if np.abs(bq).max(initial=0) < 2**31 - 1:
                rw.set_input(node, 2, _dequantized(rw, bias.name, bq.astype(np.int32),
                                                   QParams(bscale, np.zeros(b.shape, np.int32)), 0))
            else:
                rw.set_constant_input(node, 2, b)
                info["bias"] = "float (int32 would overflow at scale input x weight)"
    return info


class Quantize(Pass):
    """Post-training int8 quantization (QDQ): per-channel int8 weights, calibrated activations."""

    name = "quantize"
    info = PassInfo(LOSSY("cosine", 0.99), opset=(13, PassInfo().opset[1]), requires=frozenset({TOPOSORTED}))
    Options = Options

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        o = self.options
        layers, refused, skipped = select(graph, o)
        stats: dict = {"calibration": o.calibration, "activation_type": o.activation_type, "refused": refused,
                       "skipped": skipped}
        if any(n.op == "DequantizeLinear" for n in graph.nodes):
            # Already quantized (by this pass or by training): layers left in float stay there, so
            # a second run, or `keep_float`, never changes what the first one decided.
            stats["refused"] = [{"node": n.name, "reason": "graph already has DequantizeLinear (quantized or "
                                 "fake-quant): run fold-qdq, or quantize the float model"} for n in layers]
            return PassResult(False, stats)
        if opset(graph) < 13:
            stats["refused"] = [{"node": n.name, "reason": f"opset {opset(graph)} < 13 has no per-axis "
                                 "DequantizeLinear: upgrade the model's opset"} for n in layers]
            return PassResult(False, stats)
        if not layers:
            return PassResult(False, stats)
        feeds = ctx.feeds
        if feeds is None:
            feeds = random_feeds(input_specs(graph), ctx.seed, batch=8)
            stats["warning"] = "no calibration data (--data): calibrated on random inputs; ranges may be wrong"
        report = (lambda done, total: ctx.progress("calibration", done, total)) if ctx.progress else None
        float_graph = graph.copy()
        names, groups = plan_activations(graph, layers)
        observed = cal.calibrate(graph, names, feeds, o.batch_size, report)
        params = activation_params(observed, names, groups, o)
        kept = self._keep_float(float_graph, layers, params, feeds, stats)
        shifts = bias_shifts(float_graph, [n for n in layers if n.name not in kept], feeds, o) \
            if o.bias_correction else {}
        layer_stats = apply(graph, [n for n in layers if n.name not in kept], params, o.per_channel, shifts)
        layer_errors(float_graph, graph, layer_stats, {n.name: n.outputs[0].name for n in layers}, feeds)
        stats.update({"layers": layer_stats, "activations_quantized": len(names)})
        if kept:
            stats["kept_float"] = sorted(kept)
        return PassResult(bool(layer_stats), stats)

    def _keep_float(self, graph, layers, params, feeds, stats) -> set[str]:
        k = self.options.keep_float
        if k == 0 or not layers:
            return set()
        ranking = layer_sensitivity(graph, layers, params, self.options.per_channel, feeds)
        stats["sensitivity_sqnr_db"] = ranking
        worst = sorted(ranking, key=ranking.get)
        if k == "auto":
            median = float(np.median(list(ranking.values())))
            return {name for name in worst if ranking[name] < median - 10.0}
        return set(worst[:k])


def apply(graph: gs.Graph, layers: list[gs.Node], params: dict[str, QParams], per_channel: bool,
          shifts: dict[str, np.ndarray] | None = None) -> dict[str, dict]:
    """Quantize `layers` and the activations around them that `params` covers. Returns per-layer stats."""
    plan, _ = plan_activations(graph, layers)
    tensors = graph.tensors()
    rw = Rewriter(graph)
    layer_stats = {}
    for node in layers:
        x = node.inputs[0]
        scale = params[x.name].scale if x.name in params and x.name in plan else None
        layer_stats[node.name] = quantize_layer(rw, node, scale, per_channel, (shifts or {}).get(node.name))
    for name in plan:
        if name in params:
            insert_pair(rw, tensors[name], params[name])
    rw.commit()
    return layer_stats


def _sample(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v[:ERROR_SAMPLES] for k, v in feeds.items()}


def layer_errors(float_graph: gs.Graph, graph: gs.Graph, layer_stats: dict, outputs: dict[str, str],
                 feeds: dict[str, np.ndarray]) -> None:
    """Add each quantized layer's output SQNR (quantized model vs float model) to its stats."""
    names = [outputs[name] for name in layer_stats]
    sample = _sample(feeds)
    ref = ort.run(cal.with_outputs(float_graph, names), sample)
    got = ort.run(cal.with_outputs(graph, names), sample)
    for name, info in layer_stats.items():
        out = outputs[name]
        info["output_sqnr_db"] = round(fidelity.measure(ref[out], got[out]).sqnr_db, 2)


def diagnose(graph: gs.Graph, feeds: dict[str, np.ndarray], options: Options | None = None,
             progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Per quantizable layer, worst first: the model's lowest output SQNR (dB) when only that
    layer (weights and input activation) is quantized, calibrated on `feeds`."""
    o = options or Options()
    layers, _, _ = select(graph, o)
    names, groups = plan_activations(graph, layers)
    observed = cal.calibrate(graph, names, feeds, o.batch_size, progress)
    ranking = layer_sensitivity(graph, layers, activation_params(observed, names, groups, o), o.per_channel, feeds)
    return dict(sorted(ranking.items(), key=lambda kv: kv[1]))


def layer_sensitivity(graph: gs.Graph, layers: list[gs.Node], params: dict[str, QParams], per_channel: bool,
                      feeds: dict[str, np.ndarray]) -> dict[str, float]:
    """Lowest output SQNR (dB) of the model with only one layer (weights and input) quantized, per layer."""
    sample = _sample(feeds)
    reference = ort.run(graph, sample)
    ranking = {}
    for node in layers:
        copy = graph.copy()
        target = next(n for n in copy.nodes if n.name == node.name)
        x = target.inputs[0].name
        apply_one(copy, target, {x: params[x]} if x in params else {}, per_channel)
        measured = fidelity.compare(reference, ort.run(copy, sample))
        ranking[node.name] = round(min(m.sqnr_db for m in measured.values()), 2)
    return ranking


def apply_one(graph: gs.Graph, node: gs.Node, params: dict[str, QParams], per_channel: bool) -> None:
    rw = Rewriter(graph)
    x = node.inputs[0]
    quantize_layer(rw, node, params[x.name].scale if x.name in params else None, per_channel)
    if x.name in params:
        insert_pair(rw, x, params[x.name])
    rw.commit()


def bias_shifts(graph: gs.Graph, layers: list[gs.Node], feeds, o: Options) -> dict[str, np.ndarray]:
    """Per layer, the mean per-channel output shift its weight rounding causes (Nagel et al. 2019),
    measured with only that layer's weights quantized on the calibration samples."""
    sample = _sample(feeds)
    shifts = {}
    for node in layers:
        if node.op != "Conv" and node.op != "Gemm":
            continue
        out = node.outputs[0].name
        ref = ort.run(cal.with_outputs(graph, [out]), sample)[out]
        copy = graph.copy()
        target = next(n for n in copy.nodes if n.name == node.name)
        rw = Rewriter(copy)
        quantize_layer(rw, target, None, o.per_channel)
        rw.commit()
        got = ort.run(cal.with_outputs(copy, [out]), sample)[out]
        axes = tuple(i for i in range(ref.ndim) if i != 1)
        shifts[node.name] = (got - ref).mean(axis=axes).astype(np.float32)
    return shifts
