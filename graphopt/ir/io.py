"""Safe loading and atomic saving of ONNX models.

Model files are untrusted. `load` validates before it allocates: every tensor's declared size
against its data, external-data paths against the model's folder, the opset domains its nodes
use, and the graph for cycles. Any problem is one `ModelError` naming the file, the node or
tensor and what is wrong. External weights are mapped, not read (`external.Mapped`), and what
graphsurgeon drops (metadata, doc strings, model version) rides along on the `ModelGraph`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError, EncodeError
from onnx import external_data_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from graphopt.ir import external, node_check, stream
from graphopt.ir.errors import ModelError
from graphopt.ir.graph import (ModelGraph, ModelProps, constant_nbytes, constant_nodes_to_initializers, find_cycle,
                               min_ir_version, skeleton)

# Domains ONNX defines and those onnxruntime adds; a node from any other domain cannot run
# anywhere we target. A model may declare others it does not use (onnxruntime's quant_pre_process
# declares ai.onnx.training): those are kept and do no harm.
KNOWN_DOMAINS = frozenset({
    "", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview", "ai.onnx.preview.training", "com.microsoft",
    "com.microsoft.nchwc", "com.microsoft.experimental", "com.ms.internal.nhwc",
})
# Above this the protobuf cannot hold the weights inline.
PROTOBUF_LIMIT = 2**31 - 1
# A single tensor larger than this is not a model we can hold in memory; refuse before allocating.
MAX_TENSOR_BYTES = 1 << 36
# A cycle longer than this is shortened in the error message.
CYCLE_NODES_SHOWN = 8
# IR 3 lists every initializer as a graph input as well; IR 4 made that optional.
_FIRST_IR_WITHOUT_INITIALIZER_INPUTS = 4


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read and validate an ONNX file, with its external data; raise ModelError if unsafe or malformed."""
    path = Path(path)
    model = _read(path)
    _load_external_data(path, model, _all_tensors(model))
    _check_schema(path, model)
    node_check.check(path, model)
    return model


def load(path: str | os.PathLike) -> ModelGraph:
    """Load a validated model as a `ModelGraph`, with Constant-node weights turned into initializers
    and the weights in external data mapped from their files rather than read."""
    path = Path(path)
    model = _read(path)
    _load_external_data(path, model, _unmapped_tensors(model))
    _check_schema(path, model)
    node_check.check(path, model)
    props = dataclasses.replace(ModelProps.of(model), source=str(path))
    try:
        graph = gs.import_onnx(model)
        constant_nodes_to_initializers(graph)
        _detach_from_proto(graph, external.Mapped(path))
    except Exception as e:  # noqa: BLE001 - graphsurgeon has no error type; the file is still at fault
        raise ModelError(path, f"cannot import the graph ({type(e).__name__}: {e})") from None
    note = _raise_old_ir_version(graph)
    return ModelGraph.adopt(graph, dataclasses.replace(props, notes=(note,)) if note else props)


def _read(path: Path) -> onnx.ModelProto:
    """The parsed model, every tensor's size and external data checked but not read; the schema
    check follows once the tensors the checker reads (attributes, subgraphs) are loaded."""
    model = _parse(path)
    _check_header(path, model)
    _check_domains(path, model)
    for graph in _all_graphs(model.graph):
        for tensor, node in _graph_tensors(graph):
            _check_tensor(path, tensor, node)
        _check_acyclic(path, graph)
        _sort_nodes(graph)
    for tensor, node in _function_tensors(model):
        _check_tensor(path, tensor, node)
    return model


