"""SmoothQuant (Xiao et al. 2023) before `quantize`: move activation outliers into the weights.

Matches: groups of MatMul / Gemm layers (constant 2-D weight, not shared; Gemm without transA) that
read one activation X, directly or through Reshapes that keep its last axis, the axis they contract.
Rewrites, per input channel j of a group (an EXACT rewrite in float):

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)      (max|W_j| over every output of every layer)
    W[j, :] *= s_j,   X_j /= s_j

X / s is folded into X's producer when the chain above X can absorb a per-channel scale exactly:
LayerNormalization (gamma and beta), a MatMul / Gemm with a constant weight (its output columns and
bias), through Relu (positive scales commute with it), an Add of a constant bias, a Mul by a
constant and Reshapes that keep the last axis, every tensor on the way read by the chain alone.
Otherwise (a post-LN encoder's X also feeds the residual Add) a Mul(X, 1/s) is inserted on the
group's branch, which costs one elementwise pass over X at run time.

Statistics: per-channel min, max and mean square of X over the calibration data
(calibrate.channel_statistics: one streamed onnxruntime pass for all groups).
smooth=auto selects a group when the expected output error of quantizing it (the activation step
from the range of X/s, the weight steps from W·s, uniform rounding noise through the layers:
`expected_error`) falls by at least FOLD_GAIN (folded) or INSERT_GAIN (an inserted Mul), then keeps
the selection only if the quantized model's output SQNR on the first calibration samples gains
MARGIN_DB from it (the estimate ignores how errors add up through the model); on: every group that
can be smoothed; off: none. Without data (random inputs) auto is off.
Verified by: tests/passes/quant/test_smooth.py (exact in float, outliers, against onnxruntime).
"""
from __future__ import annotations

from collections.abc import Callable
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir.data import MIN_SPLIT, hold_aside, input_specs, random_feeds
from graphopt.ir.errors import PipelineError
from graphopt.ir.graph import attr, is_graph_output, producer
from graphopt.passes.base import PassContext, PassResult
from graphopt.passes.quant import dynamic
from graphopt.passes.quant.calibrate import ChannelStats, channel_statistics
from graphopt.passes.quant.equalize import MARGIN_DB, quantized_sqnr
from graphopt.pattern import Rewriter

if TYPE_CHECKING:
    from graphopt.passes.quant.insert_qdq import Quantize

SETTINGS = ("off", "on", "auto")
# smooth=auto: the fraction of the expected quantization error a group's smoothing must remove,
# when it is free (folded into the producer) and when it costs an inserted Mul, which took 6% of
# onnxruntime's time on torch-bert-ner; run-time (dynamic) activation ranges gained less from it
# there than static ones, so an inserted Mul must remove more (docs/passes/quantize.md).
FOLD_GAIN = 0.1
INSERT_GAIN = {"int8": 0.3, "uint8": 0.3, "dynamic": 0.5}
SCALE_RANGE = (1e-4, 1e4)


def check_options(setting: str, alpha: float) -> None:
    if setting not in SETTINGS:
        raise PipelineError(f"quantize: smooth={setting!r} must be one of {', '.join(SETTINGS)}")
    if not 0 <= alpha <= 1:
        raise PipelineError(f"quantize: smooth_alpha={alpha!r} must be in [0, 1]")


@dataclass
class Group:
    """Layers that read one activation `x` (through last-axis-keeping Reshapes), and where 1/s goes:
    `absorbers` (constants to divide, each with the axis of its channels) or, when empty, a Mul."""
    x: gs.Variable
    layers: list[gs.Node]
    entries: list[gs.Node]  # the readers of x on the way to the layers (the layers, or Reshapes)
    absorbers: list[tuple[gs.Constant, int]]
    why_not_folded: str = ""


def weight_rows(node: gs.Node) -> np.ndarray:
    """The weight as [K, N]: input channels on the rows."""
    w = node.inputs[1].values
    return w.T if node.op == "Gemm" and attr(node, "transB", 0) else w


