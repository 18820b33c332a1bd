"""What a model is made of (parameters, bytes, MACs per layer, ops) and the optimize report."""
from __future__ import annotations

import json
from html import escape
from collections import Counter
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir.graph import export, np_dtype, static_shape


def summarize(graph: gs.Graph, layers: bool = False) -> dict:
    """params, size_bytes (serialized), macs and an ops histogram; per-layer MACs when asked.

    MACs need shapes (run shape inference first); symbolic dimensions count as 1.
    """
    constants = {id(t): t for t in graph.tensors().values() if isinstance(t, gs.Constant)}.values()
    per_layer = [_layer(n) for n in graph.nodes]
    summary = {
        "params": int(sum(_count(t.shape) for t in constants)),
        "size_bytes": int(export(graph).ByteSize()),
        "macs": int(sum(layer["macs"] for layer in per_layer)),
        "ops": dict(sorted(Counter(n.op for n in graph.nodes).items())),
        "nodes": len(graph.nodes),
        "inputs": [_io(t) for t in graph.inputs if isinstance(t, gs.Variable)],
        "outputs": [_io(t) for t in graph.outputs],
    }
    if layers:
        summary["layers"] = [layer for layer in per_layer if layer["macs"] or layer["params"]]
    return summary


def _count(shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) if shape is not None else 0


def _io(t: gs.Tensor) -> dict:
    return {"name": t.name, "dtype": None if t.dtype is None else np_dtype(t.dtype).name,
            "shape": None if t.shape is None else [d if isinstance(d, (int, np.integer)) else str(d) for d in t.shape]}


def _dims(tensor: gs.Tensor) -> tuple[int, ...] | None:
    """Shape with symbolic dimensions as 1, or None if the rank is unknown."""
    if tensor.shape is None:
        return None
    return tuple(int(d) if isinstance(d, (int, np.integer)) and d >= 0 else 1 for d in tensor.shape)


def macs(node: gs.Node) -> int:
    """Multiply-accumulates of one node; 0 for ops that are not products or whose shapes are unknown."""
    if node.op in ("Conv", "ConvInteger", "QLinearConv"):
        w_index = 3 if node.op == "QLinearConv" else 1
        out, w = _dims(node.outputs[0]), static_shape(node.inputs[w_index])
        if out is None or w is None:
            return 0
        return _count(out) * _count(w[1:])
    if node.op == "ConvTranspose":
        x, w = _dims(node.inputs[0]), static_shape(node.inputs[1])
        if x is None or w is None:
            return 0
        return _count(x) * _count(w[1:])
    if node.op in ("Gemm", "MatMul", "MatMulInteger", "QLinearMatMul"):
        out = _dims(node.outputs[0])
        a = _dims(node.inputs[0])
        if out is None or a is None or not a:
            return 0
        k = a[0] if node.op == "Gemm" and node.attrs.get("transA", 0) else a[-1]
        return _count(out) * k
    return 0


def _layer(node: gs.Node) -> dict:
    params = sum(_count(t.shape) for t in node.inputs if isinstance(t, gs.Constant))
    return {"name": node.name, "op": node.op, "macs": int(macs(node)), "params": int(params)}


def write_json(report: dict, path: Path) -> None:
    """Write atomically so a reader never sees half a report."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
    tmp.replace(path)


def _jsonable(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def format_summary(summary: dict) -> str:
    """A human-readable block for `graphopt inspect`."""
    lines = [
        f"params      {summary['params']:,}",
        f"size        {summary['size_bytes']:,} bytes",
        f"MACs        {summary['macs']:,}",
        f"nodes       {summary['nodes']}",
        "inputs      " + ", ".join(f"{t['name']} {t['dtype']}{t['shape']}" for t in summary["inputs"]),
        "outputs     " + ", ".join(f"{t['name']} {t['dtype']}{t['shape']}" for t in summary["outputs"]),
        "ops         " + ", ".join(f"{op} x{n}" for op, n in summary["ops"].items()),
    ]
    if summary.get("layers"):
        width = max(len(layer["name"]) for layer in summary["layers"])
        lines.append("")
        lines.append(f"{'layer':<{width}}  {'op':<18} {'params':>12} {'MACs':>14}")
        for layer in summary["layers"]:
            lines.append(f"{layer['name']:<{width}}  {layer['op']:<18} {layer['params']:>12,} {layer['macs']:>14,}")
    return "\n".join(lines)


def write_html(report: dict, path: Path) -> None:
    """A one-page, dependency-free view of report.json."""
    parts = [f"<h1>graphopt report: {escape(str(report.get('model', '')))}</h1>",
             f"<p>pipeline: <code>{escape(report.get('pipeline') or '(none)')}</code></p>",
             _table(["", "before", "after"], [[k, f"{report['before'][k]:,}", f"{report['after'][k]:,}"]
                                             for k in ("params", "size_bytes", "macs", "nodes")])]
    if "latency_ms" in report:
        lat = report["latency_ms"]["onnxruntime"]
        parts.append(_table(["onnxruntime latency (ms)", "before", "after"],
                            [["one sample, median", f"{lat['before']:.4f}", f"{lat['after']:.4f}"]]))
    parts.append("<h2>Passes</h2>" + _table(
        ["pass", "modified", "seconds", "stats"],
        [[p["name"], str(p["modified"]), f"{p['seconds']:.3f}",
          f"<pre>{escape(json.dumps(p['stats'], indent=1, default=_jsonable))}</pre>"] for p in report["passes"]],
        raw_last=True))
    parts.append("<h2>Fidelity vs the original (onnxruntime)</h2>" + _fidelity(report["fidelity"]["outputs"]))
    codegen = report.get("codegen")
    if codegen:
        parts.append(f"<h2>Library: {escape(codegen['target'])}</h2><p>{escape(codegen['library'])}, "
                     f"built in {codegen['build_seconds']:.1f} s</p>")
        if "fidelity" in codegen:
            parts.append(_fidelity(codegen["fidelity"]) + f"<p>latency {codegen['latency_ms']:.4f} ms</p>")
        if "not_run" in codegen:
            parts.append(f"<p>not run: {escape(codegen['not_run'])}</p>")
    style = "body{font-family:sans-serif;margin:2em}td,th{border:1px solid #ccc;padding:4px 8px}" \
            "table{border-collapse:collapse;margin:1em 0}pre{margin:0;font-size:11px}"
    html = f"<!doctype html><meta charset=utf-8><title>graphopt report</title><style>{style}</style>" + "".join(parts)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(html)
    tmp.replace(path)


def _fidelity(outputs: dict) -> str:
    return _table(["output", "max abs error", "cosine", "SQNR (dB)"],
                  [[name, f"{f['max_abs']:.3g}", f"{f['cosine']:.6f}", f"{f['sqnr_db']:.1f}"]
                   for name, f in outputs.items()])


def _table(header: list[str], rows: list[list[str]], raw_last: bool = False) -> str:
    def cells(row, tag):
        return "".join(f"<{tag}>{c if raw_last and i == len(row) - 1 else escape(c)}</{tag}>"
                       for i, c in enumerate(row))
    body = "".join(f"<tr>{cells(r, 'td')}</tr>" for r in rows)
    return f"<table><tr>{cells(header, 'th')}</tr>{body}</table>"
