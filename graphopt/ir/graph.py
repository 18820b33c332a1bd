"""Helpers over `gs.Graph`: constants, producers and consumers, shapes, cheap model skeletons, and
the model's own data (metadata, doc strings, producer) that graphsurgeon's import would drop."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import external_data_helper, numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

# Initializers with more elements than this are left out of skeletons: checking and shape inference
# read only their dims, and copying 100 MB of weights per pass would dominate the pass time.
SKELETON_MAX_ELEMENTS = 4096


# Model-local functions came with IR version 8.
_FUNCTIONS_IR_VERSION = 8


@dataclass(frozen=True)
class ModelProps:
    """What a ModelProto holds beside its graph and opsets, which graphsurgeon does not keep:
    a Paddle recognizer's character dictionary lives in `metadata`, and its application cannot
    load a model without it. `notes` says what loading changed deliberately (an IR version);
    `source` is the file it came from, for error messages."""
    doc_string: str = ""
    domain: str = ""
    model_version: int = 0
    metadata: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = ()
    source: str = ""

    @classmethod
    def of(cls, model: onnx.ModelProto) -> "ModelProps":
        return cls(model.doc_string, model.domain, model.model_version,
                   tuple((p.key, p.value) for p in model.metadata_props))

    def apply(self, model: onnx.ModelProto) -> None:
        model.doc_string, model.domain, model.model_version = self.doc_string, self.domain, self.model_version
        del model.metadata_props[:]
        for key, value in self.metadata:
            model.metadata_props.add(key=key, value=value)


class ModelGraph(gs.Graph):
    """A `gs.Graph` that carries its model's `ModelProps` and producer through `copy()`, which
    graphsurgeon's own copy drops, so every model exported from it is the user's model."""

    props: ModelProps = ModelProps()

    @classmethod
    def adopt(cls, graph: gs.Graph, props: ModelProps) -> "ModelGraph":
        """`graph`'s nodes and tensors (not copies) as a ModelGraph."""
        out = cls(nodes=graph.nodes, inputs=graph.inputs, outputs=graph.outputs, name=graph.name,
                  doc_string=graph.doc_string, opset=graph.opset, import_domains=graph.import_domains,
                  producer_name=graph.producer_name, producer_version=graph.producer_version,
                  functions=graph.functions, ir_version=graph.ir_version)
        out.props = props
        return out

    def copy(self, tensor_map=None) -> "ModelGraph":
        plain = super().copy(tensor_map)
        plain.producer_name, plain.producer_version = self.producer_name, self.producer_version
        return ModelGraph.adopt(plain, self.props)


def export(graph: gs.Graph) -> onnx.ModelProto:
    """gs.Graph -> ModelProto; intermediate tensors need no declared types. A ModelGraph gets its
    model's own data back, and the IR version is raised where the opsets or functions need it."""
    model = gs.export_onnx(graph, do_type_check=False)
    if isinstance(graph, ModelGraph):
        graph.props.apply(model)
    model.ir_version = max(model.ir_version, min_ir_version(model.opset_import, bool(model.functions)))
    return model


def min_ir_version(opset_imports, functions: bool = False) -> int:
    """The lowest IR version that can carry these opsets (and model-local functions)."""
    needed = onnx.helper.find_min_ir_version_for(list(opset_imports), ignore_unknown=True)
    return max(needed, _FUNCTIONS_IR_VERSION if functions else 0)


def constant_values(name: str, values) -> np.ndarray | LazyValues:
    """Values a `gs.Constant` can export. graphsurgeon writes numpy arrays as raw bytes, which
    cannot hold strings, so string tensors are kept as a TensorProto."""
    if isinstance(values, LazyValues):
        return values
    arr = np.asarray(values)
    if arr.dtype.kind in "OUS":
        return LazyValues(numpy_helper.from_array(arr.astype(object), name))
    return np.asarray(arr, order="C")  # np.ascontiguousarray would make a scalar 1-D


