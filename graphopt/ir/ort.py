"""Run models in onnxruntime, the reference every pass is measured against."""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from google.protobuf.message import EncodeError

from graphopt.ir import shared_weights
from graphopt.ir.errors import GraphoptError
from graphopt.ir.graph import export

_INLINE_LIMIT = 2**31 - (1 << 20)


def session(model: onnx.ModelProto | gs.Graph | str | os.PathLike, optimize: bool = False,
            threads: int = 0) -> ort.InferenceSession:
    """An onnxruntime CPU session; graph optimisations off unless asked, so what runs is what we wrote."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.log_severity_level = 4  # failures are re-raised with onnxruntime's message
    if threads:
        opts.intra_op_num_threads = threads
    try:
        if isinstance(model, gs.Graph):
            # Large weights go to onnxruntime as the graph's own arrays: one copy in memory, and
            # no protobuf over 2 GB.
            if shared_weights.worthwhile(model):
                return shared_weights.session(model, opts, ["CPUExecutionProvider"])
            model = export(model)
        return _session(model, opts)
    except Exception as e:  # noqa: BLE001 - onnxruntime's pybind errors share no useful base class
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GraphoptError(f"onnxruntime cannot load the model: {first}") from None


def _session(model, opts) -> ort.InferenceSession:
    providers = ["CPUExecutionProvider"]
    if isinstance(model, (str, os.PathLike)):
        return ort.InferenceSession(str(model), opts, providers=providers)
    try:
        inline = model.ByteSize() < _INLINE_LIMIT
    except EncodeError:  # protobuf cannot even measure a message over 2 GB
        inline = False
    if inline:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True, location="model.data")
        return ort.InferenceSession(str(path), opts, providers=providers)


def run(model, feeds: dict[str, np.ndarray], **session_kwargs) -> dict[str, np.ndarray]:
    """Outputs by name for one set of feeds."""
    sess = model if isinstance(model, ort.InferenceSession) else session(model, **session_kwargs)
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    try:
        results = sess.run(names, {k: v for k, v in feeds.items() if k in wanted})
    except Exception as e:  # noqa: BLE001 - as above
        raise GraphoptError(f"onnxruntime failed to run the model: {str(e).strip().splitlines()[0]}") from None
    return dict(zip(names, results))


def latency_ms(model, feeds: dict[str, np.ndarray], repeat: int = 20, warmup: int = 3) -> float:
    """Median wall time of one run, with onnxruntime's own graph optimisations on (as deployed)."""
    sess = session(model, optimize=True)
    wanted = {i.name for i in sess.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in wanted}
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)
