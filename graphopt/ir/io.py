"""Safe loading and atomic saving of ONNX models.

Model files are untrusted. `load` validates before it allocates: every initializer's declared
size against its data, external-data paths against the model's folder, opset domains, and the
graph for cycles. Any problem is one `ModelError` naming the file, the node and what is wrong.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from graphopt.ir.errors import ModelError
from graphopt.ir.graph import constant_nodes_to_initializers, export, find_cycle, skeleton

# Domains onnxruntime implements; a node from any other domain cannot run anywhere we target.
KNOWN_DOMAINS = frozenset({
    "", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview.training", "com.microsoft",
    "com.microsoft.nchwc", "com.microsoft.experimental", "com.ms.internal.nhwc",
})
# Above this the protobuf cannot hold the weights inline.
PROTOBUF_LIMIT = 2**31 - 1
# A single tensor larger than this is not a model we can hold in memory; refuse before allocating.
MAX_TENSOR_BYTES = 1 << 36


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read and validate an ONNX file, with its external data; raise ModelError if unsafe or malformed."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(path, "no such file")
    if path.stat().st_size == 0:
        raise ModelError(path, "file is empty")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as e:
        raise ModelError(path, f"not an ONNX model (protobuf parse failed: {e})") from None
    _check_header(path, model)
    _check_domains(path, model)
    for graph in _all_graphs(model.graph):
        for tensor in _graph_tensors(graph):
            _check_tensor(path, tensor, graph.name)
    _check_acyclic(path, model.graph)
    _check_schema(path, model)
    if any(external_data_helper.uses_external_data(t) for t in _all_tensors(model)):
        external_data_helper.load_external_data_for_model(model, str(path.parent.resolve()))
    return model


def load(path: str | os.PathLike) -> gs.Graph:
    """Load a validated model as a `gs.Graph`, with Constant-node weights turned into initializers."""
    graph = gs.import_onnx(load_model(path))
    constant_nodes_to_initializers(graph)
    return graph


def save(model: onnx.ModelProto | gs.Graph, path: str | os.PathLike) -> Path:
    """Write atomically: to a temporary file beside `path`, then rename.

    Models over 2 GB get their weights in `<name>.data` beside the model, renamed into place
    before the model so a reader never sees a model whose data is missing.
    """
    if isinstance(model, gs.Graph):
        model = export(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        staged = Path(tmp) / path.name
        if model.ByteSize() > PROTOBUF_LIMIT - (1 << 20):
            data_name = path.name + ".data"
            onnx.save_model(model, str(staged), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
            os.replace(Path(tmp) / data_name, path.parent / data_name)
        else:
            onnx.save_model(model, str(staged))
        os.replace(staged, path)
    return path


def _check_header(path: Path, model: onnx.ModelProto) -> None:
    if model.ir_version <= 0:
        raise ModelError(path, "not an ONNX model (no ir_version)")
    if not model.HasField("graph") or not model.graph.output:
        raise ModelError(path, "not an ONNX model (no graph with outputs)")
    if not model.opset_import:
        raise ModelError(path, "model declares no opset_import")


def _check_domains(path: Path, model: onnx.ModelProto) -> None:
    imported = {o.domain for o in model.opset_import}
    local = {f.domain for f in model.functions}
    for o in model.opset_import:
        if o.domain not in KNOWN_DOMAINS and o.domain not in local:
            raise ModelError(path, f"unknown opset domain '{o.domain}' (known: "
                             f"{', '.join(sorted(d or 'ai.onnx' for d in KNOWN_DOMAINS))})")
    for graph in _all_graphs(model.graph):
        for node in graph.node:
            if node.domain not in imported and not (node.domain == "ai.onnx" and "" in imported):
                raise ModelError(path, f"op {node.op_type} uses domain '{node.domain}' "
                                 "which the model does not import", node.name or node.op_type)


def _check_tensor(path: Path, t: onnx.TensorProto, owner: str) -> None:
    label = f"initializer '{t.name}'" if t.name else f"tensor in {owner}"
    if any(d < 0 for d in t.dims):
        raise ModelError(path, f"{label} has negative dims {list(t.dims)}")
    count = int(np.prod(t.dims, dtype=object)) if t.dims else 1
    if t.data_type in (onnx.TensorProto.UNDEFINED,) or t.data_type not in onnx.TensorProto.DataType.values():
        raise ModelError(path, f"{label} has invalid data type {t.data_type}")
    if t.data_type == onnx.TensorProto.STRING:
        if len(t.string_data) != count:
            raise ModelError(path, f"{label} declares {count} strings but holds {len(t.string_data)}")
        return
    nbytes = _declared_nbytes(t, count)
    if nbytes > MAX_TENSOR_BYTES:
        raise ModelError(path, f"{label} declares {nbytes} bytes, over the {MAX_TENSOR_BYTES}-byte limit")
    if external_data_helper.uses_external_data(t):
        _check_external(path, t, label, nbytes)
    elif t.HasField("raw_data"):
        if len(t.raw_data) != nbytes:
            raise ModelError(path, f"{label} declares shape {list(t.dims)} ({nbytes} bytes) "
                             f"but holds {len(t.raw_data)} bytes")
    else:
        held = len(getattr(t, onnx.helper.tensor_dtype_to_field(t.data_type)))
        expected = count * (2 if t.data_type in _COMPLEX else 1)
        if held != expected and not _packed_matches(t, count, held):
            raise ModelError(path, f"{label} declares shape {list(t.dims)} ({count} elements) "
                             f"but holds {held} values")


_COMPLEX = (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128)
_SUBBYTE = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
            if hasattr(onnx.TensorProto, n)}


def _declared_nbytes(t: onnx.TensorProto, count: int) -> int:
    if t.data_type in _SUBBYTE:
        return (count + 1) // 2
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return count * itemsize


def _packed_matches(t: onnx.TensorProto, count: int, held: int) -> bool:
    # Sub-byte types pack two values per int32_data entry.
    return t.data_type in _SUBBYTE and held == (count + 1) // 2


def _check_external(path: Path, t: onnx.TensorProto, label: str, nbytes: int) -> None:
    info = {e.key: e.value for e in t.external_data}
    location = info.get("location", "")
    root = path.parent.resolve()
    target = (root / location).resolve()
    if not location or os.path.isabs(location) or not target.is_relative_to(root):
        raise ModelError(path, f"{label} has external data at '{location}', outside the model's folder")
    if not target.is_file():
        raise ModelError(path, f"{label} has external data file '{location}' which does not exist")
    offset = int(info.get("offset", 0) or 0)
    length = int(info.get("length", nbytes) or nbytes)
    if length != nbytes:
        raise ModelError(path, f"{label} declares {nbytes} bytes but its external data length is {length}")
    if offset < 0 or offset + length > target.stat().st_size:
        raise ModelError(path, f"{label} reads bytes {offset}..{offset + length} of '{location}', "
                         f"which has {target.stat().st_size}")


def _check_acyclic(path: Path, graph: onnx.GraphProto) -> None:
    cycle = find_cycle(graph)
    if cycle:
        raise ModelError(path, f"graph has a cycle through nodes {' -> '.join(cycle)}", cycle[0])


def _check_schema(path: Path, model: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(skeleton(model))
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0]
        node = _node_named_in(str(e))
        raise ModelError(path, f"fails the ONNX checker: {first}", node) from None


def _node_named_in(message: str) -> str | None:
    # The checker says "==> Context: Bad node spec for node. Name: X OpType: Y".
    marker = "Name: "
    if marker in message:
        return message.split(marker, 1)[1].split()[0]
    return None


def _all_graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_graphs(g)


def _graph_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors


def _all_tensors(model: onnx.ModelProto):
    for graph in _all_graphs(model.graph):
        yield from _graph_tensors(graph)