def _reads(node: gs.Node) -> gs.Tensor:
    """The activation the layer contracts along its last axis, above last-axis-keeping Reshapes."""
    x = node.inputs[0]
    while (p := producer(x)) is not None and p.op == "Reshape" and _keeps_last_axis(p) and len(x.outputs) == 1:
        x = p.inputs[0]
    return x


def _keeps_last_axis(node: gs.Node) -> bool:
    a, b = node.inputs[0].shape, node.outputs[0].shape
    return bool(a) and bool(b) and isinstance(a[-1], int) and a[-1] == b[-1]


def groups(graph: gs.Graph, layers: list[gs.Node]) -> tuple[list[Group], dict[str, str]]:
    """The smoothable groups among `layers`, and why each other layer is not in one."""
    why: dict[str, str] = {}
    by_x: dict[str, list[gs.Node]] = {}
    for node in layers:
        reason = _unsmoothable(graph, node)
        if reason:
            why[node.name] = reason
        else:
            by_x.setdefault(_reads(node).name, []).append(node)
    tensors = graph.tensors()
    found = []
    for name, members in by_x.items():
        x = tensors[name]
        readers = {id(n) for n in members}
        entries = [n for n in x.outputs if id(n) in readers or _reshape_to(n, readers)]
        # Shape reads no values, so a scaled X leaves it as it was.
        others = [n for n in x.outputs if n not in entries and n.op != "Shape"]
        absorbers, reason = ([], f"'{x.name}' is also read by {others[0].op} '{others[0].name}'") if others \
            else _absorbers(graph, x, weight_rows(members[0]).shape[0])
        found.append(Group(x, members, entries, absorbers, reason))
    return found, why


def _reshape_to(node: gs.Node, readers: set[int]) -> bool:
    """A Reshape chain from the group's X that only group layers read."""
    if node.op != "Reshape" or not _keeps_last_axis(node):
        return False
    return all(id(n) in readers or _reshape_to(n, readers) for n in node.outputs[0].outputs)


def _unsmoothable(graph: gs.Graph, node: gs.Node) -> str:
    w = node.inputs[1]
    if node.op not in ("MatMul", "Gemm") or not isinstance(w, gs.Constant) or w.values.ndim != 2:
        return "not a MatMul / Gemm with a constant 2-D weight"
    if node.op == "Gemm" and attr(node, "transA", 0):
        return "Gemm with transA"
    if len(w.outputs) != 1 or is_graph_output(graph, w):
        return f"weight '{w.name}' is shared"
    if isinstance(node.inputs[0], gs.Constant):
        return "constant input"
    return ""


def _absorbers(graph: gs.Graph, x: gs.Tensor, channels: int) -> tuple[list[tuple[gs.Constant, int]], str]:
    """Constants (with their channel axis) whose division by s divides `x`'s `channels` (its last
    axis) by s exactly, or ([], why)."""
    found: list[tuple[gs.Constant, int]] = []
    t = x
    while True:
        node = producer(t)
        if node is None or is_graph_output(graph, t):
            return [], f"'{t.name}' is a graph input or output"
        if t is not x and len(t.outputs) != 1:
            return [], f"'{t.name}' on the way to '{x.name}' has other readers"
        if node.op == "LayerNormalization":
            scale = [c for c in node.inputs[1:3] if not c.is_empty()]
            rank = len(node.inputs[0].shape) if node.inputs[0].shape else None
            if attr(node, "axis", -1) not in (-1, rank - 1 if rank else -1) \
                    or not all(isinstance(c, gs.Constant) and c.values.ndim == 1 and len(c.outputs) == 1
                               for c in scale):
                return [], f"LayerNormalization '{node.name}' is not over the last axis with its own constants"
            return found + [(c, 0) for c in scale], ""
        if node.op in ("MatMul", "Gemm") and _unsmoothable(graph, node) == "":
            bias = node.inputs[2] if node.op == "Gemm" and len(node.inputs) > 2 else None
            if bias is not None and not (isinstance(bias, gs.Constant) and len(bias.outputs) == 1):
                return [], f"Gemm '{node.name}' has a shared or computed bias"
            axis = 0 if node.op == "Gemm" and attr(node, "transB", 0) else 1
            return found + [(node.inputs[1], axis)] + ([(bias, -1)] if bias is not None else []), ""
        if node.op in ("Add", "Mul") and sum(isinstance(i, gs.Constant) for i in node.inputs) == 1:
            c = next(i for i in node.inputs if isinstance(i, gs.Constant))
            if len(c.outputs) != 1 or c.values.ndim == 0 or c.values.shape[-1] not in (1, channels):
                return [], f"{node.op} '{node.name}' has a shared, scalar or not per-channel constant"
            found.append((c, -1))
            if node.op == "Mul":
                return found, ""
            t = next(i for i in node.inputs if not isinstance(i, gs.Constant))
        elif node.op == "Relu" or (node.op == "Reshape" and _keeps_last_axis(node)):
            t = node.inputs[0]
        else:
            return [], f"{node.op} '{node.name}' cannot absorb a per-channel scale"


