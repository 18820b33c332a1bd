"""Write a `gs.Graph` as an ONNX file one weight at a time.

`gs.export_onnx` copies every weight twice into one ModelProto and serialising copies it again,
so saving a model needed about four times its size. Protobuf merges repeated occurrences of an
embedded message field, so the file can be written as the model without its large weights,
followed by one small GraphProto record per weight: readers see a single graph. Peak memory is
the structure plus the largest weight.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from graphopt.ir.graph import export, without_large_weights

_MODEL_GRAPH = 7       # ModelProto.graph
_GRAPH_INITIALIZER = 5  # GraphProto.initializer
# Weights smaller than this stay in the structure record; streaming them gains nothing.
STREAM_MIN_ELEMENTS = 1024


def write(graph: gs.Graph, path: Path) -> None:
    structure, weights = _split(graph)
    graph_bytes = structure.graph.SerializeToString()
    structure.ClearField("graph")
    with open(path, "wb") as f:
        f.write(structure.SerializeToString())
        f.write(_field(_MODEL_GRAPH, graph_bytes))
        for tensor in weights:
            f.write(_field(_MODEL_GRAPH, _field(_GRAPH_INITIALIZER, _tensor_proto(tensor).SerializeToString())))


def _split(graph: gs.Graph) -> tuple[onnx.ModelProto, list[gs.Constant]]:
    """The exported model without its large weights, and those weights (of `graph`, not a copy)."""
    light, converted = without_large_weights(graph, STREAM_MIN_ELEMENTS - 1)
    originals = graph.tensors()
    streamed = [originals[t.name] for t in converted]
    model = export(light)
    names = {t.name for t in streamed}
    kept = [vi for vi in model.graph.value_info if vi.name not in names]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    return model, streamed


def _tensor_proto(t: gs.Constant) -> onnx.TensorProto:
    if isinstance(t._values, LazyValues):  # still the proto it was loaded from: no copy
        proto = t._values.tensor
        proto.name = t.name
        return proto
    return numpy_helper.from_array(np.asarray(t.values), t.name)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)
