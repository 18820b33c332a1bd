"""Weights stored as a codebook and indices, shared by cluster-weights, ternarize and binarize.

A layer's float weight W becomes

    codebook  float32 [size]              (the shared values: centroids, {0, -Wn, +Wp}, {-1, +1})
    indices   UINT4 (size <= 16) or UINT8, in W's shape
    Cast(indices, to=INT32) -> Gather(codebook, ., axis=0) [-> Mul(., scale)]  = W'

Gather takes only int32/int64 indices, hence the Cast. UINT4 holds two indices a byte and needs
opset 21 (the pass manager upgrades a model, verified EXACT); onnxruntime 1.32 runs Cast from
UINT4 (checked in tests). TVM 0.27's ONNX frontend cannot read a UINT4 initializer, so graphopt's
codegen decodes these chains to float initializers before import (codegen.onnx_import). The
optional per-output-channel `scale` (binarize's alpha) is a Mul after the Gather, so the codebook
stays per layer. The packing stage entropy-codes the indices; this form only has to be exact and
run everywhere.

`CodebookPass` is the LayerPass the three passes derive from: Conv, Gemm and MatMul with a constant
float32 weight (refusing shared, graph-output and non-float32 weights), layers already coded are
skipped (so a second run changes nothing), `encode(layer, ctx)` is each pass's own math.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto, numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from graphopt.ir import fidelity
from graphopt.ir.data import input_specs, random_feeds
from graphopt.ir.errors import PipelineError, Refused
from graphopt.ir.graph import attr, np_dtype, opset, producer
from graphopt.passes import activations
from graphopt.passes.base import Layer, LayerOptions, LayerPass, PassContext, PassResult, option
from graphopt.passes.weights import check_weight
from graphopt.pattern import Rewriter

LAYERS = ("Conv", "Gemm", "MatMul")
# How a pass weighs each weight's error: 'data' by the calibration inputs' moments, 'none' not at
# all, 'auto' data when the user gave --data.
WEIGHTINGS = ("auto", "none", "data")
# Cast from UINT4 (and UINT4 initializers) are opset 21.
UINT4_OPSET = 21


@dataclass(frozen=True)
class Codebook:
    """A weight as `values[indices] * scale` (scale: None, or float32 broadcastable to the weight)."""
    values: np.ndarray
    indices: np.ndarray
    scale: np.ndarray | None = None

    @property
    def index_bits(self) -> int:
        return 4 if self.values.size <= 16 else 8

    def decoded(self) -> np.ndarray:
        """What onnxruntime computes from the stored form, in float32."""
        w = self.values.astype(np.float32)[self.indices.astype(np.int64)]
        return w if self.scale is None else w * self.scale.astype(np.float32)

    def nbytes(self) -> int:
        index = -(-self.indices.size * self.index_bits // 8)
        return int(self.values.size * 4 + index + (0 if self.scale is None else self.scale.size * 4))


def index_opset(size: int) -> int:
    """The lowest opset that can store the indices of a codebook of `size` entries."""
    return UINT4_OPSET if size <= 16 else 7


def output_axis(node: gs.Node, index: int, rank: int) -> int | None:
    """The axis of input `index` (the weight) that runs over the layer's output channels; None
    where there is none (a 1-D MatMul operand)."""
    if node.op == "Conv":
        return 0
    if node.op == "Gemm":
        transposed = int(attr(node, "transB" if index == 1 else "transA", 0))
        return (0 if transposed else 1) if index == 1 else (1 if transposed else 0)
    if rank < 2:
        return None
    return rank - 1 if index == 1 else rank - 2


def coded(tensor: gs.Tensor) -> bool:
    """Whether `tensor` is a weight this module wrote: [Mul <-] Gather of a constant codebook."""
    node = producer(tensor)
    if node is not None and node.op == "Mul" and isinstance(node.inputs[1], gs.Constant):
        node = producer(node.inputs[0])
    return node is not None and node.op == "Gather" and isinstance(node.inputs[0], gs.Constant) \
        and (cast := producer(node.inputs[1])) is not None and cast.op == "Cast" \
        and isinstance(cast.inputs[0], gs.Constant)


def emit(rw: Rewriter, node: gs.Node, index: int, book: Codebook) -> dict:
    """Replace input `index` of `node` by the decoding of `book`; the layer's size and error figures."""
    weight = node.inputs[index]
    original = weight.values.astype(np.float32)
    shape = list(original.shape)
    name = weight.name
    if book.index_bits == 4:
        # graphsurgeon cannot write numpy's uint4: hand it the TensorProto (as quantize does int4).
        stored = LazyValues(numpy_helper.from_array(book.indices.astype(ml_dtypes.uint4), name + "_indices"))
    else:
        stored = book.indices.astype(np.uint8)
    # int32 indices: half the scratch of int64, and every value fits.
    wide = rw.variable(name + "_index", dtype=np.int32, shape=shape)
    rw.add_node("Cast", [rw.constant(name + "_indices", stored)], [wide], {"to": TensorProto.INT32})
    out = rw.variable(name + "_decoded", dtype=np.float32, shape=shape)
    rw.add_node("Gather", [rw.constant(name + "_codebook", book.values.astype(np.float32)), wide], [out],
                {"axis": 0})
    if book.scale is not None:
        scaled = rw.variable(name + "_scaled", dtype=np.float32, shape=shape)
        rw.add_node("Mul", [out, rw.constant(name + "_scale", book.scale.astype(np.float32))], [scaled])
        out = scaled
    rw.set_input(node, index, out)
    used = int(np.unique(book.indices).size)
    return {"op": node.op, "centroids_used": used,
            "weight_sqnr_db": round(float(fidelity.measure(original, book.decoded()).sqnr_db), 2),
            "bytes_before": int(original.nbytes), "bytes_after": book.nbytes()}