def constant_nbytes(tensor: gs.Constant) -> int:
    """Bytes a constant holds, without unpacking lazily loaded (possibly sub-byte) values."""
    return int(tensor._values.nbytes)  # both numpy arrays and LazyValues know their size


def const_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor (initializer or Constant-node output), else None."""
    if isinstance(tensor, gs.Constant):
        return tensor.values
    return None


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for t in graph.outputs)


def is_graph_input(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for t in graph.inputs)


def attr(node: gs.Node, name: str, default=None):
    return node.attrs.get(name, default)


def opset(graph: gs.Graph) -> int:
    """The default-domain opset version the graph declares."""
    for o in graph.import_domains or []:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return graph.opset


def np_dtype(dtype) -> np.dtype:
    """A tensor's dtype as numpy's; graphsurgeon keeps the ONNX type number for the types numpy
    lacks (bfloat16, float8, int4), which `np.dtype` cannot read."""
    if isinstance(dtype, (int, np.integer)):
        return onnx.helper.tensor_dtype_to_np_dtype(int(dtype))
    return np.dtype(dtype)


def static_shape(tensor: gs.Tensor) -> tuple[int, ...] | None:
    """The shape when every dimension is a known integer, else None."""
    shape = tensor.shape
    if shape is None or any(not isinstance(d, (int, np.integer)) or d < 0 for d in shape):
        return None
    return tuple(int(d) for d in shape)


def constant_nodes_to_initializers(graph: gs.Graph) -> int:
    """Turn `Constant` nodes (as Paddle and some exporters write weights) into initializers.

    Outputs that are graph outputs stay produced by a node, since an output that is an
    initializer is rejected by some runtimes. Returns how many nodes were converted.
    """
    converted = 0
    outputs = {id(t) for t in graph.outputs}
    for node in graph.nodes:
        if node.op != "Constant" or node.domain not in ("", "ai.onnx", None) or id(node.outputs[0]) in outputs:
            continue
        value = _constant_attr_value(node)
        if value is None:
            continue
        out = node.outputs[0]
        node.outputs.clear()
        out.to_constant(value)
        converted += 1
    if converted:
        graph.cleanup(remove_unused_graph_inputs=False)
    return converted


def _constant_attr_value(node: gs.Node) -> np.ndarray | LazyValues | None:
    a = node.attrs
    if isinstance(a.get("value"), gs.Constant):
        return a["value"]._values  # as loaded: a string or sub-byte tensor must not go through numpy
    scalars = {"value_float": np.float32, "value_int": np.int64}
    lists = {"value_floats": np.float32, "value_ints": np.int64}
    for key, dtype in scalars.items():
        if key in a:
            return np.array(a[key], dtype=dtype)
    for key, dtype in lists.items():
        if key in a:
            return np.array(list(a[key]), dtype=dtype)
    return None  # sparse_value and string values are left as nodes


def find_cycle(graph: onnx.GraphProto) -> list[str]:
    """Names of the nodes on one dependency cycle, in data-flow order, or [] if the graph is acyclic."""
    deps = _node_deps(graph)
    left = _unsortable(deps)
    if not left:
        return []
    # Every node Kahn's algorithm leaves behind waits on another one left behind, so walking back
    # along those dependencies must come round to a node already seen: from there on it is a cycle.
    seen: dict[int, int] = {}
    i = min(left)
    while i not in seen:
        seen[i] = len(seen)
        i = min(d for d in deps[i] if d in left)
    cycle = list(reversed(list(seen)[seen[i]:]))
    first = cycle.index(min(cycle))  # start where the file does, so the message reads in file order
    return [graph.node[j].name or f"#{j}:{graph.node[j].op_type}" for j in cycle[first:] + cycle[:first]]


def _node_deps(graph: onnx.GraphProto) -> list[set[int]]:
    """For each node, the indices of the nodes in this graph that produce its inputs."""
    producers = {}
    for i, node in enumerate(graph.node):
        for out in node.output:
            if out:
                producers[out] = i
    return [{producers[x] for x in node.input if x in producers} for node in graph.node]


def _unsortable(deps: list[set[int]]) -> set[int]:
    """Nodes Kahn's algorithm cannot order: those on a cycle or downstream of one."""
    users: list[list[int]] = [[] for _ in deps]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    pending = [len(d) for d in deps]
    ready = [i for i, n in enumerate(pending) if n == 0]
    while ready:
        for u in users[ready.pop()]:
            pending[u] -= 1
            if pending[u] == 0:
                ready.append(u)
    return {i for i, n in enumerate(pending) if n}


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose large initializers are graph inputs of the same type and shape.

    Enough for onnx.checker and shape inference, at the cost of the graph structure only.
    """
    g = model.graph
    input_names = {i.name for i in g.input}
    small, big_inputs = [], []
    for t in g.initializer:
        count = int(np.prod(t.dims)) if t.dims else 1
        if count <= SKELETON_MAX_ELEMENTS and not external_data_helper.uses_external_data(t):
            small.append(t)
        elif t.name not in input_names:
            big_inputs.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    graph = onnx.helper.make_graph(g.node, g.name, list(g.input) + big_inputs, g.output,
                                   initializer=small, value_info=g.value_info,
                                   sparse_initializer=g.sparse_initializer)
    out = onnx.helper.make_model(graph, opset_imports=model.opset_import, functions=model.functions)
    out.ir_version = model.ir_version
    return out


def without_large_weights(graph: gs.Graph, more_than: int) -> tuple[gs.Graph, list[gs.Variable]]:
    """A copy of `graph` whose constants of more than `more_than` elements are typed variables,
    and those variables. graphsurgeon's copy shares weight arrays, so this costs the structure only."""
    return without_weights(graph, lambda t: int(np.prod(t.shape, dtype=np.int64)) > more_than)