def _sort_nodes(graph: onnx.GraphProto) -> None:
    """Put an acyclic graph's nodes in an order where each follows its producers, keeping the
    file's order where it already does: onnxruntime runs unsorted models, the checker refuses them."""
    produced = {name: i for i, node in enumerate(graph.node) for name in node.output if name}
    placed: set[int] = set()
    order: list[int] = []

    def place(i: int) -> None:
        # Depth-first over producers in this graph (names from outside it are available already).
        stack = [(i, False)]
        while stack:
            j, expanded = stack.pop()
            if j in placed:
                continue
            if expanded:
                placed.add(j)
                order.append(j)
                continue
            stack.append((j, True))
            for name in reversed(list(graph.node[j].input)):
                k = produced.get(name)
                if k is not None and k not in placed:
                    stack.append((k, False))

    for i in range(len(graph.node)):
        place(i)
    if order != list(range(len(graph.node))):
        nodes = [graph.node[i] for i in order]
        copies = [onnx.NodeProto() for _ in nodes]
        for copy, node in zip(copies, nodes):
            copy.CopyFrom(node)
        del graph.node[:]
        graph.node.extend(copies)


def _unmapped_tensors(model: onnx.ModelProto):
    """The tensors `load` reads into the proto: all but the main graph's initializers of a type
    numpy holds, which it maps from their files."""
    main, *subgraphs = _all_graphs(model.graph)
    for t, node in _graph_tensors(main):
        if node is not None or t.data_type not in _NATIVE:
            yield t
    for graph in subgraphs:
        for t, _ in _graph_tensors(graph):
            yield t
    for t, _ in _function_tensors(model):
        yield t


def _detach_from_proto(graph: gs.Graph, mapped: external.Mapped) -> None:
    """Let the parsed file be freed: graphsurgeon keeps the opset entries and the weights as views
    of the loaded ModelProto, which would keep a second copy of every weight alive. Weights still
    in external data become views of their mapped file."""
    graph.import_domains = [onnx.helper.make_opsetid(d.domain, d.version) for d in graph.import_domains or []]
    for t in graph.tensors().values():
        # Other types (strings, sub-byte, float8) would not export as they came; they stay protos.
        if isinstance(t, gs.Constant) and isinstance(t._values, LazyValues) and t._values.tensor.data_type in _NATIVE:
            proto = t._values.tensor
            if external_data_helper.uses_external_data(proto):
                t.values = mapped.array(proto)
                t.data_location = None  # the values are in memory now; export must not say "external"
            else:
                t.values = t._values.load()


def _raise_old_ir_version(graph: gs.Graph) -> str | None:
    """IR 3 requires every initializer to be a graph input too. graphsurgeon imports initializers
    as weights, not inputs, so a model saved at IR 3 would fail the checker (and a pass that adds a
    weight would break it); the IR version is raised instead. Returns what was done."""
    old = graph.ir_version
    if old is None or old >= _FIRST_IR_WITHOUT_INITIALIZER_INPUTS:
        return None
    graph.ir_version = max(_FIRST_IR_WITHOUT_INITIALIZER_INPUTS, min_ir_version(graph.import_domains))
    return (f"IR version {old} raised to {graph.ir_version}: initializers are no longer also listed "
            "as graph inputs")


_NATIVE = frozenset(getattr(onnx.TensorProto, n) for n in (
    "FLOAT", "DOUBLE", "FLOAT16", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "BOOL"))


