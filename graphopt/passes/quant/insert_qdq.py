"""quantize: post-training quantization in the QDQ format onnxruntime runs (Jacob et al. 2018).

Matches: Conv, Gemm and MatMul whose weight (input 1) is a floating-point constant, by include/exclude.
Rewrites: the weight to int8 or int4 behind DequantizeLinear, symmetric, per output channel, per
tensor or per group along K (weight_quant.py), rounded to nearest or by GPTQ from the calibration
data's input Hessians (gptq.py; the default with --data); with mode=static (the default at 8 bits)
also a 1-D bias to int32 at scale input x weight and a Q->DQ pair on each layer's input and output
(after a lone following Relu, which int8 runtimes fuse) and on pass-through ops (MaxPool, Relu,
Reshape, Flatten, Concat), which share their inputs' scale; activation ranges from calibration on
ctx.feeds (random inputs, with a warning, without); int8 symmetric or uint8 asymmetric. Graph
outputs stay float. mode=weight-only (the default at 4 bits) leaves activations float.
keep_float leaves the layers whose quantization costs most in float (sensitivity.py);
bias_correction folds weight rounding's mean output shift into the bias (Nagel et al. 2019).
Refuses: a weight shared or that is a graph output, a constant left operand, opsets below 13 (21
for int4 or groups: run through the manager, which upgrades), and every layer of a graph that
already holds DequantizeLinear (quantized, or fake-quant).
Guarantees: LOSSY(cosine >= 0.99) on the builders and the digits CNN (docs/passes/quantize.md).
Decisions: per layer, weight bits, rounding, weight SQNR and output SQNR against the float model,
keep_float's choice.
Verified by: tests/passes/quant/test_quantize.py, test_gptq.py, test_negative_activations.py.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import fidelity, ort
from graphopt.ir.data import input_specs, random_feeds
from graphopt.ir.errors import PipelineError
from graphopt.ir.graph import is_graph_output, np_dtype, opset, producer
from graphopt.ir.verify import TOPOSORTED
from graphopt.passes import activations
from graphopt.passes.base import (LOSSY, Layer, LayerOptions, LayerPass, PassContext, PassInfo, PassResult, Refused,
                                  option)
from graphopt.passes.quant import calibrate as cal
from graphopt.passes.quant import dynamic, equalize, smooth
from graphopt.passes.quant import sensitivity
from graphopt.passes.quant.qdq_layer import QParams, insert_pair, quantize_layer
from graphopt.passes.quant.shift_uint8 import u8s8_inexact
from graphopt.passes.quant.weight_quant import (BITS, SCALE_METHODS, Layout, QuantizedWeight, quantize_gptq,
                                                quantize_nearest, quantize_weight)
from graphopt.passes.weights import check_weight
from graphopt.pattern import Rewriter

__all__ = ["Options", "Quantize", "diagnose", "quantize_weight"]

QUANTIZED = ("Conv", "Gemm", "MatMul")
PASS_THROUGH = ("MaxPool", "Relu", "Reshape", "Flatten", "Concat")
ROUNDINGS = ("auto", "nearest", "gptq")
MODES = ("auto", "static", "weight-only", "dynamic")
# INT4 tensors and DequantizeLinear's block_size are opset 21.
BLOCKED_OPSET = 21


@dataclass(frozen=True)
class Options(LayerOptions):
    calibration: str = option("auto", f"activation range calibration: {', '.join(cal.METHODS)}; 'auto': mse "
                                      "(the clipping with least squared error) with --data, minmax without "
                                      "(random inputs say nothing about the tails)")
    percentile: float = option(99.99, "percentile of |x| that calibration=percentile keeps")
    activation_type: str = option("int8", "activations int8 (symmetric, zero point 0) or uint8 (asymmetric)")
    mode: str = option("auto", "'static': activations quantized too (calibrated Q->DQ pairs); 'weight-only': "
                               "activations stay float; 'dynamic': int8 weights, activations quantized at run "
                               "time (dynamic.py); 'auto': static at weight_bits=8 (dynamic with --data on a "
                               "transformer-like graph), weight-only at 4")
    per_channel: bool = option(True, "one weight scale per output channel; false: one per weight")
    weight_bits: int = option(8, "weight integers: 8 (int8) or 4 (ONNX INT4; the model is upgraded to opset 21)")
    reduce_range: bool | str = option("auto", "int8 weights next to uint8 activations (mode=dynamic, activation_type="
                                              "uint8) on 7 bits, [-64, 64], so that u8 x s8 kernels that add pairs of "
                                              "products in 16 bits cannot saturate (onnxruntime's reduce_range); "
                                              "'auto': where this host's onnxruntime does")
    group_size: int = option(0, "0: scales per output channel; N: one scale per N inputs along K (a Conv: N "
                                "input channels at each kernel position; opset 21's blocked DequantizeLinear)")
    scales: str = option("auto", "weight scales: 'minmax' (largest |w| / qmax) or 'mse' (the clipping with least "
                                 "squared rounding error, searched per scale); 'auto': minmax at 8 bits, mse at 4")
    rounding: str = option("auto", "weights to integers: 'nearest', or 'gptq' (Frantar et al. 2022: rounding "
                                   "error compensated through the calibration inputs' Hessian); 'auto': gptq with "
                                   "--data, nearest without")
    damping: float = option(0.01, "gptq: fraction of mean diag(H) added to the Hessian's diagonal")
    act_order: bool = option(True, "gptq: round the columns by descending diag(H) (act-order)")
    gptq_block: int = option(128, "gptq: columns per lazy batch update")
    bias_correction: bool = option(False, "fold the mean output shift that weight rounding causes into the bias")
    keep_float: int | str = option(0, "keep layers in float: N (the N whose quantization alone costs most); "
                                      "'auto' (the fewest, most costly first, with which the model's output "
                                      "cosine on calibration samples reaches target_cosine); 'outliers' (those "
                                      "10 dB below the median layer)")
    target_cosine: float = option(0.999, "keep_float=auto: the lowest output cosine to reach")
    batch_size: int = option(32, "samples per onnxruntime run during calibration")
    smooth: str = option("auto", "SmoothQuant for MatMul/Gemm inputs (smooth.py): 'on', 'off', 'auto' (with "
                                 "--data, the groups whose expected quantization error it lowers)")
    smooth_alpha: float = option(0.5, "SmoothQuant strength: s = max|x|^alpha / max|w|^(1 - alpha) per input channel")
    equalize: str = option("auto", "cross-layer equalization of Conv -> Conv pairs (equalize.py): 'on', 'off', "
                                   "'auto' (on with per_channel=false)")

    def __post_init__(self):
        def bad(name: str, why: str) -> PipelineError:
            return PipelineError(f"quantize: {name}={getattr(self, name)!r} {why}")
        choices = {"calibration": ("auto",) + cal.METHODS, "activation_type": ("int8", "uint8"), "mode": MODES,
                   "scales": ("auto",) + SCALE_METHODS, "rounding": ROUNDINGS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise bad(name, f"must be one of {', '.join(allowed)}")
        if self.weight_bits not in BITS:
            raise bad("weight_bits", "must be 8 or 4")
        if self.reduce_range not in (True, False, "auto"):
            raise bad("reduce_range", "must be true, false or auto")
        if self.group_size < 0:
            raise bad("group_size", "must be 0 (per channel) or a positive number of inputs per scale")
        if self.group_size and not self.per_channel:
            raise bad("group_size", "needs per_channel=true (groups split each output channel's scale)")
        if not self.damping > 0:
            raise bad("damping", "must be positive (a fraction of the Hessian's mean diagonal)")
        if self.gptq_block < 1:
            raise bad("gptq_block", "must be a positive number of columns")
        if not (isinstance(self.keep_float, int) and self.keep_float >= 0) \
                and self.keep_float not in ("auto", "outliers"):
            raise bad("keep_float", "must be a layer count, 'auto' or 'outliers'")
        if not 0 < self.target_cosine <= 1:
            raise bad("target_cosine", "must be in (0, 1]")
        if self.mode == "dynamic":
            dynamic.check_options(self)
        smooth.check_options(self.smooth, self.smooth_alpha)
        equalize.check_option(self.equalize)

    def weight_grid(self, uint8_activations: bool) -> int:
        """The bits of the weights' integer grid: weight_bits, or 7 where reduce_range applies."""
        if self.weight_bits != 8 or not uint8_activations or self.reduce_range is False:
            return self.weight_bits
        return 7 if self.reduce_range is True or u8s8_inexact() else 8

    def reduce_range_reason(self) -> str:
        """Why the weights are on 7 bits, for the pass's stats."""
        why = "reduce_range=true" if self.reduce_range is True else u8s8_inexact()
        return f"int8 weights on 7 bits ([-64, 64]) next to uint8 activations: {why}"

    @property
    def static(self) -> bool:
        return self.mode == "static" or (self.mode == "auto" and self.weight_bits == 8)

    @property
    def scale_method(self) -> str:
        return self.scales if self.scales != "auto" else ("minmax" if self.weight_bits == 8 else "mse")


