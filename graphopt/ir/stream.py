"""Write a `gs.Graph` as an ONNX file one weight at a time, inline or with external data.

`gs.export_onnx` copies every weight twice into one ModelProto and serialising copies it again,
so saving a model needed about four times its size, and one over 2 GB could not be serialised at
all. Protobuf merges repeated occurrences of an embedded message field, so the file can be written
as the model without its large weights, followed by one small GraphProto record per weight:
readers see a single graph. A weight's bytes go to the file straight from its numpy array (often
a view of the input's mapped external data), so peak memory is the structure alone.
"""
from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from graphopt.ir.graph import export, without_large_weights

_MODEL_GRAPH = 7        # ModelProto.graph
_GRAPH_INITIALIZER = 5  # GraphProto.initializer
_TENSOR_RAW_DATA = 9    # TensorProto.raw_data
# Weights smaller than this stay in the structure record; streaming them gains nothing.
STREAM_MIN_ELEMENTS = 1024
# Weights in external data start at multiples of this, so that readers can map them in place.
ALIGNMENT = 4096

# zlib returns what it compressed so far with each call: fed in slices, its output stays small.
_COMPRESS_SLICE = 1 << 22

Piece = bytes | memoryview


def write(graph: gs.Graph, path: Path, data: Path | None = None) -> None:
    """Write `graph` to `path`; with `data`, its large weights go to that file (beside `path`) as
    external data, aligned, and the model names it by its file name."""
    with open(path, "wb") as f:
        if data is None:
            for piece in chunks(graph):
                f.write(piece)
            return
        with open(data, "wb") as out:
            for piece in _external_chunks(graph, out, data.name):
                f.write(piece)


def chunks(graph: gs.Graph) -> Iterator[Piece]:
    """The model as `write` puts it in one file, piece by piece; no piece copies a weight."""
    structure, weights = _split(graph)
    yield from _structure(structure)
    for t in weights:
        header, raw = _parts(t)
        yield _record(header, raw.nbytes)
        yield raw


def size(graph: gs.Graph) -> int:
    """The bytes `chunks` yields, counted without reading any weight."""
    structure, weights = _split(graph)
    total = sum(len(p) for p in _structure(structure))
    for t in weights:
        header, nbytes = _header(t)
        total += len(_record(header, nbytes)) + nbytes
    return total


def compressed_size(graph: gs.Graph, level: int = 6) -> int:
    """The size of the inline file after zlib at `level` (gzip's default is 6), compressed piece by
    piece so that memory stays at one weight's worth of output buffer."""
    compressor = zlib.compressobj(level)
    total = 0
    for piece in chunks(graph):
        view = memoryview(piece)
        for start in range(0, len(view), _COMPRESS_SLICE):
            total += len(compressor.compress(view[start:start + _COMPRESS_SLICE]))
    return total + len(compressor.flush())


def _external_chunks(graph: gs.Graph, out: BinaryIO, location: str) -> Iterator[Piece]:
    structure, weights = _split(graph)
    yield from _structure(structure)
    for t in weights:
        header, raw = _parts(t)
        if not raw.nbytes:  # a proto that holds its data itself (a string or sub-byte type) stays inline
            yield _field(_MODEL_GRAPH, _field(_GRAPH_INITIALIZER, header))
            continue
        out.write(b"\0" * (-out.tell() % ALIGNMENT))
        proto = onnx.TensorProto()
        proto.ParseFromString(header)
        proto.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", str(out.tell())), ("length", str(raw.nbytes))):
            proto.external_data.add(key=key, value=value)
        out.write(raw)
        yield _field(_MODEL_GRAPH, _field(_GRAPH_INITIALIZER, proto.SerializeToString()))


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


def _structure(model: onnx.ModelProto) -> list[bytes]:
    graph_bytes = model.graph.SerializeToString()
    model.ClearField("graph")
    return [model.SerializeToString(), _field(_MODEL_GRAPH, graph_bytes)]


def _header(t: gs.Constant) -> tuple[bytes, int]:
    """A weight's TensorProto without its raw_data, and how many bytes of raw_data follow."""
    if isinstance(t._values, LazyValues):  # kept as the proto it was loaded from
        return _lazy_proto(t).SerializeToString(), 0
    arr = t._values
    proto = onnx.TensorProto(name=t.name, dims=arr.shape,
                             data_type=onnx.helper.np_dtype_to_tensor_dtype(arr.dtype))
    return proto.SerializeToString(), arr.nbytes


def _parts(t: gs.Constant) -> tuple[bytes, memoryview]:
    """`_header`, and the raw bytes: a view of the array, copied only if it is not contiguous."""
    header, _ = _header(t)
    if isinstance(t._values, LazyValues):
        return header, memoryview(b"")
    arr = np.asarray(t._values)
    # ONNX raw data is little-endian whatever the machine.
    flat = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False)).reshape(-1)
    return header, memoryview(flat.view(np.uint8))


def _lazy_proto(t: gs.Constant) -> onnx.TensorProto:
    proto = t._values.tensor
    proto.name = t.name
    return proto


def _record(header: bytes, raw_nbytes: int) -> bytes:
    """One weight's record up to its raw data, which the caller writes next (none for a proto
    that holds its data itself)."""
    raw_key = _key(_TENSOR_RAW_DATA) + _varint(raw_nbytes) if raw_nbytes else b""
    tensor_len = len(header) + len(raw_key) + raw_nbytes
    initializer = _key(_GRAPH_INITIALIZER) + _varint(tensor_len)
    return _key(_MODEL_GRAPH) + _varint(len(initializer) + tensor_len) + initializer + header + raw_key


def _field(number: int, payload: bytes) -> bytes:
    return _key(number) + _varint(len(payload)) + payload


def _key(number: int) -> bytes:
    return _varint(number << 3 | 2)  # wire type 2: length-delimited


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)