def save(model: onnx.ModelProto | gs.Graph, path: str | os.PathLike) -> Path:
    """Write atomically: to a temporary file beside `path`, then rename.

    Models over 2 GB get their weights in `<name>.data` beside the model, renamed into place
    before the model so a reader never sees a model whose data is missing. A graph is written a
    weight at a time, never as one ModelProto.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        staged = Path(tmp) / path.name
        data = staged.with_name(path.name + ".data")
        if isinstance(model, gs.Graph):
            stream.write(model, staged, data if _weight_bytes(model) >= PROTOBUF_LIMIT - (1 << 24) else None)
        elif _over_limit(model):
            # onnx moves the weights out of the proto it writes; the caller's model stays whole.
            _save_external(_copy(model), staged)
        else:
            onnx.save_model(model, str(staged))
        if data.exists():  # absent when no tensor reached the size threshold for external data
            os.replace(data, path.with_name(data.name))
        os.replace(staged, path)
    return path


def _over_limit(model: onnx.ModelProto) -> bool:
    try:
        return model.ByteSize() > PROTOBUF_LIMIT - (1 << 20)
    except EncodeError:  # protobuf cannot even size a message over 2 GB: it serializes to count
        return True


def _weight_bytes(graph: gs.Graph) -> int:
    return sum(constant_nbytes(t) for t in graph.tensors().values() if isinstance(t, gs.Constant))


def _save_external(model: onnx.ModelProto, staged: Path) -> None:
    onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=staged.name + ".data", size_threshold=1024)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _parse(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise ModelError(path, "no such file")
    if not path.is_file():
        raise ModelError(path, "not a file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ModelError(path, f"cannot read the file ({e.strerror})") from None
    if not data:
        raise ModelError(path, "file is empty")
    try:
        # Always binary: onnx.load_model would pick a text or JSON parser from the file's extension.
        return onnx.load_model_from_string(data, format="protobuf")
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ModelError(path, f"not an ONNX model, or a truncated one (protobuf parse failed: {e})"
                         ) from None


def _check_header(path: Path, model: onnx.ModelProto) -> None:
    if model.ir_version <= 0:
        raise ModelError(path, "not an ONNX model (no ir_version)")
    if not model.HasField("graph") or not model.graph.output:
        raise ModelError(path, "not an ONNX model (no graph with outputs)")
    if not model.opset_import:
        raise ModelError(path, "model declares no opset_import")


def _domain(name: str) -> str:
    # ONNX spells the default domain both "" and "ai.onnx".
    return "" if name == "ai.onnx" else name


def _check_domains(path: Path, model: onnx.ModelProto) -> None:
    """Every node's domain is imported, and known to a runtime or defined by the model's functions;
    a domain declared but used by no node is harmless and stays."""
    local = {f.domain for f in model.functions}
    scopes = [(model.opset_import, [n for g in _all_graphs(model.graph) for n in g.node])]
    scopes += [(f.opset_import, f.node) for f in model.functions]
    for imports, nodes in scopes:
        imported = {_domain(o.domain) for o in imports}
        for node in nodes:
            domain = _domain(node.domain)
            if domain not in imported:
                raise ModelError(path, f"op {node.op_type} uses domain '{node.domain}' "
                                 "which the model does not import", node.name or node.op_type)
            if domain not in KNOWN_DOMAINS and domain not in local:
                raise ModelError(path, f"op {node.op_type} is in unknown opset domain '{node.domain}', which no "
                                 f"runtime implements (known: {', '.join(sorted({d or 'ai.onnx' for d in KNOWN_DOMAINS}))})",
                                 node.name or node.op_type)


def _check_tensor(path: Path, t: onnx.TensorProto, node: onnx.NodeProto | None) -> None:
    """Check one tensor's declared size against its data; `node` holds it as an attribute, if any."""
    if isinstance(t.name, bytes):
        # protobuf hands back strings that are not valid UTF-8 as bytes.
        raise ModelError(path, f"tensor name {t.name!r} is not valid UTF-8",
                         None if node is None else node.name)
    if node is None:
        return _check_tensor_data(path, t, f"initializer '{t.name}'")
    try:
        _check_tensor_data(path, t, f"tensor '{t.name}'" if t.name else f"{node.op_type} attribute tensor")
    except ModelError as e:
        # Named by its node, since a Constant's value tensor usually has no name of its own.
        raise ModelError(path, e.what, node.name or node.op_type) from None


def _check_tensor_data(path: Path, t: onnx.TensorProto, label: str) -> None:
    if any(d < 0 for d in t.dims):
        raise ModelError(path, f"{label} has negative dims {list(t.dims)}")
    if t.data_type not in onnx.TensorProto.DataType.values() or t.data_type == onnx.TensorProto.UNDEFINED:
        raise ModelError(path, f"{label} has invalid data type {t.data_type}")
    count = math.prod(t.dims)
    in_file = external_data_helper.uses_external_data(t)
    if t.data_type == onnx.TensorProto.STRING:
        if in_file:
            raise ModelError(path, f"{label} keeps strings in external data, which ONNX does not allow")
        if len(t.string_data) != count:
            raise ModelError(path, f"{label} declares {count} strings but holds {len(t.string_data)}")
        return
    nbytes = _declared_nbytes(t, count)
    if nbytes > MAX_TENSOR_BYTES:
        raise ModelError(path, f"{label} declares {nbytes} bytes, over the {MAX_TENSOR_BYTES}-byte limit")
    if in_file:
        external.check(path, t, label, nbytes)
    elif t.HasField("raw_data"):
        if len(t.raw_data) != nbytes:
            raise ModelError(path, f"{label} declares shape {list(t.dims)} ({nbytes} bytes) "
                             f"but holds {len(t.raw_data)} bytes")
    else:
        held = len(getattr(t, onnx.helper.tensor_dtype_to_field(t.data_type)))
        if held not in _expected_values(t, count):
            raise ModelError(path, f"{label} declares shape {list(t.dims)} ({count} elements) "
                             f"but holds {held} values")


