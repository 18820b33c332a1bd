"""Host-side input encoders: the string lookups at a model's inputs, run by the loader on the host.

TVM holds no string tensors, so a model that takes strings (a phoneme sequence, a category) and
turns them into numbers with ai.onnx.ml LabelEncoder or CategoryMapper cannot be compiled whole.
`split` takes every such lookup that reads a string graph input, or the strings another such
lookup produced (a string -> string LabelEncoder before a string -> int64 one), out of the model:
the library is compiled from the rest and takes the numbers in the strings' place, one argument
per lookup that yields numbers, named after its output tensor, with the string input's shape.
Each lookup is an `Encoder` (its table: keys, values, default) that the manifest records under
"host_encoders" and `graphopt.codegen.load(lib).run(feeds)` applies to the strings before it
calls the library, so a user feeds the strings exactly as onnxruntime takes them. Any other op
that reads strings is refused with a CodegenError naming it.

Guaranteed: a lookup computes what onnxruntime computes (first value of a repeated key; ONNX's
defaults), elementwise, so the encoded tensor has the strings' shape. Verified by
tests/codegen/test_host_encoders.py, which compiles models with string inputs and compares the
library's outputs, strings in, with onnxruntime's.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from graphopt.codegen import label_tables
from graphopt.codegen.label_tables import Table
from graphopt.ir.errors import CodegenError, DataError

STRING = label_tables.STRING_KIND


@dataclass(frozen=True)
class Encoder:
    """One lookup the loader runs on the host: `input`'s strings -> `output` by `table`."""
    op: str
    node: str
    input: str
    output: str
    table: Table

    @property
    def dtype(self) -> str:
        return self.table.value_dtype

    def apply(self, strings: np.ndarray) -> np.ndarray:
        """`table` applied to each element of `strings` (str or UTF-8 bytes)."""
        found, default = self._lookup, self.table.default
        flat = [found.get(_text(s), default) for s in np.asarray(strings).reshape(-1).tolist()]
        out = np.empty(len(flat), object) if self.dtype == STRING else np.asarray(flat, self.dtype)
        if self.dtype == STRING:
            out[:] = flat
        return out.reshape(np.shape(strings))

    def describe(self) -> str:
        """One line saying what runs on the host."""
        return (f"{self.op} '{self.node}' ('{self.input}', {len(self.table.keys)} strings -> '{self.output}', "
                f"{self.dtype}, default {_plain(self.table.default)!r}) runs on the host, in "
                "graphopt.codegen.load(...).run, before the library")

    def to_json(self) -> dict:
        return {"op": self.op, "node": self.node, "input": self.input, "output": self.output,
                "dtype": self.dtype, "keys": self.table.keys.tolist(), "values": self.table.values.tolist(),
                "default": _plain(self.table.default), "note": self.describe()}

    @classmethod
    def from_json(cls, data: Mapping) -> Encoder:
        values = _column(data["values"], data["dtype"])
        default = data["default"] if data["dtype"] == STRING else values.dtype.type(data["default"])
        table = Table(_column(data["keys"], STRING), values, default)
        return cls(data["op"], data["node"], data["input"], data["output"], table)

    @functools.cached_property
    def _lookup(self) -> dict:
        return dict(zip(self.table.keys.tolist(), self.table.values.tolist()))


@dataclass(frozen=True)
class Split:
    """A model with its host-side encoders taken out, and those encoders in the order they run."""
    model: onnx.ModelProto
    encoders: tuple[Encoder, ...]
    string_inputs: tuple[str, ...]

    def library_shapes(self, shapes: Mapping[str, Sequence[int]] | None) -> dict[str, Sequence[int]]:
        """`shapes` (by the model's input names) by the library's: an encoded input's shape is its
        strings' shape."""
        out = {}
        for name, shape in (shapes or {}).items():
            for argument in self.arguments_of(name):
                out[argument] = shape
        return out

    def arguments_of(self, name: str) -> list[str]:
        """The library's arguments that model input `name` becomes."""
        return encoded_arguments(self.encoders, name) if name in self.string_inputs else [name]

    def user_inputs(self, names: Sequence[str], library_specs: Sequence[dict]) -> list[dict]:
        """The model's inputs `names` as the loader takes them, from the library's input specs: a
        string input has its encoded arguments' shape and dtype "string"."""
        by_name = {s["name"]: s for s in library_specs}
        out = []
        for name in names:
            if name in self.string_inputs:
                first = by_name[self.arguments_of(name)[0]]
                out.append({"name": name, "shape": first["shape"], "dtype": STRING})
            else:
                out.append(by_name[name])
        return out