def smoothing_scales(stats: ChannelStats, group: Group, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), 1 where either side is zero."""
    xmax = stats.absmax
    wmax = np.max([np.abs(weight_rows(n)).max(axis=1) for n in group.layers], axis=0)
    s = np.ones_like(xmax)
    ok = (xmax > 0) & (wmax > 0)
    s[ok] = xmax[ok] ** alpha / wmax[ok] ** (1 - alpha)
    return np.clip(s, *SCALE_RANGE)


def expected_error(stats: ChannelStats, layers: list[gs.Node], s: np.ndarray, activation: str,
                   per_channel: bool) -> float:
    """Expected squared output error of quantizing X/s (per tensor: 'int8' symmetric; 'uint8' and
    'dynamic' over its range) and the weights W·s (int8, per output channel or per tensor), summed over the
    layers: rounding noise of step d has variance d²/12 and passes through the other operand."""
    lo, hi = min(float((stats.lo / s).min()), 0.0), max(float((stats.hi / s).max()), 0.0)
    dx = max(-lo, hi) / 127 if activation == "int8" else (hi - lo) / 255
    power = float((stats.mean_square / s**2).sum())
    total = 0.0
    for node in layers:
        w = weight_rows(node) * s[:, None]
        dw = np.abs(w).max(axis=0) / 127 if per_channel else np.full(w.shape[1], np.abs(w).max() / 127)
        total += dx**2 / 12 * float((w * w).sum()) + float((dw**2).sum()) / 12 * power
    return total


def smooth(graph: gs.Graph, layers: list[gs.Node], feeds: dict[str, np.ndarray], setting: str, alpha: float,
           activation: str, per_channel: bool, batch_size: int = 32,
           progress: Callable[[int, int], None] | None = None) -> dict:
    """Smooth the groups among `layers` that `setting` chooses; returns the stats (per group:
    the layers, how 1/s was applied, the expected error before and after, or why not)."""
    found, why = groups(graph, layers)
    stats = channel_statistics(graph, {g.x.name: -1 for g in found}, feeds, batch_size, progress)
    rw = Rewriter(graph)
    report = {}
    for g in found:
        s = smoothing_scales(stats[g.x.name], g, alpha)
        before = expected_error(stats[g.x.name], g.layers, np.ones_like(s), activation, per_channel)
        after = expected_error(stats[g.x.name], g.layers, s, activation, per_channel)
        gain = 1 - after / before if before > 0 else 0.0
        needed = FOLD_GAIN if g.absorbers else INSERT_GAIN[activation]
        chosen = setting == "on" or gain >= needed
        report[g.x.name] = {"layers": [n.name for n in g.layers], "expected_error_gain": round(gain, 3),
                            "smoothed": chosen, "applied": "folded into the producer" if g.absorbers
                            else f"inserted Mul ({g.why_not_folded})",
                            "outlier_ratio": round(float(stats[g.x.name].absmax.max()
                                                         / max(np.median(stats[g.x.name].absmax), 1e-12)), 2)}
        if chosen:
            apply_scales(rw, g, s)
    if rw.changes:
        rw.commit()
    return {"groups": report, **({"not_smoothable": why} if why else {})}


def apply_scales(rw: Rewriter, g: Group, s: np.ndarray) -> None:
    """W[j] *= s_j in every layer; X_j /= s_j in the absorbing constants or by an inserted Mul."""
    for node in g.layers:
        w = node.inputs[1].values
        axis = 1 if node.op == "Gemm" and attr(node, "transB", 0) else 0
        rw.set_values(node.inputs[1], (w * _along(s, axis, w.ndim)).astype(w.dtype))
    inverse = (1.0 / s).astype(np.float32)
    if not g.absorbers:
        y = rw.variable(g.x.name + "_smoothed", dtype=g.x.dtype, shape=g.x.shape)
        rw.add_node("Mul", [g.x, rw.constant(g.x.name + "_smooth_scale", inverse)], [y], name=g.x.name + "_smooth")
        for node in g.entries:
            for i, t in enumerate(node.inputs):
                if t is g.x:
                    rw.set_input(node, i, y)
        return
    for c, axis in g.absorbers:
        v = c.values
        full = np.broadcast_to(v, v.shape[:-1] + (len(s),)) if axis == -1 and (v.ndim == 0 or v.shape[-1] == 1) else v
        rw.set_values(c, (full * _along(inverse, axis, full.ndim)).astype(v.dtype))


def _along(s: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return s.reshape(shape)


def before_quantize(pass_: Quantize, graph: gs.Graph, ctx: PassContext) -> dict:
    """quantize's smoothing step: the stats to report under "smooth" (empty when it did nothing).
    smooth=auto applies the groups `expected_error` selects only when the quantized model gains
    MARGIN_DB of output SQNR from them on calibration samples the smoothing scales were not
    computed from: per-channel maxima of a few samples are noise, and smoothing by them wins on
    those samples and loses on others (measured: 9 random 1024-wide MatMul+Relu layers, 4
    calibration samples: cosine 0.9996 on them, 0.959 held aside; 0.9987 unsmoothed)."""
    o = pass_.options
    setting = o.smooth if o.smooth != "auto" or ctx.from_data else "off"
    if setting == "off" or any(n.op in dynamic.QUANTIZED_OPS for n in graph.nodes):
        return {}
    run_time = dynamic.chosen(o, graph, ctx)
    if not run_time and not o.static:
        return {"smooth": "off: activations stay float (mode=weight-only), there is nothing to smooth for"}
    layers = [layer.node for layer in pass_.select(graph, PassResult(False))]
    feeds = ctx.feeds if ctx.feeds is not None else random_feeds(input_specs(graph), ctx.seed, batch=8)
    progress = (lambda done, total: ctx.progress("smoothing statistics", done, total)) if ctx.progress else None
    args = (feeds, setting, o.smooth_alpha, "dynamic" if run_time else o.activation_type, o.per_channel, o.batch_size,
            progress)
    if setting == "on":
        return {"smooth": smooth(graph, layers, *args)}
    split = hold_aside(feeds, input_specs(graph), None, ctx.seed)
    if split.shared:
        return {"smooth": f"off: {split.calibration_samples} calibration sample(s) are too few to check smoothing "
                          f"on samples it was not fit on (auto needs {MIN_SPLIT}; smooth=on forces it)"}
    candidate = graph.copy()
    names = {n.name for n in layers}
    report = smooth(candidate, [n for n in candidate.nodes if n.name in names], split.calibration, *args[1:])
    if not any(g["smoothed"] for g in report["groups"].values()):
        return {"smooth": report}
    check = dataclasses.replace(ctx, feeds=split.held)
    plain, smoothed = quantized_sqnr(pass_, graph, check), quantized_sqnr(pass_, candidate, check)
    chosen = smoothed >= plain + MARGIN_DB
    if chosen:
        smooth(graph, layers, *args)
    else:
        for g in report["groups"].values():
            g["smoothed"] = False
    return {"smooth": {**report, "chosen": chosen, "reason": f"quantized model's output SQNR on calibration samples "
                       f"the smoothing was not fit on "
                       f"{smoothed:.2f} dB smoothed, {plain:.2f} dB not (auto: on from {MARGIN_DB} dB better)"}}
