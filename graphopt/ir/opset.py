"""Upgrade a model's default-domain opset with onnx's version converter, verified in onnxruntime.

Paddle and older exporters write opset 9-12; a pass that needs a newer one (quantize's per-axis
DequantizeLinear needs 13) gets the model upgraded instead of skipping it, and `--opset N` asks
for it directly. The converter serializes the whole model, so it is given a skeleton: weights over
a few thousand elements become typed graph inputs and the same arrays are attached again after.
It drops model-local functions, so their bodies are converted one by one and put back. The result
must compute what the original did: both run in onnxruntime on the same feeds, within EXACT's
bound. Anything the converter cannot take is one ModelError naming the op and its node.
"""
from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import version_converter

from graphopt.ir import fidelity, ort
from graphopt.ir.data import input_specs, random_feeds
from graphopt.ir.errors import GraphoptError, ModelError
from graphopt.ir.graph import (SKELETON_MAX_ELEMENTS, ModelGraph, constant_nodes_to_initializers, export,
                               min_ir_version, opset, without_large_weights)

Check = Callable[[np.ndarray, np.ndarray], "str | None"]
_NO_ADAPTER = re.compile(r"No Adapter (?:From|To) Version \$?(\d+) for (\w+)")
_UNDEFINED = re.compile(r"Input (\S+) is undefined")
_ASSERTION = re.compile(r"^.*?failed: ")


def upgrade(graph: gs.Graph, version: int, feeds: dict[str, np.ndarray] | None = None, *,
            verify: bool = True, check: Check | None = None) -> gs.Graph:
    """`graph` converted to default-domain opset `version` (a new graph sharing the weights; the
    same graph when it is at `version` already). Verified in onnxruntime on `feeds` (seeded random
    inputs when None) with `check` (EXACT's bound by default) unless `verify` is off.
    Raises ModelError naming the op and node the converter failed on, or the output that differs."""
    where, current = _source(graph), opset(graph)
    if version == current:
        return graph
    if version < current:
        raise ModelError(where, f"cannot lower opset {current} to {version}: graphopt only upgrades opsets")
    latest = onnx.defs.onnx_opset_version()
    if version > latest:
        raise ModelError(where, f"opset {version} is newer than the installed onnx knows ({latest})")
    model, weights, inputs = _skeleton(graph)
    converted = _convert(model, version, where, current)
    out = _reattach(converted, weights, inputs, graph)
    if verify:
        _verify(graph, out, feeds, check or _exact, where, f"opset {current} -> {version}")
    return out


def upgrade_in_place(graph: gs.Graph, version: int, feeds: dict[str, np.ndarray] | None = None, *,
                     verify: bool = True, check: Check | None = None) -> None:
    """`upgrade`, with the result put into `graph` itself, for callers that hold the graph."""
    new = upgrade(graph, version, feeds, verify=verify, check=check)
    if new is graph:
        return
    graph.nodes, graph.inputs, graph.outputs = new.nodes, new.inputs, new.outputs
    graph.opset, graph.import_domains, graph.ir_version = new.opset, new.import_domains, new.ir_version
    graph.functions = new.functions


def _source(graph: gs.Graph) -> str:
    return (graph.props.source if isinstance(graph, ModelGraph) else "") or f"model '{graph.name}'"


def _skeleton(graph: gs.Graph) -> tuple[onnx.ModelProto, dict[str, gs.Constant], set[str]]:
    """The model with its large weights as typed graph inputs, those weights by name, and the
    names of the graph's own inputs (an IR >= 4 model may list a weight as an overridable input)."""
    light, converted = without_large_weights(graph, SKELETON_MAX_ELEMENTS)
    inputs = {t.name for t in light.inputs}
    light.inputs.extend(t for t in converted if t.name not in inputs)
    originals = graph.tensors()
    return export(light), {t.name: originals[t.name] for t in converted}, inputs


def _convert(model: onnx.ModelProto, version: int, where: str, current: int) -> onnx.ModelProto:
    try:
        out = version_converter.convert_version(model, version)
    except Exception as e:  # noqa: BLE001 - the converter raises RuntimeError, ConvertError or ValidationError
        raise _converter_error(e, model.graph, where, f"cannot upgrade opset {current} to {version}") from None
    del out.functions[:]  # the converter drops them in some versions and keeps them unconverted in others
    out.functions.extend(_convert_function(f, version, where, current) for f in model.functions)
    return out