@dataclass(frozen=True)
class LayerPlan:
    """One layer's weight as it will be stored, its input scale (None: its input stays float),
    the activations its rewrite puts a Q->DQ pair on, bias_correction's shift and the decision so far."""
    weight: QuantizedWeight
    input_scale: np.ndarray | None
    pairs: list[tuple[gs.Variable, QParams]]
    shift: np.ndarray | None
    choice: dict


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
        # 'auto' reaches here only outside the pass (diagnose's default options): no data to trust.
        lo, hi = stats[name].range("minmax" if o.calibration == "auto" else o.calibration, o.percentile, levels)
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


def layer_plans(graph: gs.Graph, nodes: list[gs.Node], params: dict[str, QParams], weights: dict[str, QuantizedWeight],
                shifts: dict[str, np.ndarray] | None = None, choices: dict[str, dict] | None = None) -> dict[str, LayerPlan]:
    """The plan of each of `nodes` when exactly these layers are quantized (activation pairs only
    when `params` has them: mode=static)."""
    owners = plan_activations(graph, nodes)[0] if params else {}
    tensors = graph.tensors()
    plans = {}
    for node in nodes:
        x = node.inputs[0].name
        pairs = [(tensors[name], params[name]) for name, owner in owners.items() if owner == node.name]
        plans[node.name] = LayerPlan(weights[node.name], params[x].scale if x in owners else None, pairs,
                                     (shifts or {}).get(node.name), (choices or {}).get(node.name, {}))
    return plans


