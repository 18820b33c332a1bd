"""quantize: post-training int8 quantization, in the QDQ format onnxruntime runs (Jacob et al. 2018).

Matches: Conv, Gemm and MatMul whose weight (input 1) is a floating-point constant, by include/exclude.
Rewrites: the weight to int8 behind DequantizeLinear, symmetric, per output channel or per tensor;
a 1-D bias to int32 at scale input x weight; a Q->DQ pair on each layer's input and output (after
a lone following Relu, which int8 runtimes fuse) and on pass-through ops (MaxPool, Relu, Reshape,
Flatten, Concat), which share their inputs' scale. Activation ranges come from calibration on
ctx.feeds (random inputs, with a warning, without); int8 symmetric or uint8 asymmetric. Graph outputs
stay float. keep_float keeps the layers whose quantization alone costs most in float;
bias_correction folds weight rounding's mean output shift into the bias (Nagel et al. 2019).
Refuses: a weight shared or that is a graph output, a constant left operand, opsets below 13, and
every layer of a graph that already holds DequantizeLinear (quantized, or fake-quant).
Guarantees: LOSSY(cosine >= 0.99) on the builders and the digits CNN (docs/passes/quantize.md).
Decisions: per layer, weight SQNR and output SQNR against the float model, keep_float's choice.
Verified by: tests/passes/quant/test_quantize.py, tests/passes/quant/test_negative_activations.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import fidelity, ort
from graphopt.ir.data import Batching, input_specs, random_feeds
from graphopt.ir.errors import PipelineError
from graphopt.ir.graph import attr, is_graph_output, np_dtype, opset, producer
from graphopt.ir.verify import TOPOSORTED
from graphopt.passes.base import (LOSSY, Layer, LayerOptions, LayerPass, PassContext, PassInfo, PassResult, Refused,
                                  option)
from graphopt.passes.quant import calibrate as cal
from graphopt.passes.weights import check_weight
from graphopt.pattern import Rewriter

QUANTIZED = ("Conv", "Gemm", "MatMul")
PASS_THROUGH = ("MaxPool", "Relu", "Reshape", "Flatten", "Concat")
ERROR_SAMPLES = 64


@dataclass(frozen=True)
class Options(LayerOptions):
    calibration: str = option("minmax", f"activation range calibration: {', '.join(cal.METHODS)}")
    percentile: float = option(99.99, "percentile of |x| that calibration=percentile keeps")
    activation_type: str = option("int8", "activations int8 (symmetric, zero point 0) or uint8 (asymmetric)")
    per_channel: bool = option(True, "one weight scale per output channel; false: one per weight")
    bias_correction: bool = option(False, "fold the mean output shift that weight rounding causes into the bias")
    keep_float: int | str = option(0, "keep in float the N layers whose quantization alone costs most "
                                      "(output SQNR); 'auto': those 10 dB below the median layer")
    batch_size: int = option(32, "samples per onnxruntime run during calibration")

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


@dataclass(frozen=True)
class LayerPlan:
    """One layer's input scale (None: its input stays float), the activations its rewrite puts a
    Q->DQ pair on, bias_correction's shift and keep_float's choice."""
    input_scale: np.ndarray | None
    pairs: list[tuple[gs.Variable, QParams]]
    shift: np.ndarray | None
    choice: dict


def weight_axis(node: gs.Node) -> int:
    """The output-channel axis of the node's weight (input 1): 0 for Conv and transB Gemm, else the last."""
    return 0 if node.op == "Conv" or (node.op == "Gemm" and attr(node, "transB", 0)) else len(node.inputs[1].shape) - 1


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


def plan_activations(graph: gs.Graph, layers: list[gs.Node]) -> tuple[dict[str, str], _Groups]:
    """The activation tensors that get a Q->DQ pair, in graph order, each with the layer whose
    rewrite inserts it (a pass-through op's output goes with its input), and their scale groups."""
    owners: dict[str, str] = {}

    def add(t: gs.Tensor, layer: str) -> bool:
        ok = isinstance(t, gs.Variable) and not is_graph_output(graph, t) and t.dtype in (None, np.float32)
        if ok:
            owners.setdefault(t.name, layer)
        return ok

    for node in layers:
        add(node.inputs[0], node.name)
        out = node.outputs[0]
        readers = list(out.outputs)
        if len(readers) == 1 and readers[0].op == "Relu" and not is_graph_output(graph, out):
            add(readers[0].outputs[0], node.name)
        else:
            add(out, node.name)
    groups = _Groups()
    for node in graph.nodes:
        data = node.inputs if node.op == "Concat" else node.inputs[:1]
        if node.op in PASS_THROUGH and data and all(t.name in owners for t in data) \
                and add(node.outputs[0], owners[data[0].name]):
            for t in data:
                groups.union(t.name, node.outputs[0].name)
    return owners, groups


