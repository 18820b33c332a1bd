"""What quantizing each layer costs the model, and which layers `keep_float` leaves in float.

All measured in onnxruntime on the first ERROR_SAMPLES calibration samples, against the float model:
- `layer_sensitivity`: per layer, the model's lowest output SQNR (dB) with only that layer
  quantized (its weights as the pass will store them, and its input activation);
- `keep_float`: keep_float=N keeps the N most sensitive layers in float; "outliers" those 10 dB
  below the median layer (the rule before issue 14); "auto" the fewest, most sensitive first,
  with which the whole quantized model's lowest output cosine reaches `target_cosine`, found by
  bisection over that count (each step quantizes the model; log2(layers) + 1 of them);
- `bias_shifts`: per layer, the mean per-channel output shift its weight rounding causes (bias
  correction, Nagel et al. 2019), with only that layer's weights quantized.
Verified by: tests/passes/quant/test_quantize.py.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import fidelity, ort
from graphopt.ir.data import Batching, input_specs
from graphopt.passes.quant import calibrate as cal
from graphopt.passes.quant.qdq_layer import QParams, apply_one
from graphopt.passes.quant.weight_quant import QuantizedWeight

ERROR_SAMPLES = 64
OUTLIER_DB = 10.0


def sample(graph: gs.Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The first ERROR_SAMPLES samples, along the batch axis of the inputs that have one."""
    return Batching.of(input_specs(graph), feeds).first(feeds, ERROR_SAMPLES)


def layer_sensitivity(graph: gs.Graph, layers: list[gs.Node], params: dict[str, QParams],
                      weights: dict[str, QuantizedWeight], feeds: dict[str, np.ndarray]) -> dict[str, float]:
    """Lowest output SQNR (dB) of the model with only one layer (weights and input) quantized, per layer."""
    inputs = sample(graph, feeds)
    reference = ort.run(graph, inputs)
    ranking = {}
    for node in layers:
        copy = graph.copy()
        target = next(n for n in copy.nodes if n.name == node.name)
        x = target.inputs[0].name
        apply_one(copy, target, weights[node.name], {x: params[x]} if x in params else {})
        measured = fidelity.compare(reference, ort.run(copy, inputs))
        ranking[node.name] = round(float(min(m.sqnr_db for m in measured.values())), 2)
    return ranking


def lowest_cosine(graph: gs.Graph, quantized: gs.Graph, feeds: dict[str, np.ndarray]) -> float:
    inputs = sample(graph, feeds)
    measured = fidelity.compare(ort.run(graph, inputs), ort.run(quantized, inputs))
    return float(min(m.cosine for m in measured.values()))


def keep_float(keep: int | str, ranking: dict[str, float], target_cosine: float,
               cosine_keeping: Callable[[set[str]], float], label: str = "int8") -> dict[str, dict]:
    """Per layer of `ranking`, `label` (quantized) or "float", and why. `cosine_keeping(kept)`: the quantized
    model's lowest output cosine with the layers `kept` left in float (for "auto")."""
    worst = sorted(ranking, key=ranking.get)
    if keep == "auto":
        count, cosine = fewest_kept(worst, target_cosine, cosine_keeping)
        kept = set(worst[:count])
        rule = (f"the {count} most sensitive stay float: model output cosine {cosine:.5f} on calibration "
                f"samples (target {target_cosine:g})")
    elif keep == "outliers":
        limit = float(np.median(list(ranking.values()))) - OUTLIER_DB
        kept, rule = {name for name in worst if ranking[name] < limit}, f"float below {limit:.2f} dB"
    else:
        kept, rule = set(worst[:keep]), f"the {keep} lowest stay float"
    return {name: {"chosen": "float" if name in kept else label, "sensitivity_sqnr_db": sqnr,
                   "reason": f"model SQNR {sqnr} dB with only this layer quantized; {rule}"}
            for name, sqnr in ranking.items()}


def fewest_kept(worst: list[str], target: float, cosine_keeping: Callable[[set[str]], float]) -> tuple[int, float]:
    """(k, cosine): the smallest number k of the most sensitive layers `worst[:k]` kept in float
    with which the cosine reaches `target`, by bisection (the cosine is taken to rise with k;
    all layers in float is the float model, cosine 1)."""
    measured = {len(worst): 1.0}

    def cosine(k: int) -> float:
        if k not in measured:
            measured[k] = cosine_keeping(set(worst[:k]))
        return measured[k]

    if cosine(0) >= target:
        return 0, measured[0]
    low, high = 0, len(worst)  # cosine(low) < target <= cosine(high)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if cosine(middle) >= target else (middle, high)
    return high, measured[high]


def bias_shifts(graph: gs.Graph, layers: list[gs.Node], weights: dict[str, QuantizedWeight],
                feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per layer, the mean per-channel output shift its weight rounding causes (Nagel et al. 2019),
    measured with only that layer's weights quantized on the calibration samples."""
    inputs = sample(graph, feeds)
    shifts = {}
    for node in [n for n in layers if n.op in ("Conv", "Gemm")]:
        out = node.outputs[0].name
        ref = ort.run(cal.with_outputs(graph, [out]), inputs)[out]
        copy = graph.copy()
        apply_one(copy, next(n for n in copy.nodes if n.name == node.name), weights[node.name], {})
        got = ort.run(cal.with_outputs(copy, [out]), inputs)[out]
        axes = tuple(i for i in range(ref.ndim) if i != 1)
        shifts[node.name] = (got - ref).mean(axis=axes).astype(np.float32)
    return shifts