def apply_plan(rw: Rewriter, node: gs.Node, plan: LayerPlan) -> dict:
    info = quantize_layer(rw, node, plan.weight, plan.input_scale, plan.shift)
    for tensor, p in plan.pairs:
        insert_pair(rw, tensor, p)
    return {**plan.choice, **info}


def quantized_copy(graph: gs.Graph, names: set[str], params: dict[str, QParams],
                   weights: dict[str, QuantizedWeight]) -> gs.Graph:
    """A copy of `graph` with the layers `names` quantized as the pass would."""
    copy = graph.copy()
    nodes = [n for n in copy.nodes if n.name in names]
    rw = Rewriter(copy)
    for name, plan in layer_plans(copy, nodes, params, weights).items():
        apply_plan(rw, next(n for n in nodes if n.name == name), plan)
    rw.commit()
    return copy


def check_unquantized(graph: gs.Graph, minimum_opset: int = 13) -> None:
    """Raises `Refused` when the layers of `graph` may not be quantized at all."""
    if any(n.op == "DequantizeLinear" for n in graph.nodes):
        # Already quantized (by this pass or by training): layers left in float stay there, so a
        # second run, or `keep_float`, never changes what the first one decided.
        raise Refused("graph already has DequantizeLinear (quantized or fake-quant): run fold-qdq, "
                      "or quantize the float model")
    if opset(graph) < minimum_opset:
        what = "per-axis" if minimum_opset == 13 else "int4 or blocked (group_size)"
        raise Refused(f"opset {opset(graph)} < {minimum_opset} has no {what} DequantizeLinear: upgrade the "
                      "model's opset (the pass manager does, when it runs the pass)")


def _has_weight(node: gs.Node) -> bool:
    """A constant operand, or a weight already behind DequantizeLinear (so that include/exclude
    name the same layers on a second run); not an activation x activation product."""
    wdq = producer(node.inputs[1]) if len(node.inputs) > 1 else None
    return len(node.inputs) > 1 and (any(isinstance(t, gs.Constant) for t in node.inputs[:2])
                                     or (wdq is not None and wdq.op == "DequantizeLinear"))