@dataclass(frozen=True)
class KeepOptions(LayerOptions):
    """Options of the passes that, as their papers do, keep the first and last layer in float."""
    keep: tuple[str, ...] | None = option(("first", "last"), "layers left in float whatever include says: "
                                                             "'first|last' (the papers' choice), 'first', "
                                                             "'last' or 'none'")

    def check_keep(self, pass_name: str) -> None:
        # The pipeline parser reads `keep=none` as None; either spelling means no layer kept.
        keep = () if self.keep is None or tuple(self.keep) == ("none",) else tuple(self.keep)
        if not set(keep) <= {"first", "last"}:
            raise PipelineError(f"{pass_name}: keep={'|'.join(keep)} must be first|last, first, last or none")
        object.__setattr__(self, "keep", keep)


class CodebookPass(LayerPass):
    """A layer pass that stores each chosen weight as a `Codebook` (see the module note)."""

    ops = LAYERS

    def encode(self, layer: Layer, ctx: PassContext, weights: np.ndarray | None) -> tuple[Codebook, dict]:
        """The layer's codebook and what its decision records besides `emit`'s figures;
        `weights` is each weight's importance (`importance`) or None."""
        raise NotImplementedError

    def codebook_size(self) -> int:
        raise NotImplementedError

    def importance(self, graph: gs.Graph, layers: list[Layer], ctx: PassContext) -> dict[str, np.ndarray]:
        """Per layer, a weight on each weight's squared error (none by default)."""
        return {}

    def candidates(self, graph: gs.Graph) -> list[gs.Node]:
        # Coded layers stay candidates, so include/exclude and keep=first|last name the same
        # layers on a second run.
        return [n for n in super().candidates(graph)
                if activations.weight_input(n) is not None or (len(n.inputs) > 1 and coded(n.inputs[1]))]

    def skip_reason(self, position: int, nodes: list[gs.Node]) -> str | None:
        node = nodes[position]
        if activations.weight_input(node) is None:
            return "weight already stored as a codebook"
        keep = getattr(self.options, "keep", None) or ()
        if "first" in keep and position == 0:
            return "first layer (keep=first)"
        if "last" in keep and position == len(nodes) - 1:
            return "last layer (keep=last)"
        return None

    def examine(self, node: gs.Node, graph: gs.Graph) -> int:
        index = activations.weight_input(node)
        weight = check_weight(graph, node.inputs[index], self.name)
        if np_dtype(weight.dtype) != np.float32:
            raise Refused(f"weight '{weight.name}' is {np_dtype(weight.dtype).name}: {self.name} takes float32 "
                          "weights (its codebook is float32)")
        if weight.values.size < self.codebook_size():
            raise Refused(f"weight '{weight.name}' has {weight.values.size} values, fewer than the codebook's "
                          f"{self.codebook_size()}: nothing to share")
        return index

    def plan(self, layers: list[Layer], graph: gs.Graph, ctx: PassContext,
             result: PassResult) -> list[tuple[Layer, tuple[Codebook, dict]]]:
        needed = index_opset(self.codebook_size())
        if layers and opset(graph) < needed:
            for layer in layers:
                result.refuse(layer.name, f"opset {opset(graph)} < {needed} has no UINT4 indices: upgrade the "
                                          "model's opset (the pass manager does, when it runs the pass)")
            return []
        importance = self.importance(graph, layers, ctx) if layers else {}
        return [(layer, self.encode(layer, ctx, importance.get(layer.name))) for layer in layers]

    def rewrite(self, rw: Rewriter, layer: Layer, plan: tuple[Codebook, dict]) -> dict:
        book, decision = plan
        return {**emit(rw, layer.node, layer.match, book), "index_bits": book.index_bits, **decision}

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = super().run(graph, ctx)
        decisions = result.decisions.values()
        before, after = sum(d["bytes_before"] for d in decisions), sum(d["bytes_after"] for d in decisions)
        result.stats.update(layers=len(result.decisions), bytes_before=before, bytes_after=after,
                            ratio=round(before / after, 2) if after else 1.0)
        return result


