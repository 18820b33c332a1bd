"""onnxruntime sessions that compute with the graph's own weight arrays instead of copies.

Handing onnxruntime a model as bytes, or through `add_external_initializers`, copies every weight;
a model file whose external data onnxruntime maps is a second mapping of pages the graph already
holds, which counts twice against the process. `SessionOptions.add_initializer` with an OrtValue
over a numpy array uses that array's memory as it is, so a session costs the model's structure:
the model onnxruntime reads names each shared weight as external data in an empty placeholder file,
and the initializer given in the options replaces it before anything is read. Pre-packing is off
for such sessions, since it would copy each MatMul and Conv weight into a packed layout.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from graphopt.ir.graph import constant_nbytes, export, without_weights

# Weights at least this large are shared; smaller ones stay in the model onnxruntime parses.
SHARE_MIN_BYTES = 4096
# From this much weight on, a shared session is worth a temporary folder (see `worthwhile`).
SHARE_MODEL_BYTES = 1 << 26
_PLACEHOLDER = "shared.weights"


def worthwhile(graph: gs.Graph) -> bool:
    """Whether the graph's weights are large enough that copying them into onnxruntime matters."""
    return sum(constant_nbytes(t) for t in graph.tensors().values() if isinstance(t, gs.Constant)) >= SHARE_MODEL_BYTES


def session(graph: gs.Graph, opts: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    """An InferenceSession over `graph` whose large weights are the graph's own arrays.

    `opts` gets the shared initializers and pre-packing turned off. The arrays stay referenced by
    the session, so a pass that replaces a weight afterwards does not pull memory from under it."""
    light, converted = without_weights(graph, _shareable)
    model = export(light)
    names = {t.name for t in converted}
    _drop_value_info(model, names)
    tensors = graph.tensors()
    arrays = {name: np.ascontiguousarray(tensors[name].values) for name in sorted(names)}
    for name, arr in arrays.items():
        model.graph.initializer.append(_placeholder(name, arr))
    values = {name: ort.OrtValue.ortvalue_from_numpy(arr) for name, arr in arrays.items()}
    for name, value in values.items():
        opts.add_initializer(name, value)
    opts.add_session_config_entry("session.disable_prepacking", "1")
    with tempfile.TemporaryDirectory(prefix="graphopt-ort-") as tmp:
        (Path(tmp) / _PLACEHOLDER).touch()
        path = Path(tmp) / "model.onnx"
        path.write_bytes(model.SerializeToString())
        sess = ort.InferenceSession(str(path), opts, providers=providers)
    # onnxruntime reads these buffers for as long as the session lives.
    sess._graphopt_shared = (arrays, values)
    return sess


def _shareable(t: gs.Constant) -> bool:
    # LazyValues (strings, sub-byte and float8 types) have no numpy buffer to share.
    return isinstance(t._values, np.ndarray) and t._values.nbytes >= SHARE_MIN_BYTES


def _drop_value_info(model: onnx.ModelProto, names: set[str]) -> None:
    kept = [vi for vi in model.graph.value_info if vi.name not in names]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)


def _placeholder(name: str, arr: np.ndarray) -> onnx.TensorProto:
    t = onnx.TensorProto(name=name, dims=arr.shape, data_type=onnx.helper.np_dtype_to_tensor_dtype(arr.dtype),
                         data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", _PLACEHOLDER), ("offset", "0"), ("length", str(arr.nbytes))):
        t.external_data.add(key=key, value=value)
    return t