def _feeds(graph: gs.Graph, ctx: PassContext) -> dict[str, np.ndarray]:
    return ctx.feeds if ctx.feeds is not None else random_feeds(input_specs(graph), ctx.seed, batch=8)


class Quantize(LayerPass):
    """Post-training quantization (QDQ): int8 or int4 weights (nearest or GPTQ), calibrated activations."""

    name = "quantize"
    info = PassInfo(LOSSY("cosine", 0.99), opset=(13, PassInfo().opset[1]), requires=frozenset({TOPOSORTED}))
    Options = Options
    ops = QUANTIZED

    def __init__(self, **options):
        super().__init__(**options)
        if self.options.weight_bits == 4 or self.options.group_size:
            # The manager upgrades a model below a pass's minimum opset (verified EXACT), so
            # declaring opset 21 for these options is what makes int4 and blocks available.
            self.info = dataclasses.replace(type(self).info, opset=(BLOCKED_OPSET, type(self).info.opset[1]))

    def calibration(self, ctx: PassContext | None) -> str:
        """The activation calibration the options choose in this context ('auto' resolved): MSE
        clipping measured on mnist1d 97.0% vs minmax 96.6% (onnxsim 96.7%), equal on digits."""
        if self.options.calibration != "auto":
            return self.options.calibration
        return "mse" if ctx is not None and ctx.from_data else "minmax"

    def rounding(self, ctx: PassContext | None) -> str:
        """The rounding the options choose in this context ('auto' resolved)."""
        if self.options.rounding != "auto":
            return self.options.rounding
        return "gptq" if ctx is not None and ctx.from_data else "nearest"

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
        """Calibrate every layer's activations at once, quantize every weight, then choose which
        layers stay float."""
        o = self.options
        rounding = self.rounding(ctx)
        result.stats.update(mode="static" if o.static else "weight-only", weight_bits=o.weight_bits,
                            rounding=rounding)
        if o.static:
            o = dataclasses.replace(o, calibration=self.calibration(ctx))
            result.stats.update(calibration=o.calibration, activation_type=o.activation_type)
        try:
            check_unquantized(graph, self.info.opset[0])
        except Refused as e:
            for layer in layers:
                result.refuse(layer.name, e.reason)
            return []
        if not layers:
            return []
        if not ctx.from_data:
            result.stats["warning"] = ("no calibration data (--data): calibrated on random inputs, so activation "
                                       "ranges may not match real data; give --data FILE")
        feeds, nodes = _feeds(graph, ctx), [layer.node for layer in layers]
        report = (lambda done, total: ctx.progress("calibration", done, total)) if ctx.progress else None
        params = calibrated(graph, nodes, feeds, o, report) if o.static else {}
        result.stats["activations_quantized"] = len(params)
        bits = o.weight_grid(uint8_activations=o.static and o.activation_type == "uint8")
        if bits != o.weight_bits:
            result.stats["reduce_range"] = o.reduce_range_reason()
        weights, how = self.weights(graph, nodes, feeds, rounding, ctx, bits)
        choices = self._choose_float(graph, nodes, params, weights, feeds)
        for name, rounded in how.items():
            choices.setdefault(name, {})["rounding"] = rounded
        result.decisions.update({name: c for name, c in choices.items() if c.get("chosen") == "float"})
        chosen = [layer.node for layer in layers if choices[layer.name].get("chosen") != "float"]
        shifts = sensitivity.bias_shifts(graph, chosen, weights, feeds) if o.bias_correction else {}
        plans = layer_plans(graph, chosen, params, weights, shifts, choices)
        return [(layer, plans[layer.name]) for layer in layers if layer.name in plans]

    def weights(self, graph: gs.Graph, nodes: list[gs.Node], feeds: dict[str, np.ndarray], rounding: str,
                ctx: PassContext | None = None, bits: int | None = None
                ) -> tuple[dict[str, QuantizedWeight], dict[str, str]]:
        """Every layer's weight as it will be stored, on a grid of `bits` (default weight_bits), and
        how it was rounded (GPTQ where the row view covers the layer, from one streamed pass over
        `feeds`; nearest elsewhere, and why)."""
        o = self.options
        bits = bits or o.weight_bits
        layouts = {n.name: Layout.of(n, o.per_channel, o.group_size) for n in nodes}
        why = {n.name: activations.supported(n) if rounding == "gptq" else "" for n in nodes}
        fit = [n for n in nodes if why[n.name] is None]
        stats = {}
        if fit:
            progress = ctx.progress if ctx is not None else None
            report = (lambda done, total: progress("gptq statistics", done, total)) if progress else None
            stats = activations.statistics(graph, fit, feeds, o.batch_size, progress=report)
        weights, how = {}, {}
        for n in nodes:
            s = stats.get(n.name)
            if s is None:
                weights[n.name] = quantize_nearest(n.inputs[1].values.astype(np.float32), layouts[n.name],
                                                   bits, o.scale_method)
                how[n.name] = f"nearest (gptq: {why[n.name]})" if why[n.name] else "nearest"
            else:
                weights[n.name] = quantize_gptq(n, layouts[n.name], bits, o.scale_method, s.hessian,
                                                s.rows_seen, o.damping, o.gptq_block, o.act_order)
                how[n.name] = "gptq"
        return weights, how

    def _choose_float(self, graph: gs.Graph, layers: list[gs.Node], params: dict[str, QParams],
                      weights: dict[str, QuantizedWeight], feeds: dict[str, np.ndarray]) -> dict[str, dict]:
        """keep_float's choice per layer (quantized or "float", and why); empty dicts when not asked."""
        o = self.options
        if o.keep_float == 0:
            return {n.name: {} for n in layers}
        ranking = sensitivity.layer_sensitivity(graph, layers, params, weights, feeds)
        names = {n.name for n in layers}

        def cosine_keeping(kept: set[str]) -> float:
            return sensitivity.lowest_cosine(graph, quantized_copy(graph, names - kept, params, weights), feeds)
        return sensitivity.keep_float(o.keep_float, ranking, o.target_cosine, cosine_keeping, f"int{o.weight_bits}")

    def rewrite(self, rw: Rewriter, layer: Layer, plan: LayerPlan) -> dict:
        return apply_plan(rw, layer.node, plan)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        # Exact in float, so the float reference below stays the model's own.
        rescaled = {**equalize.before_quantize(self, graph, ctx), **smooth.before_quantize(self, graph, ctx)}
        float_graph = graph.copy()
        result = dynamic.run(self, graph, ctx) if dynamic.chosen(self.options, graph, ctx) else super().run(graph, ctx)
        result.stats.update(rescaled)
        if result.modified:
            layer_errors(float_graph, graph, result.decisions, _feeds(float_graph, ctx))
        return result


