"""What a model is made of (parameters, bytes, MACs per layer, ops) and the optimize report.

report.json is strict JSON (RFC 8259): a float JSON cannot hold (the SQNR of identical outputs is
inf, a NaN) is written as null, so any reader parses it; `write_json` refuses to write anything
else. report.html, the page people open, is graphopt.report_html's.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir.cost import count, macs
from graphopt.ir import stream
from graphopt.ir.graph import np_dtype
from graphopt.ir.shapes import specialize

# The compressed size of a model over this (what one protobuf can hold) is left out: compressing
# gigabytes takes minutes.
_SERIALIZE_LIMIT = 2**31 - 1
# zlib's default level, which gzip uses too: the size a user sees after `gzip model.onnx`.
_ZLIB_LEVEL = 6


def summarize(graph: gs.Graph, layers: bool = False, shapes: dict[str, tuple[int, ...]] | None = None) -> dict:
    """params, size_bytes (serialized), compressed_bytes (serialized, then zlib level 6; None over
    2 GiB), sparsity (fraction of zeros among the floating-point constants and the quantized
    weights, where zero is the zero point), macs and an ops
    histogram; per-layer MACs, parameters and sparsity when asked.

    MACs need shapes: with `shapes` (concrete input shapes) they are counted on the graph
    specialized to them (`input_shapes` in the summary), else on the shapes the graph carries
    (run shape inference first), where symbolic dims count as 1 (listed in `symbolic_dims`).
    `inputs` and `outputs` are always the model's own, symbolic dims included.
    """
    sized = specialize(graph, shapes) if shapes is not None else graph
    constants = {id(t): t for t in sized.tensors().values() if isinstance(t, gs.Constant)}
    zeros = {key: _zeros(t) for key, t in constants.items()}
    zeros.update(_quantized_zeros(sized))
    per_layer = [_layer(n, zeros) for n in sized.nodes]
    floats, zero = (sum(z[i] for z in zeros.values()) for i in (0, 1))
    # Counted on the file as it is streamed out, so a 3 GB model is never one protobuf in memory.
    size = stream.size(graph)
    summary = {
        "params": int(sum(count(t.shape) for t in constants.values())),
        "size_bytes": int(size),
        "compressed_bytes": stream.compressed_size(graph, _ZLIB_LEVEL) if size <= _SERIALIZE_LIMIT else None,
        "sparsity": round(zero / floats, 4) if floats else 0.0,
        "macs": int(sum(layer["macs"] for layer in per_layer)),
        "ops": dict(sorted(Counter(n.op for n in graph.nodes).items())),
        "nodes": len(graph.nodes),
        "inputs": [_io(t) for t in graph.inputs if isinstance(t, gs.Variable)],
        "outputs": [_io(t) for t in graph.outputs],
    }
    if shapes is not None:
        summary["input_shapes"] = {k: list(v) for k, v in shapes.items()}
    symbolic = _symbolic_dims(sized)
    if symbolic:
        summary["symbolic_dims"] = symbolic
    if layers:
        summary["layers"] = [layer for layer in per_layer if layer["macs"] or layer["params"]]
    return summary


def _symbolic_dims(graph: gs.Graph) -> list[str]:
    """Names of the input dims past the leading (batch) one that are still symbolic, which MACs
    count as 1; one sample per batch is what MACs are meant to count."""
    dims = [str(d) for t in graph.inputs if isinstance(t, gs.Variable) for d in (t.shape or ())[1:]
            if not isinstance(d, (int, np.integer))]
    return list(dict.fromkeys(dims))


def _io(t: gs.Tensor) -> dict:
    return {"name": t.name, "dtype": None if t.dtype is None else np_dtype(t.dtype).name,
            "shape": None if t.shape is None else [d if isinstance(d, (int, np.integer)) else str(d) for d in t.shape]}


def _zeros(tensor: gs.Constant) -> tuple[int, int]:
    """(floating-point elements, zeros among them) of a constant; (0, 0) for other types."""
    dtype = np_dtype(tensor.dtype)
    if not np.issubdtype(dtype, np.floating):
        return 0, 0
    values = tensor.values
    return int(values.size), int(values.size - np.count_nonzero(values))


# Where integer ops read their quantized weight and its zero point: (weight, zero point) inputs.
_INTEGER_WEIGHTS = {"DequantizeLinear": (0, 2), "QLinearConv": (3, 5), "QLinearMatMul": (3, 5),
                    "ConvInteger": (1, 3), "MatMulInteger": (1, 3)}


def _quantized_zeros(graph: gs.Graph) -> dict[int, tuple[int, int]]:
    """(elements, zeros) of the integer weights of quantized ops, a zero being a value at its zero
    point (what a pruned weight quantizes to), so sparsity survives quantize and lower-int8."""
    found = {}
    for node in graph.nodes:
        w, z = _INTEGER_WEIGHTS.get(node.op, (None, None))
        q = node.inputs[w] if w is not None and len(node.inputs) > w else None
        if not isinstance(q, gs.Constant) or np.issubdtype(np_dtype(q.dtype), np.floating):
            continue
        values = np.asarray(q.values)
        zero = node.inputs[z] if len(node.inputs) > z and isinstance(node.inputs[z], gs.Constant) else None
        point = _broadcast_zero_point(node, values, None if zero is None else np.asarray(zero.values))
        if point is not None:
            found[id(q)] = (int(values.size), int(np.count_nonzero(values == point)))
    return found


def _broadcast_zero_point(node: gs.Node, values: np.ndarray, point: np.ndarray | None) -> np.ndarray | None:
    """The zero point shaped to compare with `values`, or None where its layout is not a scalar or
    one value per channel (blocked zero points are left uncounted)."""
    if point is None or point.size == 1:
        return np.zeros((), values.dtype) if point is None else point.reshape(())
    if point.ndim != 1 or values.ndim < 1 or node.attrs.get("block_size", 0):
        return None
    if node.op == "DequantizeLinear":
        axis = int(node.attrs.get("axis", 1)) % values.ndim
    else:  # a conv's output channels lead its weight; a matmul's columns end it
        axis = 0 if node.op in ("QLinearConv", "ConvInteger") else values.ndim - 1
    if values.shape[axis] != point.size:
        return None
    return point.reshape([-1 if a == axis else 1 for a in range(values.ndim)])


def _layer(node: gs.Node, zeros: dict[int, tuple[int, int]]) -> dict:
    consts = [t for t in node.inputs if isinstance(t, gs.Constant)]
    params = sum(count(t.shape) for t in consts)
    floats, zero = (sum(zeros[id(t)][i] for t in consts) for i in (0, 1))
    return {"name": node.name, "op": node.op, "macs": int(macs(node)), "params": int(params),
            "sparsity": round(zero / floats, 4) if floats else 0.0}


def write_json(report: dict, path: Path) -> None:
    """Write strict JSON atomically (a reader never sees half a report): non-finite floats (an
    SQNR of inf for identical outputs, a NaN) become null, numpy values plain numbers, and
    `allow_nan=False` makes anything that slips past that an error here, not in a reader."""
    text = json_text(report, 2)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text + "\n")
    tmp.replace(path)


def strict_json(value):
    """`value` with every float that JSON cannot hold (inf, -inf, NaN) as None, numpy scalars and
    arrays as Python numbers and lists, tuples and sets as lists."""
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [strict_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return strict_json(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def json_text(value, indent: int | None = None) -> str:
    """`value` as strict JSON text (see `strict_json`); anything still not JSON is an error here."""
    return json.dumps(strict_json(value), indent=indent, default=_jsonable, allow_nan=False)


def _jsonable(value):
    return str(value)  # what strict_json leaves: paths, enums and the like


def format_summary(summary: dict) -> str:
    """A human-readable block for `graphopt inspect`."""
    lines = [
        f"params      {summary['params']:,}",
        f"size        {summary['size_bytes']:,} bytes",
        f"compressed  {thousands(summary.get('compressed_bytes'))} bytes (zlib level 6)",
        f"sparsity    {summary.get('sparsity', 0.0):.2%} of weights are zero (quantized ones: at their zero point)",
        f"MACs        {summary['macs']:,}{_macs_note(summary)}",
        f"nodes       {summary['nodes']}",
        "inputs      " + ", ".join(f"{t['name']} {t['dtype']}{t['shape']}" for t in summary["inputs"]),
        "outputs     " + ", ".join(f"{t['name']} {t['dtype']}{t['shape']}" for t in summary["outputs"]),
        "ops         " + ", ".join(f"{op} x{n}" for op, n in summary["ops"].items()),
    ]
    if summary.get("layers"):
        width = max(len(layer["name"]) for layer in summary["layers"])
        lines.append("")
        lines.append(f"{'layer':<{width}}  {'op':<18} {'params':>12} {'MACs':>14} {'sparsity':>9}")
        for layer in summary["layers"]:
            lines.append(f"{layer['name']:<{width}}  {layer['op']:<18} {layer['params']:>12,} {layer['macs']:>14,} "
                         f"{layer.get('sparsity', 0.0):>9.2%}")
    return "\n".join(lines)


def _macs_note(summary: dict) -> str:
    if summary.get("symbolic_dims"):
        return (f"  (symbolic dims {', '.join(summary['symbolic_dims'])} counted as 1: "
                f"give --input-shape for the real count)")
    if summary.get("input_shapes"):
        return "  at " + ", ".join(f"{k}={','.join(map(str, v))}" for k, v in summary["input_shapes"].items())
    return ""


def pass_outcome(record: dict, groups: int = 3) -> str | None:
    """One line for a pass that changed nothing or left layers alone, with why, grouped by reason
    (`record` is `PassRecord.as_dict()`): "winograd: changed nothing: 0 of 12 layers; refused
    9 x stride [2, 2] is not 1, 3 x group=2: ...". None for a pass that changed everything it
    looked at."""
    name, modified = record["name"], record["modified"]
    whole = [r for r in record.get("skipped", []) if not r["node"]]
    if whole and not modified:
        return f"{name}: skipped: {whole[0]['reason']}"
    refused = [r for r in record.get("refused", []) if r["node"]]
    skipped = [r for r in record.get("skipped", []) if r["node"]]
    left = {r["node"] for r in refused + skipped}
    if not left:
        return None if modified else f"{name}: changed nothing: nothing it rewrites is in the model"
    done = {k for k in record.get("decisions", {}) if k not in left}
    why = "; ".join(f"{kind} {_grouped(rs, groups)}" for kind, rs in (("refused", refused), ("skipped", skipped)) if rs)
    if not modified:
        return f"{name}: changed nothing: 0 of {len(left)} layers; {why}"
    if done:
        return f"{name}: {len(done)} of {len(done | left)} layers; {why}"
    return f"{name}: left {len(left)} layers alone; {why}"  # a rule pass: what it changed has no list


def _grouped(refusals: list[dict], groups: int) -> str:
    """'9 x reason, 3 x reason, +2 other reasons': one entry per reason with node and tensor names
    and bracketed shapes taken out, the most frequent first, each shown by its first instance."""
    by_key: dict[str, tuple[str, set]] = {}
    for r in refusals:
        text = f"{r['rule']}: {r['reason']}" if r.get("rule") else r["reason"]
        by_key.setdefault(_QUOTED.sub("…", text), (text, set()))[1].add(r["node"])
    ranked = sorted(by_key.values(), key=lambda v: -len(v[1]))
    shown = [f"{len(nodes)} x {text}" for text, nodes in ranked[:groups]]
    if len(ranked) > groups:
        shown.append(f"+{len(ranked) - groups} other reasons (--explain lists each layer)")
    return ", ".join(shown)


# Names ('conv3.weight') and shapes ([N, 16, H, W]) differ from layer to layer; the reason is the rest.
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|\[[^\]]*\]")


def choices(record: dict) -> dict[str, dict]:
    """The per-layer decisions of a pass record (`PassRecord.as_dict()`) that chose by measuring
    (winograd's select="measure"): {layer: {"chosen", "timings_ms", "reason", ...}}."""
    return {k: v for k, v in record.get("decisions", {}).items() if "chosen" in v}


def thousands(value) -> str:
    """An integer with thousands separators, or n/a for None."""
    return "n/a" if value is None else f"{value:,}"


# Deep Compression's stages as the report names them, and as its tables show them.
STAGE_LABELS = {"original": "original", "pruned": "pruned", "clustered": "clustered",
                "packed": "packed (.gopt, Huffman)"}


def deep_compression_rows(section: dict) -> list[list[str]]:
    """Deep Compression's staged table (report["deep_compression"]) as rows of text: stage (with
    the pass it follows), bytes, ratio to the original, top-1 (n/a without labels)."""
    rows = []
    for s in section["stages"]:
        label = STAGE_LABELS.get(s["stage"], s["stage"]) + (f" ({s['after']})" if s.get("after") else "")
        rows.append([label, thousands(s.get("bytes")), "n/a" if s.get("ratio") is None else f"{s['ratio']:.1f}x",
                     "n/a" if s.get("top1") is None else f"{s['top1']:.2f}%"])
    return rows


def format_deep_compression(section: dict) -> list[str]:
    """The staged table for the console: a header and one line per stage."""
    rows = deep_compression_rows(section)
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{'Deep Compression':{width}}{'bytes':>12}{'ratio':>9}{'top-1':>10}"]
    lines += [f"{r[0]:{width}}{r[1]:>12}{r[2]:>9}{r[3]:>10}" for r in rows]
    return lines


def format_sensitivity(table: dict) -> str:
    """The per-layer table of a sensitivity analysis (`Table.as_dict()`): cosine per ratio, and
    accuracy per ratio when it was measured."""
    ratios, layers = table["ratios"], table["layers"]
    width = max([len(layer["name"]) for layer in layers] + [5])
    with_acc = table.get("baseline_accuracy") is not None
    head = f"{'layer':<{width}}  {'op':<14} {'size':>10}  " + " ".join(f"{'cos@' + format(r, 'g'):>10}" for r in ratios)
    if with_acc:
        head += "  " + " ".join(f"{'acc@' + format(r, 'g'):>9}" for r in ratios)
    lines = [f"baseline accuracy {table['baseline_accuracy']:.4f}"] if with_acc else []
    lines.append(head)
    for layer in layers:
        row = f"{layer['name']:<{width}}  {layer['op']:<14} {layer['size']:>10,}  "
        row += " ".join(f"{p['cosine']:>10.6f}" for p in layer["points"])
        if with_acc:
            row += "  " + " ".join(f"{p['accuracy']:>9.4f}" for p in layer["points"])
        lines.append(row)
    return "\n".join(lines)