def calibrated(graph: gs.Graph, layers: list[gs.Node], feeds: dict[str, np.ndarray], o: Options,
               progress: Callable[[int, int], None] | None = None) -> dict[str, QParams]:
    """The parameters of every activation that quantizing `layers` would put a pair on."""
    owners, groups = plan_activations(graph, layers)
    names = list(owners)
    return activation_params(cal.calibrate(graph, names, feeds, o.batch_size, progress), names, groups, o)


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
    info = {"op": node.op, "weight_sqnr_db": round(float(fidelity.measure(w, wq).sqnr_db), 2)}
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


def check_unquantized(graph: gs.Graph) -> None:
    """Raises `Refused` when the layers of `graph` may not be quantized at all."""
    if any(n.op == "DequantizeLinear" for n in graph.nodes):
        # Already quantized (by this pass or by training): layers left in float stay there, so a
        # second run, or `keep_float`, never changes what the first one decided.
        raise Refused("graph already has DequantizeLinear (quantized or fake-quant): run fold-qdq, "
                      "or quantize the float model")
    if opset(graph) < 13:
        raise Refused(f"opset {opset(graph)} < 13 has no per-axis DequantizeLinear: upgrade the model's opset")


def _has_weight(node: gs.Node) -> bool:
    """A constant operand, or a weight already behind DequantizeLinear (so that include/exclude
    name the same layers on a second run); not an activation x activation product."""
    wdq = producer(node.inputs[1]) if len(node.inputs) > 1 else None
    return len(node.inputs) > 1 and (any(isinstance(t, gs.Constant) for t in node.inputs[:2])
                                     or (wdq is not None and wdq.op == "DequantizeLinear"))


def _feeds(graph: gs.Graph, ctx: PassContext) -> dict[str, np.ndarray]:
    return ctx.feeds if ctx.feeds is not None else random_feeds(input_specs(graph), ctx.seed, batch=8)


class Quantize(LayerPass):
    """Post-training int8 quantization (QDQ): per-channel int8 weights, calibrated activations."""

    name = "quantize"
    info = PassInfo(LOSSY("cosine", 0.99), opset=(13, PassInfo().opset[1]), requires=frozenset({TOPOSORTED}))
    Options = Options
    ops = QUANTIZED

    def candidates(self, graph: gs.Graph) -> list[gs.Node]:
        return [n for n in super().candidates(graph) if _has_weight(n)]

    def examine(self, node: gs.Node, graph: gs.Graph) -> gs.Node | None:
        if not isinstance(node.inputs[1], gs.Constant):
            if isinstance(node.inputs[0], gs.Constant):
                raise Refused("constant left operand (only input 1 is quantized as a weight)")
            return None  # quantized already: its weight is behind DequantizeLinear
        weight = check_weight(graph, node.inputs[1], "quantize")
        if np_dtype(weight.dtype) != np.float32:
            # QDQ scales are float32 here, and DequantizeLinear's output takes the scale's type.
            raise Refused(f"weight '{weight.name}' is {np_dtype(weight.dtype).name}: quantize takes float32 "
                          "layers (export the model in float32)")
        return node

    def plan(self, layers: list[Layer], graph: gs.Graph, ctx: PassContext,
             result: PassResult) -> list[tuple[Layer, LayerPlan]]:
        """Calibrate every layer's activations at once, then choose which layers stay float."""
        o = self.options
        result.stats.update(calibration=o.calibration, activation_type=o.activation_type)
        try:
            check_unquantized(graph)
        except Refused as e:
            for layer in layers:
                result.refuse(layer.name, e.reason)
            return []
        if not layers:
            return []
        if ctx.feeds is None:
            result.stats["warning"] = "no calibration data (--data): calibrated on random inputs; ranges may be wrong"
        feeds, nodes = _feeds(graph, ctx), [layer.node for layer in layers]
        report = (lambda done, total: ctx.progress("calibration", done, total)) if ctx.progress else None
        params = calibrated(graph, nodes, feeds, o, report)
        result.stats["activations_quantized"] = len(params)
        choices = self._choose_float(graph, nodes, params, feeds)
        result.decisions.update({name: c for name, c in choices.items() if c["chosen"] == "float"})
        chosen = [layer for layer in layers if choices.get(layer.name, {}).get("chosen") != "float"]
        shifts = bias_shifts(graph, [layer.node for layer in chosen], feeds, o.per_channel) \
            if o.bias_correction else {}
        owners, _ = plan_activations(graph, [layer.node for layer in chosen])
        tensors = graph.tensors()

        def layer_plan(layer: Layer) -> LayerPlan:
            x = layer.node.inputs[0].name
            pairs = [(tensors[name], params[name]) for name, owner in owners.items() if owner == layer.name]
            return LayerPlan(params[x].scale if x in owners else None, pairs, shifts.get(layer.name),
                             choices.get(layer.name, {}))
        return [(layer, layer_plan(layer)) for layer in chosen]

    def _choose_float(self, graph: gs.Graph, layers: list[gs.Node], params: dict[str, QParams],
                      feeds: dict[str, np.ndarray]) -> dict[str, dict]:
        """keep_float's choice per layer ("int8" or "float", and why); empty when not asked."""
        k = self.options.keep_float
        if k == 0:
            return {}
        ranking = layer_sensitivity(graph, layers, params, self.options.per_channel, feeds)
        worst = sorted(ranking, key=ranking.get)
        if k == "auto":
            limit = float(np.median(list(ranking.values()))) - 10.0
            kept, rule = {name for name in worst if ranking[name] < limit}, f"float below {limit:.2f} dB"
        else:
            kept, rule = set(worst[:k]), f"the {k} lowest stay float"
        return {name: {"chosen": "float" if name in kept else "int8", "sensitivity_sqnr_db": sqnr,
                       "reason": f"model SQNR {sqnr} dB with only this layer quantized; {rule}"}
                for name, sqnr in ranking.items()}

    def rewrite(self, rw: Rewriter, layer: Layer, plan: LayerPlan) -> dict:
        info = quantize_layer(rw, layer.node, plan.input_scale, self.options.per_channel, plan.shift)
        for tensor, p in plan.pairs:
            insert_pair(rw, tensor, p)
        return {**plan.choice, **info}

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        float_graph = graph.copy()
        result = super().run(graph, ctx)
        if result.modified:
            layer_errors(float_graph, graph, result.decisions, _feeds(float_graph, ctx))
        return result


