"""The compression space the search walks: knobs with levels from off to most aggressive, and
the pass spec a setting of them writes.

A setting is a tuple of levels, one per knob (0: off). Its spec is a `--passes` string in a fixed
order (canonicalize; structure-changing passes; then what rounds or rewrites the result), so a
spec found by the search runs again as it stands. Which knobs a model gets depends on what it is
made of (convolutions, matmuls, 3x3 stride-1 convolutions) and on the objective: latency favours
what the target runs faster (fewer channels, lower rank, int8 kernels, Winograd); size favours
what stores fewer bytes (sparsity, fewer channels, int8 and int4 weights).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.passes.pipeline import Pipeline

Setting = tuple[int, ...]
# Convolution weights up to which channel pruning allocates its per-layer ratios by measured
# sensitivity (see `knobs`); above, every layer loses the same share.
SENSITIVITY_MAX_WEIGHTS = 1_000_000
# A knob whose layers do less than this share of the model's multiply-accumulates cannot save the
# walk's MIN_GAIN of its latency (ResNet-18's classifier: 0.03% of its MACs).
MIN_SHARE = 0.03


@dataclass(frozen=True)
class Knob:
    """One dimension of the space: `levels[i - 1]` is the pass spec at level i (0 is off)."""

    name: str
    levels: tuple[str, ...]
    stage: int  # where its passes go in the pipeline: lower first

    def spec(self, level: int) -> str | None:
        return self.levels[level - 1] if level else None


# Stages: structure first (channels change shapes the rest sees), then rank, sparsity, the float
# rewrite (Winograd), and quantization last (it calibrates on the model the others produced).
_CHANNELS, _RANK, _SPARSITY, _WINOGRAD, _QUANT = range(5)


def knobs(graph: gs.Graph, objective: str, int8_lowering: bool) -> list[Knob]:
    """The knobs that can change `graph` for `objective` ("latency" or "size").

    `int8_lowering`: quantized layers are lowered to integer operators (the target compiles them
    to int8 kernels); otherwise quantized weights are folded into int8 storage."""
    ops = {n.op for n in graph.nodes}
    convs = [n for n in graph.nodes if n.op == "Conv"]
    small = sum(_weight_count(n) for n in convs) <= SENSITIVITY_MAX_WEIGHTS
    found = []
    # The int8 knob first: on a CPU with int8 kernels it saves most (ResNet-18 on AMX: 5x), and
    # knobs are probed in this order, so a short budget measures it before the others.
    finish = "lower-int8" if int8_lowering and objective == "latency" else "fold-qdq"
    quant = (f"quantize(keep_float=2),{finish}", f"quantize,{finish}")
    if objective == "size":
        quant += ("quantize(weight_bits=4,group_size=32),fold-qdq",)
    if ops & {"Conv", "Gemm", "MatMul"}:
        found.append(Knob("int8", quant, _QUANT))
    if convs:
        # Channel counts in multiples of 8 keep every convolution in whole SIMD vectors: an odd
        # count leaves the compiled kernel scalar (digits: 0.015 -> 0.10 ms at 25% pruned).
        # Per-layer ratios by sensitivity run the model 4 times per channel group and candidate:
        # seconds on a small CNN, over ten minutes on ResNet-18 with 128 calibration images.
        allocation = "sensitivity" if small else "uniform"
        found.append(Knob("channels", tuple(f"prune-channels(ratio={r},allocation={allocation},round_to=8)"
                                            for r in (0.25, 0.5, 0.75)), _CHANNELS))
    share = _mac_share(graph, {"Gemm", "MatMul"})
    if ops & {"Gemm", "MatMul"} and (share is None or share >= MIN_SHARE):
        found.append(Knob("rank", tuple(f"factorize-svd(ratio={r})" for r in (0.5, 0.25)), _RANK))
    # Tucker-2 on ResNet-18 took 459 s a candidate (data-aware rank choice over 19 convolutions),
    # and its three thinner convolutions ran slower than the one they replaced (23.6 vs 17.7 ms):
    # on large models the budget goes to knobs that pay.
    if small and any(_spatial(n) for n in convs):
        found.append(Knob("conv-rank", tuple(f"factorize-tucker(ratio={r})" for r in (0.5, 0.25)), _RANK))
    if objective == "size":
        found.append(Knob("sparsity", tuple(f"prune-magnitude(sparsity={s})" for s in (0.5, 0.7, 0.9)), _SPARSITY))
    if objective == "latency" and any(_winograd_shaped(n) for n in convs):
        found.append(Knob("winograd", ("winograd",), _WINOGRAD))
    return found


def spec(space: list[Knob], setting: Setting) -> str:
    """The `--passes` spec of `setting`, in the canonical form `Pipeline` prints (the report's
    `pipeline` is the same string). Winograd rewrites float convolutions only: with quantization
    on it is left out."""
    chosen = {k.name: (k, level) for k, level in zip(space, setting) if level}
    if "int8" in chosen:
        chosen.pop("winograd", None)
    parts = ["canonicalize"] + [k.spec(level) for k, level in sorted(chosen.values(), key=lambda kl: kl[0].stage)]
    return str(Pipeline.parse(",".join(parts)))


def describe(space: list[Knob], setting: Setting) -> str:
    """A few words for a setting: 'channels 2, int8 1' or 'baseline'."""
    words = [f"{k.name} {level}" for k, level in zip(space, setting) if level]
    return ", ".join(words) or "baseline"


def _mac_share(graph: gs.Graph, ops: set[str]) -> float | None:
    """The share of the model's multiply-accumulates in `ops` nodes (symbolic dims as 1), or None
    when shapes do not tell."""
    from graphopt.ir.cost import macs
    from graphopt.ir.graph import infer_shapes

    counted = [(n.op, macs(n)) for n in infer_shapes(graph.copy()).nodes]
    total = sum(m for _, m in counted)
    return sum(m for op, m in counted if op in ops) / total if total else None


def _weight_count(node: gs.Node) -> int:
    shape = getattr(node.inputs[1], "shape", None) if len(node.inputs) > 1 else None
    return int(np.prod(shape)) if shape and all(isinstance(d, int) for d in shape) else 0


def _spatial(node: gs.Node) -> bool:
    """A dense convolution with a kernel larger than 1x1: what Tucker-2 factorizes."""
    shape = getattr(node.inputs[1], "shape", None) or () if len(node.inputs) > 1 else ()
    return len(shape) == 4 and shape[2] * shape[3] > 1 and node.attrs.get("group", 1) == 1


def _winograd_shaped(node: gs.Node) -> bool:
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    shape = getattr(weight, "shape", None) or ()
    strides = node.attrs.get("strides", [1, 1])
    return len(shape) == 4 and tuple(shape[2:]) == (3, 3) and all(s == 1 for s in strides) \
        and node.attrs.get("group", 1) == 1
