"""Cross-layer equalization (Nagel et al. 2019, data-free quantization) before `quantize`.

Matches: pairs Conv1 -> [Relu | Clip(0, M) | MaxPool]* -> Conv2 (any groups: depthwise included),
every tensor between them read by the next alone and no graph output, both weights constant and
not shared, both layers among those `quantize` selects.
Rewrites (an EXACT rewrite in float): output channel i of Conv1 and input channel i of Conv2 by
s_i = sqrt(r1_i / r2_i), where r1_i = max|W1[i]| and r2_i = max|W2[:, i]| (over the outputs that read
channel i in a grouped Conv2): W1[i] /= s_i, b1[i] /= s_i, W2[:, i] *= s_i, so that both ranges
become sqrt(r1_i r2_i). Positive scales commute with Relu and MaxPool; a Clip(0, M) becomes Relu
then Min with the per-channel bound M / s_i, which keeps the rewrite exact. A layer in two pairs
(Conv -> depthwise -> Conv) is equalized by sweeping the pairs until the scales settle (as DFQ does).
After equalization, quantize's `bias_correction` removes the mean output shift of weight rounding.
Equal ranges help per-tensor weights most, and the per-tensor activation between the layers too (its
large channels shrink), but not always: equalize=auto with --data quantizes the model both ways on
the first calibration samples and equalizes when the output SQNR gains MARGIN_DB; without data it
follows DFQ, which targets per-tensor weights: on with per_channel=false (docs/passes/quantize.md).
Verified by: tests/passes/quant/test_equalize.py (exact in float against onnxruntime; per-tensor
int8 error on a depthwise stack with BatchNorm-folded channel ranges).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import fidelity, ort
from graphopt.ir.errors import PipelineError
from graphopt.ir.graph import attr, is_graph_output
from graphopt.passes.base import PassContext, PassResult
from graphopt.passes.quant import sensitivity
from graphopt.passes.quant.dynamic import QUANTIZED_OPS
from graphopt.pattern import Rewriter

if TYPE_CHECKING:
    from graphopt.passes.quant.insert_qdq import Quantize

SETTINGS = ("off", "on", "auto")
BETWEEN = ("Relu", "Clip", "MaxPool")
# Sweeps over the pairs until no scale moves by more than SETTLED (relative), at most SWEEPS.
SWEEPS, SETTLED = 20, 1e-4
# equalize=auto with data: on when the quantized model's output SQNR gains this much.
MARGIN_DB = 0.5


def check_option(setting: str) -> None:
    if setting not in SETTINGS:
        raise PipelineError(f"quantize: equalize={setting!r} must be one of {', '.join(SETTINGS)}")


@dataclass
class Pair:
    first: gs.Node
    second: gs.Node
    clips: list[gs.Node]  # Clip(0, M) nodes between them, to become Relu + Min(M / s)


def pairs(graph: gs.Graph, layers: list[gs.Node]) -> list[Pair]:
    """The Conv -> ... -> Conv pairs among `layers` that equalization may rescale."""
    chosen = {id(n) for n in layers if n.op == "Conv" and _own_weight(graph, n)}
    found = []
    for node in layers:
        if id(node) not in chosen:
            continue
        t, clips = node.outputs[0], []
        while len(t.outputs) == 1 and not is_graph_output(graph, t):
            reader = t.outputs[0]
            if id(reader) in chosen and reader.inputs[0] is t:
                found.append(Pair(node, reader, clips))
                break
            if reader.op not in BETWEEN or reader.inputs[0] is not t or len(reader.outputs) != 1:
                break
            if reader.op == "Clip":
                if _clip_bounds(reader) is None:
                    break
                clips.append(reader)
            t = reader.outputs[0]
    return found


def _own_weight(graph: gs.Graph, node: gs.Node) -> bool:
    w = node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
    own_bias = bias is None or (isinstance(bias, gs.Constant) and len(bias.outputs) == 1)
    return isinstance(w, gs.Constant) and len(w.outputs) == 1 and not is_graph_output(graph, w) \
        and w.values.dtype == np.float32 and own_bias


def _clip_bounds(node: gs.Node) -> tuple[float, float] | None:
    """(0, M) of a Clip whose lower bound is 0 and upper bound a constant; None otherwise."""
    if len(node.inputs) >= 2:  # opset 11+: bounds are inputs
        lo, hi = (node.inputs[i] if len(node.inputs) > i and not node.inputs[i].is_empty() else None for i in (1, 2))
        if not (isinstance(lo, gs.Constant) and isinstance(hi, gs.Constant)):
            return None
        lo, hi = float(lo.values), float(hi.values)
    else:
        lo, hi = float(attr(node, "min", -np.inf)), float(attr(node, "max", np.inf))
    return (lo, hi) if lo == 0 and np.isfinite(hi) and hi > 0 else None


def output_ranges(w: np.ndarray) -> np.ndarray:
    return np.abs(w.reshape(w.shape[0], -1)).max(axis=1)


def input_ranges(w: np.ndarray, groups: int) -> np.ndarray:
    """max |W[:, i]| per input channel i of a (grouped) Conv weight: over the outputs of i's group."""
    per_group = np.abs(w.reshape(groups, w.shape[0] // groups, w.shape[1], -1)).max(axis=(1, 3))
    return per_group.reshape(-1)


def scale_input_channels(w: np.ndarray, groups: int, s: np.ndarray) -> np.ndarray:
    grouped = w.reshape(groups, w.shape[0] // groups, w.shape[1], -1) * s.reshape(groups, 1, w.shape[1], 1)
    return grouped.reshape(w.shape).astype(w.dtype)


def equalize(graph: gs.Graph, layers: list[gs.Node]) -> dict:
    """Equalize every pair among `layers`; the stats: per pair, the largest over the smallest
    channel range of the first layer's weight before and after (what per-tensor weight
    quantization suffers from)."""
    found = pairs(graph, layers)
    if not found:
        return {}
    weights = {id(n): n.inputs[1].values.astype(np.float64) for p in found for n in (p.first, p.second)}
    before = [_imbalance(weights[id(p.first)]) for p in found]
    totals = [np.ones(weights[id(p.first)].shape[0]) for p in found]
    for _ in range(SWEEPS):
        moved = 0.0
        for p, total in zip(found, totals):
            w1, w2 = weights[id(p.first)], weights[id(p.second)]
            r1, r2 = output_ranges(w1), input_ranges(w2, int(attr(p.second, "group", 1)))
            s = np.ones_like(r1)
            ok = (r1 > 0) & (r2 > 0)
            s[ok] = np.sqrt(r1[ok] / r2[ok])
            weights[id(p.first)] = w1 / s.reshape([-1] + [1] * (w1.ndim - 1))
            weights[id(p.second)] = scale_input_channels(w2, int(attr(p.second, "group", 1)), s)
            total *= s
            moved = max(moved, float(np.abs(s - 1).max()))
        if moved < SETTLED:
            break
    rw = Rewriter(graph)
    for p, total in zip(found, totals):
        _apply(rw, p, total)
    for node in {id(n): n for p in found for n in (p.first, p.second)}.values():
        rw.set_values(node.inputs[1], weights[id(node)].astype(np.float32))
    rw.commit()
    return {"pairs": {f"{p.first.name} -> {p.second.name}": {
        "range_ratio_before": round(r, 2), "range_ratio_after": round(_imbalance(weights[id(p.first)]), 2)}
        for p, r in zip(found, before)}}


def _imbalance(w: np.ndarray) -> float:
    r = output_ranges(w)
    r = r[r > 0]
    return float(r.max() / r.min()) if len(r) else 1.0


def _apply(rw: Rewriter, p: Pair, s: np.ndarray) -> None:
    """The first layer's bias and the Clips between the pair, for channels divided by `s`."""
    if len(p.first.inputs) > 2 and not p.first.inputs[2].is_empty():
        b1 = p.first.inputs[2]
        rw.set_values(b1, (b1.values / s).astype(b1.values.dtype))
    for clip in p.clips:
        _clip_to_min(rw, clip, s, p.first.inputs[1].values.ndim)


def _clip_to_min(rw: Rewriter, clip: gs.Node, s: np.ndarray, rank: int) -> None:
    """Clip(x, 0, M) on channels scaled by 1/s -> Min(Relu(x), M / s) per channel: exact."""
    _, hi = _clip_bounds(clip)
    x, out = clip.inputs[0], clip.outputs[0]
    bound = (np.float32(hi) / s).astype(np.float32).reshape([-1] + [1] * (rank - 2))
    relu = rw.variable(out.name + "_relu", dtype=out.dtype, shape=out.shape)
    rw.remove(clip)
    rw.add_node("Relu", [x], [relu], name=clip.name + "_relu")
    rw.add_node("Min", [relu, rw.constant(clip.name + "_bound", bound)], [out], name=clip.name)


def before_quantize(pass_: Quantize, graph: gs.Graph, ctx: PassContext) -> dict:
    """quantize's equalization step: the stats to report under "equalize" (empty when it did nothing)."""
    o = pass_.options
    if o.equalize == "off" or any(n.op in QUANTIZED_OPS for n in graph.nodes):
        return {}
    layers = [layer.node for layer in pass_.select(graph, PassResult(False))]
    if o.equalize == "on" or not ctx.from_data:
        found = equalize(graph, layers) if o.equalize == "on" or not o.per_channel else {}
        return {"equalize": found} if found else {}
    candidate = graph.copy()
    names = {n.name for n in layers}
    found = equalize(candidate, [n for n in candidate.nodes if n.name in names])
    if not found:
        return {}
    plain, equal = quantized_sqnr(pass_, graph, ctx), quantized_sqnr(pass_, candidate, ctx)
    chosen = equal >= plain + MARGIN_DB
    if chosen:
        equalize(graph, layers)
    return {"equalize": {**found, "chosen": chosen, "reason": f"quantized model's output SQNR on calibration samples "
                         f"{equal:.2f} dB equalized, {plain:.2f} dB not (auto: on from {MARGIN_DB} dB better)"}}


def quantized_sqnr(pass_: Quantize, graph: gs.Graph, ctx: PassContext) -> float:
    """The lowest output SQNR (dB) of `graph` quantized as `pass_` would (nearest rounding, no
    rescaling, nothing kept float), calibrated and measured on the first calibration samples."""
    probe = dataclasses.replace(pass_.options, equalize="off", smooth="off", rounding="nearest", keep_float=0,
                                bias_correction=False)
    sample = sensitivity.sample(graph, ctx.feeds)
    quantized = graph.copy()
    type(pass_)(**{f.name: getattr(probe, f.name) for f in dataclasses.fields(probe)}).run(
        quantized, PassContext(feeds=sample, from_data=True, seed=ctx.seed))
    measured = fidelity.compare(ort.run(graph, sample), ort.run(quantized, sample))
    return float(min(m.sqnr_db for m in measured.values()))