def without_weights(graph: gs.Graph, select: Callable[[gs.Constant], bool]) -> tuple[gs.Graph, list[gs.Variable]]:
    """`without_large_weights` for the constants `select` picks."""
    light = graph.copy()
    converted = []
    for t in list(light.tensors().values()):
        if isinstance(t, gs.Constant) and select(t):
            t.to_variable(dtype=t.dtype, shape=list(t.shape))
            t.type = "tensor_type"  # graphsurgeon leaves a converted constant without a type kind
            converted.append(t)
    return light, converted


def skeleton_of(graph: gs.Graph) -> onnx.ModelProto:
    """`skeleton(export(graph))` without exporting the weights it would throw away."""
    light, converted = without_large_weights(graph, SKELETON_MAX_ELEMENTS)
    inputs = {id(t) for t in light.inputs}
    light.inputs.extend(t for t in converted if id(t) not in inputs)
    return export(light)


def infer_shapes(graph: gs.Graph) -> gs.Graph:
    """Fill dtypes and shapes of the graph's variables by ONNX shape inference (with data propagation)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton_of(graph), data_prop=True)
    except onnx.shape_inference.InferenceError:
        # Strict inference fails on some valid graphs; a partial answer is still useful.
        return graph
    known = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or tt.elem_type == 0:
            continue
        shape = None
        if tt.HasField("shape"):
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        known[vi.name] = (onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type), shape)
    for name, tensor in graph.tensors().items():
        if isinstance(tensor, gs.Variable) and name in known:
            dtype, shape = known[name]
            tensor.dtype = tensor.dtype or dtype
            if shape is not None:
                tensor.shape = shape
    return graph


def unique_name(existing: set[str], prefix: str) -> str:
    """`prefix`, or `prefix_N` for the first N that is free; records the name as taken."""
    name, n = prefix, 0
    while name in existing:
        n += 1
        name = f"{prefix}_{n}"
    existing.add(name)
    return name