def resolve_weighting(option: str, ctx: PassContext | None) -> str:
    """'auto' as 'data' when the pass calibrates on the user's data, else 'none'; the others as given."""
    if option != "auto":
        return option
    return "data" if ctx is not None and ctx.from_data else "none"


def layer_statistics(graph: gs.Graph, layers: list[Layer], ctx: PassContext, what: str
                     ) -> dict[str, activations.LayerStats | str]:
    """Per layer, its input moments on the calibration feeds (random inputs without --data), or
    why it has none (`what` names the work on the progress bar)."""
    why = {layer.name: _no_rows(layer) for layer in layers}
    nodes = [layer.node for layer in layers if why[layer.name] is None]
    stats = {}
    if nodes:
        feeds = ctx.feeds if ctx.feeds is not None else random_feeds(input_specs(graph), ctx.seed, batch=8)
        report = (lambda done, total: ctx.progress(what, done, total)) if ctx.progress else None
        stats = activations.statistics(graph, nodes, feeds, progress=report)
    return {layer.name: stats.get(layer.name) or f"none (data: {why[layer.name]})" for layer in layers}


def _no_rows(layer: Layer) -> str | None:
    """Why the layer has no input moments to weigh its weights by, or None when it has."""
    if layer.match != 1:
        return "the constant operand is A, which the row view does not cover"
    if isinstance(layer.node.inputs[0], gs.Constant):
        return "its input is a constant, not calibration data"
    return activations.supported(layer.node)


def with_opset(pass_: CodebookPass) -> None:
    """Declare the opset the pass's indices need, so the manager upgrades the model to it."""
    low, high = type(pass_).info.opset
    pass_.info = dataclasses.replace(type(pass_).info, opset=(max(low, index_opset(pass_.codebook_size())), high))
