"""Shape computations made constants before import, for a static-shaped library.

Exporters compute shapes at run time: `Shape -> Gather -> Unsqueeze -> Concat -> Reshape` (a
flatten that keeps the batch), `Shape -> Slice -> ReduceProd`, with Casts and Identities between.
TVM 0.27's ONNX frontend carries a Shape's result as a `ShapeExpr` that only some converters take
(Reshape wants its new shape as one; Identity, Mul or ReduceProd refuse one). The library graphopt
builds is static-shaped (`build.static_shapes`), so every such value is a constant: `prepare`
fixes the graph inputs' shapes, runs ONNX shape inference, replaces Shape and Size of statically
shaped tensors by their values and evaluates the nodes computing only from those and from
constants with onnx's reference evaluator, again while that makes more shapes static. What the
frontend then sees is a Reshape of a constant shape.

Only values derived from a Shape or Size are folded: computations on weights alone are left to
TVM (the int8 converters, for one, recognise their weights by the ops that read them). `prepare`
also removes the Identity and inference Dropout nodes, which compute nothing, so that a shape
that could not be folded (the Shape of a dynamic tensor) still reaches an op that takes it.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from graphopt.ir.graph import skeleton

_SHAPE_OPS = frozenset({"Shape", "Size"})
# Folded values are small integer vectors; a larger value (a ConstantOfShape of a feature map) is
# left for TVM to compute or fold rather than written into the model.
MAX_FOLDED_ELEMENTS = 4096
_NON_DETERMINISTIC = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                                "Multinomial", "Bernoulli"})
_DEFAULT_DOMAINS = ("", "ai.onnx")


def prepare(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """`model` as the frontend should see it for `shapes` (every graph input's static shape): its
    foldable shape computations replaced by initializers, its Identity and inference Dropout nodes
    removed. `model` itself when there is nothing to change, else one copy."""
    values = _folded_values(model, shapes)
    renames = _pass_through_renames(model, values)
    if not values and not renames:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _replace_by_values(out.graph, values)
    _bypass(out.graph, renames)
    return out


def _folded_values(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> dict[str, np.ndarray]:
    """The value of every tensor computed from Shape/Size of statically shaped tensors."""
    if not any(n.op_type in _SHAPE_OPS for n in model.graph.node):
        return {}
    light = _static_skeleton(model, shapes)
    opset = _opset(model)
    known = _constants(light, opset)
    values: dict[str, np.ndarray] = {}
    # Each round folds what the shapes inferred so far allow: a Reshape whose shape it folds has a
    # static output shape, and a Shape of that output is folded in the next (ONNX's data
    # propagation stops at a Gather of a scalar index, torch's flatten). So every round but the
    # first folds a Shape or Size, or is the last.
    for _ in range(1 + sum(n.op_type in _SHAPE_OPS for n in model.graph.node)):
        found = _fold_round(light, _static_dims(light), known, opset)
        if not found:
            break
        values.update(found)
        _replace_by_values(light.graph, found)
    return values


def _pass_through_renames(model: onnx.ModelProto, folded: Mapping[str, np.ndarray]) -> dict[str, str]:
    """output -> input of each Identity and inference Dropout (one output, no training_mode) that
    is not folded and whose output is not a graph output (a graph output keeps its name)."""
    outputs = {o.name for o in model.graph.output}
    return {n.output[0]: n.input[0] for n in model.graph.node
            if _passes_through(n) and n.output[0] not in outputs and n.output[0] not in folded}


def _bypass(graph: onnx.GraphProto, renames: Mapping[str, str]) -> None:
    """Remove the pass-through nodes of `renames`; their consumers read their input instead."""
    kept = [n for n in graph.node if not (_passes_through(n) and n.output[0] in renames)]
    del graph.node[:]
    graph.node.extend(kept)
    _rename_inputs(graph, renames)


def _passes_through(node: onnx.NodeProto) -> bool:
    if node.domain not in _DEFAULT_DOMAINS or len(node.output) != 1 or not node.input:
        return False
    return node.op_type == "Identity" or (node.op_type == "Dropout" and len(node.input) < 3)


def _rename_inputs(graph: onnx.GraphProto, renames: Mapping[str, str]) -> None:
    """Point every input (in subgraphs too, which may read outer names) at its final source."""
    def final(name: str) -> str:
        while name in renames:
            name = renames[name]
        return name

    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = final(name)
        for attribute in node.attribute:
            for sub in [attribute.g] if attribute.HasField("g") else attribute.graphs:
                _rename_inputs(sub, renames)


def _static_skeleton(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """The model's structure (large weights as typed inputs) with the given input shapes and no
    recorded intermediate or output shapes: those may hold a batch other than the one fixed here."""
    light = skeleton(model)
    for info in light.graph.input:
        if info.name in shapes:
            tensor = info.type.tensor_type
            tensor.ClearField("shape")
            for d in shapes[info.name]:
                tensor.shape.dim.add().dim_value = int(d)
    del light.graph.value_info[:]
    for info in light.graph.output:
        info.type.tensor_type.ClearField("shape")
    return light


def _static_dims(light: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Every tensor whose shape ONNX shape inference makes fully static, with that shape."""
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
    except (onnx.shape_inference.InferenceError, RuntimeError):
        # Inference stops at an op it cannot type; nothing is folded, the frontend decides.
        return {}
    graph = inferred.graph
    dims = {}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        tensor = info.type.tensor_type
        if tensor.HasField("shape") and all(d.HasField("dim_value") for d in tensor.shape.dim):
            dims[info.name] = tuple(d.dim_value for d in tensor.shape.dim)
    for t in graph.initializer:
        dims[t.name] = tuple(t.dims)
    return dims


def _constants(light: onnx.ModelProto, opset: int) -> dict[str, np.ndarray]:
    """The values of the (small) initializers and of the Constant nodes' outputs."""
    known = {t.name: numpy_helper.to_array(t) for t in light.graph.initializer}
    for node in light.graph.node:
        if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS:
            known.update(zip(node.output, _evaluate(node, {}, opset) or ()))
    return known


def _fold_round(light: onnx.ModelProto, dims: Mapping[str, tuple[int, ...]], known: dict[str, np.ndarray],
                opset: int) -> dict[str, np.ndarray]:
    """The values of the outputs of every node in `light` that can be folded now; they are added
    to `known`."""
    derived: set[str] = set()
    found: dict[str, np.ndarray] = {}
    for node in light.graph.node:
        if node.domain not in _DEFAULT_DOMAINS or node.op_type == "Constant":
            continue
        outputs = _foldable_value(node, known, derived, dims, opset)
        if outputs is None:
            continue
        for name, value in zip(node.output, outputs):
            known[name] = found[name] = value
            derived.add(name)
    return found


def _foldable_value(node: onnx.NodeProto, known: Mapping[str, np.ndarray], derived: set[str],
                    dims: Mapping[str, tuple[int, ...]], opset: int) -> list[np.ndarray] | None:
    """The node's output values, when it computes a shape of a static tensor or only from such
    values and constants; else None."""
    if node.op_type in _SHAPE_OPS:
        if node.input[0] not in dims:
            return None
        # The reference Shape reads only its input's shape: a stand-in of that shape and no memory.
        feeds = {node.input[0]: np.broadcast_to(np.zeros((), np.uint8), dims[node.input[0]])}
    else:
        inputs = [i for i in node.input if i]
        if (node.op_type in _NON_DETERMINISTIC or not inputs or not all(i in known for i in inputs)
                or not any(i in derived for i in inputs) or _has_subgraph(node)):
            return None
        feeds = {i: known[i] for i in inputs}
    outputs = _evaluate(node, feeds, opset)
    if outputs is None or any(np.asarray(v).size > MAX_FOLDED_ELEMENTS for v in outputs):
        return None
    return [np.asarray(v) for v in outputs]


def _evaluate(node: onnx.NodeProto, feeds: dict[str, np.ndarray], opset: int) -> list | None:
    from onnx.reference import ReferenceEvaluator

    try:
        return list(ReferenceEvaluator(node, opsets={"": opset}).run(None, feeds))
    except Exception:  # noqa: BLE001 - an op the evaluator lacks or rejects is simply not folded
        return None


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.HasField("g") or len(a.graphs) for a in node.attribute)