def split(model: onnx.ModelProto) -> Split:
    """`model` without the lookups that run on the host; `model` itself when it takes no strings."""
    strings = [i.name for i in model.graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.STRING]
    if not strings:
        return Split(model, (), ())
    encoders = _encoders(model.graph, strings)
    for name in strings:
        if not encoded_arguments(encoders, name):
            raise CodegenError(f"input '{name}' holds strings and no LabelEncoder or CategoryMapper turns them "
                               "into numbers; TVM holds no strings, so graphopt cannot compile this model")
    return Split(_without(model, encoders, strings), tuple(encoders), tuple(strings))


def encoded_arguments(encoders: Sequence[Encoder], name: str) -> list[str]:
    """The outputs of `encoders` that yield numbers from input `name` (directly or through
    string -> string lookups): the library arguments `name` becomes, in order."""
    produced, out = {name}, []
    for e in encoders:
        if e.input in produced:
            produced.add(e.output)
            if e.dtype != STRING:
                out.append(e.output)
    return out


def library_arguments(inputs: Sequence[dict], encoders: Sequence[Encoder]) -> list[dict]:
    """The library's argument specs in order, from the manifest's (the loader's) input specs."""
    out, by_output = [], {e.output: e for e in encoders}
    for spec in inputs:
        if spec["dtype"] != STRING:
            out.append(spec)
            continue
        out += [{"name": a, "shape": spec["shape"], "dtype": by_output[a].dtype}
                for a in encoded_arguments(encoders, spec["name"])]
    return out


def encode(encoders: Sequence[Encoder], feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`feeds` with every encoder's output added, in order."""
    values = dict(feeds)
    for e in encoders:
        values[e.output] = e.apply(values[e.input])
    return values


def check_strings(name: str, value) -> np.ndarray:
    """`value` as an array of strings (str, bytes or objects that are either); DataError if not."""
    array = np.asarray(value)
    if array.dtype.kind in "US" or (array.dtype == object and all(isinstance(v, str | bytes) for v in array.flat)):
        return array
    raise DataError(f"input '{name}' is {array.dtype}; the model takes strings (an array of str, "
                    "e.g. np.array(['a', 'b'], dtype=object))")


def _encoders(graph: onnx.GraphProto, strings: list[str]) -> list[Encoder]:
    """The lookups reading host strings, in an order in which each one's input is known."""
    host, encoders, pending = set(strings), [], list(graph.node)
    outputs = {o.name for o in graph.output}
    while True:
        ready = [n for n in pending if any(i in host for i in n.input)]
        if not ready:
            return encoders
        for node in ready:
            encoder = _encoder(node, host, outputs)
            encoders.append(encoder)
            if encoder.dtype == STRING:
                host.add(encoder.output)
            pending.remove(node)


def _encoder(node: onnx.NodeProto, host: set[str], outputs: set[str]) -> Encoder:
    where = f"node '{node.name or '(unnamed)'}' ({node.op_type})"
    read = next(i for i in node.input if i in host)
    if node.op_type not in label_tables.OPS or node.domain != label_tables.DOMAIN:
        raise CodegenError(f"{where} reads the strings of '{read}'; TVM holds no strings, and graphopt runs only "
                           f"ai.onnx.ml LabelEncoder and CategoryMapper lookups of strings on the host")
    if node.output[0] in outputs:
        raise CodegenError(f"{where}: its output '{node.output[0]}' is a graph output; graphopt runs it on the "
                           "host before the library, so the library cannot return it")
    table = label_tables.table(node.op_type, label_tables.node_attributes(node), strings_in=True)
    return Encoder(node.op_type, node.name or "(unnamed)", read, node.output[0], table)


def _without(model: onnx.ModelProto, encoders: list[Encoder], strings: list[str]) -> onnx.ModelProto:
    """A copy of `model` without the encoders' nodes, each string input replaced, where it stood,
    by the numeric arguments it becomes."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    removed = {e.output for e in encoders}
    kept = [n for n in graph.node if not (n.output and n.output[0] in removed)]
    del graph.node[:]
    graph.node.extend(kept)
    inputs, by_output = [], {e.output: e for e in encoders}
    for info in model.graph.input:
        if info.name not in strings:
            inputs.append(info)
            continue
        for name in encoded_arguments(encoders, info.name):
            argument = onnx.ValueInfoProto()
            argument.CopyFrom(info)
            argument.name = name
            argument.type.tensor_type.elem_type = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(by_output[name].dtype))
            inputs.append(argument)
    del graph.input[:]
    graph.input.extend(inputs)
    host = {e.output for e in encoders} | set(strings)
    kept_info = [v for v in graph.value_info if v.name not in host]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)
    return out


def _column(values: list, dtype: str) -> np.ndarray:
    if dtype != STRING:
        return np.asarray(values, dtype)
    out = np.empty(len(values), object)
    out[:] = values
    return out


def _plain(value):
    """A JSON value: numpy scalars as Python numbers."""
    return value.item() if isinstance(value, np.generic) else value


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
