"""Tiny hand-written models for pass tests: a few nodes, named inputs and weights."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def node(op: str, inputs: list[str], outputs: list[str], name: str | None = None, **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, outputs, name=name or f"{op.lower()}_{outputs[0]}", **attrs)


def model(nodes: list[onnx.NodeProto], inputs: dict[str, tuple], outputs: dict[str, tuple | None],
          weights: dict[str, np.ndarray] | None = None, opset: int = 17,
          dtype: int = onnx.TensorProto.FLOAT) -> onnx.ModelProto:
    """A checked ModelProto; inputs and outputs are float32 with the given shapes (None = inferred)."""
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info(k, dtype, list(v)) for k, v in inputs.items()],
        [helper.make_tensor_value_info(k, dtype, None if v is None else list(v)) for k, v in outputs.items()],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in (weights or {}).items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    # The checker wants a shape on every graph output; shape inference supplies the ones left open.
    m = onnx.shape_inference.infer_shapes(m)
    onnx.checker.check_model(m)
    return m


def with_dims(model: onnx.ModelProto, dims: list) -> onnx.ModelProto:
    """A copy of `model` with its first input's dims replaced (str: symbolic, as dynamic-shape
    exporters write them) and no stale value_info."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for d, new in zip(model.graph.input[0].type.tensor_type.shape.dim, dims):
        d.Clear()
        if isinstance(new, str):
            d.dim_param = new
        else:
            d.dim_value = new
    del model.graph.value_info[:]
    return model