_COMPLEX = (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128)
# Bits per element of the types that raw_data stores packed, several to a byte.
_PACKED_BITS = {getattr(onnx.TensorProto, n): bits for n, bits in (
    ("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2),
    ("FLOAT6E2M3", 6), ("FLOAT6E3M2", 6)) if hasattr(onnx.TensorProto, n)}


def _declared_nbytes(t: onnx.TensorProto, count: int) -> int:
    bits = _PACKED_BITS.get(t.data_type)
    if bits:
        return -(-count * bits // 8)
    return count * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def _expected_values(t: onnx.TensorProto, count: int) -> tuple[int, ...]:
    bits = _PACKED_BITS.get(t.data_type)
    if bits in (2, 4):
        # int32_data packs these a byte per entry; one value per entry is accepted as well.
        return (-(-count * bits // 8), count)
    return (count * (2 if t.data_type in _COMPLEX else 1),)


def _load_external_data(path: Path, model: onnx.ModelProto, tensors) -> None:
    """Read the external data of `tensors` into the model; every location and size was checked
    before, so this reads only what was declared."""
    root = str(path.parent.resolve())
    try:
        for t in tensors:
            if external_data_helper.uses_external_data(t):
                external_data_helper.load_external_data_for_tensor(t, root)
                t.data_location = onnx.TensorProto.DEFAULT
                del t.external_data[:]
    except (OSError, ValueError, onnx.checker.ValidationError) as e:
        # onnx checks each path again as it opens it; only a file changed since ours gets here.
        raise ModelError(path, f"cannot read external data ({e})") from None


def _check_acyclic(path: Path, graph: onnx.GraphProto) -> None:
    cycle = find_cycle(graph)
    if cycle:
        shown = cycle[:CYCLE_NODES_SHOWN] + (["..."] if len(cycle) > CYCLE_NODES_SHOWN else [])
        raise ModelError(path, f"graph '{graph.name}' has a cycle: {' -> '.join(shown)} -> {cycle[0]}",
                         cycle[0])


def _check_schema(path: Path, model: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(skeleton(model))
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0]
        node = _node_named_in(str(e))
        raise ModelError(path, f"fails the ONNX checker: {first}", node) from None
    except UnicodeDecodeError:
        # The checker quotes the offending name, which protobuf let through undecoded.
        raise ModelError(path, "fails the ONNX checker on a name that is not valid UTF-8") from None


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
    """(tensor, the node holding it as an attribute or None for an initializer)."""
    for t in graph.initializer:
        yield t, None
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto):
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.TENSOR:
            yield attr.t, node
        elif attr.type == onnx.AttributeProto.TENSORS:
            for t in attr.tensors:
                yield t, node


def _all_tensors(model: onnx.ModelProto):
    for graph in _all_graphs(model.graph):
        for t, _ in _graph_tensors(graph):
            yield t
    for t, _ in _function_tensors(model):
        yield t


def _function_tensors(model: onnx.ModelProto):
    """(tensor, node) for the attribute tensors of model-local functions' nodes and of the
    subgraphs inside them: checked and read like the main graph's, relative to the model's folder."""
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)
            for attr in node.attribute:
                subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
                for sub in subgraphs:
                    for graph in _all_graphs(sub):
                        yield from _graph_tensors(graph)