def layer_errors(float_graph: gs.Graph, graph: gs.Graph, decisions: dict[str, dict],
                 feeds: dict[str, np.ndarray]) -> None:
    """Add each layer's output SQNR (quantized model vs float model) to its decision."""
    outputs = {n.name: n.outputs[0].name for n in float_graph.nodes if n.name in decisions}
    sample = sensitivity.sample(float_graph, feeds)
    ref = ort.run(cal.with_outputs(float_graph, list(outputs.values())), sample)
    got = ort.run(cal.with_outputs(graph, list(outputs.values())), sample)
    for name, out in outputs.items():
        decisions[name]["output_sqnr_db"] = round(float(fidelity.measure(ref[out], got[out]).sqnr_db), 2)


def diagnose(graph: gs.Graph, feeds: dict[str, np.ndarray], options: Options | None = None,
             progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Per quantizable layer, worst first: the model's lowest output SQNR (dB) when only that
    layer (weights as the options round them, and input activation) is quantized, calibrated on
    `feeds` (the user's data: rounding='auto' is GPTQ)."""
    o = options or Options()
    pass_ = Quantize(**vars(o))
    layers = [layer.node for layer in pass_.select(graph, PassResult(False))]
    params = calibrated(graph, layers, feeds, o, progress) if o.static else {}
    ctx = PassContext(feeds=feeds, from_data=True)
    weights, _ = pass_.weights(graph, layers, feeds, pass_.rounding(ctx), ctx)
    ranking = sensitivity.layer_sensitivity(graph, layers, params, weights, feeds)
    return dict(sorted(ranking.items(), key=lambda kv: kv[1]))