def _replace_by_values(graph: onnx.GraphProto, values: Mapping[str, np.ndarray]) -> None:
    """Remove the nodes all of whose outputs are in `values`; the values that the remaining nodes
    and the graph outputs read become initializers."""
    kept = [n for n in graph.node if not all(o in values for o in n.output if o)]
    _drop_empty_concat_operands(kept, values)
    read = set(_read_names(kept)) | {o.name for o in graph.output}
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(numpy_helper.from_array(np.asarray(values[name]), name)
                             for name in sorted(read & set(values)))


def _drop_empty_concat_operands(nodes: list[onnx.NodeProto], values: Mapping[str, np.ndarray]) -> None:
    """A folded operand with no elements adds nothing to a Concat (torch pads with such tensors);
    dropped, since TVM cannot load a library holding an empty constant."""
    for node in nodes:
        if node.op_type != "Concat":
            continue
        inputs = [i for i in node.input if not (i in values and np.asarray(values[i]).size == 0)]
        if inputs and len(inputs) < len(node.input):
            del node.input[:]
            node.input.extend(inputs)


def _read_names(nodes: Iterable[onnx.NodeProto]) -> Iterable[str]:
    for node in nodes:
        yield from node.input
        for attribute in node.attribute:
            for sub in [attribute.g] if attribute.HasField("g") else attribute.graphs:
                yield from _read_names(sub.node)


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), 1)
