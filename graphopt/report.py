"""What a model is made of (parameters, bytes, MACs per layer, ops) and the optimize report."""
from __future__ import annotations

import json
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
