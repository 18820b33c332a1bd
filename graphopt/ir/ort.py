"""Run models in onnxruntime, the reference every pass is measured against."""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from google.protobuf.message import EncodeError

from graphopt.ir import shared_weights
from graphopt.ir.errors import RuntimeRejected
from graphopt.ir.graph import export

_INLINE_LIMIT = 2**31 - (1 << 20)


def session(model: onnx.ModelProto | gs.Graph | str | os.PathLike, optimize: bool = False,
            threads: int = 0, profile: str | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session; graph optimisations off unless asked, so what runs is what we
    wrote. `profile`: the prefix of onnxruntime's profile file (profiling on)."""
    opts = ort.SessionOptions()
    if profile:
        opts.enable_profiling, opts.profile_file_prefix = True, profile
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
        what, node = explain(e)
        raise RuntimeRejected(what, node) from None


# onnxruntime names the node it failed on in one of these ways.
_NODE_PATTERNS = (re.compile(r"Node \(([^)]*)\)"), re.compile(r"node\. Name:'([^']*)'"),
                  re.compile(r"in node \(([^)]*)\)"), re.compile(r"Node:\s*'?([^'\s]+)'?"))
_PREFIXES = (re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : "), re.compile(r"^Load model from .*? failed:"),
             re.compile(r"^This is an invalid model\. "), re.compile(r"^Node \([^)]*\) "),
             re.compile(r"^Non-zero status code returned while running \w+ node\. Name:'[^']*' "))


def explain(error: BaseException) -> tuple[str, str | None]:
    """onnxruntime's message as one line without its codes and C++ source locations, and the
    node it names (or None)."""
    text = " ".join(str(error).split()) or type(error).__name__
    node = next((m.group(1) for p in _NODE_PATTERNS for m in [p.search(text)] if m and m.group(1)), None)
    text = _drop_source_location(text)
    for prefix in _PREFIXES:
        text = prefix.sub("", text).strip()
    return text, node


def _drop_source_location(text: str) -> str:
    """Removes '/onnxruntime_src/...h:46 void ns::Fn(args...)' where it occurs."""
    while "/onnxruntime_src/" in text:
        start = text.index("/onnxruntime_src/")
        paren = text.find("(", start)
        if paren < 0:
            return text[:start].strip()
        depth, end = 0, paren
        for end in range(paren, len(text)):
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            if depth == 0:
                break
        text = (text[:start] + text[end + 1:]).strip()
    return text.replace("Status Message:", "").strip()


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
        what, node = explain(e)
        raise RuntimeRejected(what, node, loading=False) from None
    return dict(zip(names, results))


@dataclass(frozen=True)
class Latency:
    """Repeated timings of one run, in milliseconds: the median and how far the runs spread.
    `spread_pct` is half the interquartile range as a percentage of the median ("0.0280 ms ±12%"):
    quartiles, not min..max, so one preempted run does not make a steady model look noisy."""
    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float
    repeat: int

    @classmethod
    def of(cls, seconds: list[float]) -> Latency:
        ms = np.asarray(seconds, dtype=np.float64) * 1000
        q1, median, q3 = np.percentile(ms, [25, 50, 75])
        return cls(float(median), float(q1), float(q3), float(ms.min()), float(ms.max()), len(ms))

    @property
    def spread_pct(self) -> float:
        return 100 * (self.q3_ms - self.q1_ms) / (2 * self.median_ms) if self.median_ms > 0 else 0.0

    def as_dict(self, digits: int = 4) -> dict:
        return {"median": round(self.median_ms, digits), "q1": round(self.q1_ms, digits),
                "q3": round(self.q3_ms, digits), "min": round(self.min_ms, digits), "max": round(self.max_ms, digits),
                "repeat": self.repeat, "spread_pct": round(self.spread_pct, 1)}


def latency_ms(model, feeds: dict[str, np.ndarray], repeat: int = 20, warmup: int = 3) -> float:
    """Median wall time of one run, with onnxruntime's own graph optimisations on (as deployed);
    `measure_latency` gives the spread too."""
    return measure_latency(model, feeds, repeat, warmup).median_ms


def node_times_ms(model, feeds: dict[str, np.ndarray], repeat: int = 10) -> dict[str, float]:
    """Milliseconds per run each node takes, from onnxruntime's own profiler over one warm-up and
    `repeat` runs, graph optimisations on as deployed (fused nodes carry the names onnxruntime
    gives them): the median of a node's times, so the warm-up's first-call costs drop out, times
    how often it runs per run (a node inside a Loop body runs many times)."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = session(model, optimize=True, profile=os.path.join(tmp, "ort"))
        wanted = {i.name for i in sess.get_inputs()}
        feeds = {k: v for k, v in feeds.items() if k in wanted}
        for _ in range(repeat + 1):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    times: dict[str, list[float]] = {}
    suffix = "_kernel_time"
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith(suffix):
            times.setdefault(e["name"][:-len(suffix)], []).append(e.get("dur", 0) / 1000)
    return {name: float(np.median(t)) * len(t) / (repeat + 1) for name, t in times.items()}


def measure_latency(model, feeds: dict[str, np.ndarray], repeat: int = 20, warmup: int = 3) -> Latency:
    """`repeat` timed runs of one set of feeds after `warmup` untimed ones, onnxruntime's graph
    optimisations on."""
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
    return Latency.of(times)