def _sample(graph: gs.Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The first ERROR_SAMPLES samples, along the batch axis of the inputs that have one."""
    return Batching.of(input_specs(graph), feeds).first(feeds, ERROR_SAMPLES)


def layer_errors(float_graph: gs.Graph, graph: gs.Graph, decisions: dict[str, dict],
                 feeds: dict[str, np.ndarray]) -> None:
    """Add each layer's output SQNR (quantized model vs float model) to its decision."""
    outputs = {n.name: n.outputs[0].name for n in float_graph.nodes if n.name in decisions}
    sample = _sample(float_graph, feeds)
    ref = ort.run(cal.with_outputs(float_graph, list(outputs.values())), sample)
    got = ort.run(cal.with_outputs(graph, list(outputs.values())), sample)
    for name, out in outputs.items():
        decisions[name]["output_sqnr_db"] = round(float(fidelity.measure(ref[out], got[out]).sqnr_db), 2)


def diagnose(graph: gs.Graph, feeds: dict[str, np.ndarray], options: Options | None = None,
             progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Per quantizable layer, worst first: the model's lowest output SQNR (dB) when only that
    layer (weights and input activation) is quantized, calibrated on `feeds`."""
    o = options or Options()
    layers = [layer.node for layer in Quantize(**vars(o)).select(graph, PassResult(False))]
    params = calibrated(graph, layers, feeds, o, progress)
    ranking = layer_sensitivity(graph, layers, params, o.per_channel, feeds)
    return dict(sorted(ranking.items(), key=lambda kv: kv[1]))


def layer_sensitivity(graph: gs.Graph, layers: list[gs.Node], params: dict[str, QParams], per_channel: bool,
                      feeds: dict[str, np.ndarray]) -> dict[str, float]:
    """Lowest output SQNR (dB) of the model with only one layer (weights and input) quantized, per layer."""
    sample = _sample(graph, feeds)
    reference = ort.run(graph, sample)
    ranking = {}
    for node in layers:
        copy = graph.copy()
        target = next(n for n in copy.nodes if n.name == node.name)
        x = target.inputs[0].name
        apply_one(copy, target, {x: params[x]} if x in params else {}, per_channel)
        measured = fidelity.compare(reference, ort.run(copy, sample))
        ranking[node.name] = round(float(min(m.sqnr_db for m in measured.values())), 2)
    return ranking


def apply_one(graph: gs.Graph, node: gs.Node, params: dict[str, QParams], per_channel: bool) -> None:
    rw = Rewriter(graph)
    x = node.inputs[0]
    quantize_layer(rw, node, params[x.name].scale if x.name in params else None, per_channel)
    if x.name in params:
        insert_pair(rw, x, params[x.name])
    rw.commit()


def bias_shifts(graph: gs.Graph, layers: list[gs.Node], feeds: dict[str, np.ndarray],
                per_channel: bool) -> dict[str, np.ndarray]:
    """Per layer, the mean per-channel output shift its weight rounding causes (Nagel et al. 2019),
    measured with only that layer's weights quantized on the calibration samples."""
    sample = _sample(graph, feeds)
    shifts = {}
    for node in [n for n in layers if n.op in ("Conv", "Gemm")]:
        out = node.outputs[0].name
        ref = ort.run(cal.with_outputs(graph, [out]), sample)[out]
        copy = graph.copy()
        apply_one(copy, next(n for n in copy.nodes if n.name == node.name), {}, per_channel)
        got = ort.run(cal.with_outputs(copy, [out]), sample)[out]
        axes = tuple(i for i in range(ref.ndim) if i != 1)
        shifts[node.name] = (got - ref).mean(axis=axes).astype(np.float32)
    return shifts