def _convert_function(f: onnx.FunctionProto, version: int, where: str, current: int) -> onnx.FunctionProto:
    """A model-local function whose body uses the default domain below `version`, converted as a
    graph of its own (onnxruntime inlines bodies at the model's opset)."""
    own = next((o.version for o in f.opset_import if o.domain in ("", "ai.onnx")), None)
    if own is None or own >= version:
        return f
    untyped = [onnx.helper.make_value_info(name, onnx.TypeProto()) for name in f.input]
    body = onnx.helper.make_graph(f.node, f.name, untyped, [onnx.helper.make_value_info(n, onnx.TypeProto())
                                                           for n in f.output])
    try:
        converted = version_converter.convert_version(onnx.helper.make_model(body, opset_imports=f.opset_import),
                                                      version)
    except Exception as e:  # noqa: BLE001 - as in _convert
        raise _converter_error(e, body, where, f"cannot upgrade function '{f.domain}::{f.name}' from opset "
                                               f"{own} to {version}") from None
    out = onnx.FunctionProto()
    out.CopyFrom(f)
    del out.node[:], out.opset_import[:]
    out.node.extend(converted.graph.node)
    out.opset_import.extend(converted.opset_import)
    return out


def _converter_error(e: Exception, graph: onnx.GraphProto, where: str, what: str) -> ModelError:
    """The converter's message, cut to its point, naming the op and the first node it applies to."""
    text = str(e).strip() or type(e).__name__
    adapter, undefined = _NO_ADAPTER.search(text), _UNDEFINED.search(text)
    if adapter:
        op = adapter.group(2)
        node = _first_node(graph, lambda n: n.op_type == op)
        return ModelError(where, f"{what}: onnx's version converter has no adapter for op {op} from opset "
                          f"{adapter.group(1)}; re-export the model at a newer opset", node)
    node = _first_node(graph, lambda n: undefined.group(1) in n.input) if undefined else None
    reason = _ASSERTION.sub("", text.splitlines()[0])
    return ModelError(where, f"{what}: onnx's version converter failed: {reason}", node)


def _first_node(graph: onnx.GraphProto, matches: Callable[[onnx.NodeProto], bool]) -> str | None:
    for node in graph.node:
        if matches(node):
            return node.name or node.op_type
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                found = _first_node(sub, matches)
                if found:
                    return found
    return None


def _reattach(converted: onnx.ModelProto, weights: dict[str, gs.Constant], inputs: set[str],
              original: gs.Graph) -> gs.Graph:
    """The converted skeleton as a graph with the original weights (the same arrays) back in."""
    graph = gs.import_onnx(converted)
    tensors = graph.tensors()
    for name, weight in weights.items():
        if name in tensors:
            tensors[name].to_constant(weight._values)
    graph.inputs = [t for t in graph.inputs if t.name not in weights or t.name in inputs]
    constant_nodes_to_initializers(graph)  # the converter writes new attribute values as Constant nodes
    graph.ir_version = max(original.ir_version or 0, min_ir_version(graph.import_domains, bool(graph.functions)))
    return ModelGraph.adopt(graph, original.props) if isinstance(original, ModelGraph) else graph


def _verify(original: gs.Graph, upgraded: gs.Graph, feeds: dict[str, np.ndarray] | None, check: Check,
            where: str, what: str) -> None:
    given = feeds is not None
    feeds = feeds if given else random_feeds(input_specs(original))
    try:
        reference = ort.run(original, feeds)
    except GraphoptError as e:
        raise ModelError(where, f"cannot verify the upgrade ({what}): onnxruntime fails on the original model with "
                         f"{'the given' if given else 'random'} inputs: {e}; pass data that it runs on") from None
    try:
        outputs = ort.run(upgraded, feeds)
    except GraphoptError as e:
        raise ModelError(where, f"the model converted ({what}) does not run: {e}") from None
    for name, ref in reference.items():
        why = check(ref, outputs[name])
        if why:
            raise ModelError(where, f"the model converted ({what}) computes something else: output '{name}': {why}")


def _exact(reference: np.ndarray, candidate: np.ndarray) -> str | None:
    return fidelity.bound_violation(reference, candidate, fidelity.EXACT_RTOL, fidelity.EXACT_ATOL, scaled=True,
                                    bound="EXACT (equal up to float rounding)")
