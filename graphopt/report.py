"""What a model is made of (parameters, bytes, MACs per layer, ops) and the optimize report."""
from __future__ import annotations

import json
import re
from html import escape
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
    2 GiB), sparsity (fraction of zeros among the floating-point constants), macs and an ops
    histogram; per-layer MACs, parameters and sparsity when asked.

    MACs need shapes: with `shapes` (concrete input shapes) they are counted on the graph
    specialized to them (`input_shapes` in the summary), else on the shapes the graph carries
    (run shape inference first), where symbolic dims count as 1 (listed in `symbolic_dims`).
    `inputs` and `outputs` are always the model's own, symbolic dims included.
    """
    sized = specialize(graph, shapes) if shapes is not None else graph
    constants = {id(t): t for t in sized.tensors().values() if isinstance(t, gs.Constant)}
    zeros = {key: _zeros(t) for key, t in constants.items()}
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


def _layer(node: gs.Node, zeros: dict[int, tuple[int, int]]) -> dict:
    consts = [t for t in node.inputs if isinstance(t, gs.Constant)]
    params = sum(count(t.shape) for t in consts)
    floats, zero = (sum(zeros[id(t)][i] for t in consts) for i in (0, 1))
    return {"name": node.name, "op": node.op, "macs": int(macs(node)), "params": int(params),
            "sparsity": round(zero / floats, 4) if floats else 0.0}


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
        f"compressed  {_maybe(summary.get('compressed_bytes'))} bytes (zlib level 6)",
        f"sparsity    {summary.get('sparsity', 0.0):.2%} of floating-point weights are zero",
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


def write_html(report: dict, path: Path) -> None:
    """A one-page, dependency-free view of report.json."""
    parts = [f"<h1>graphopt report: {escape(str(report.get('model', '')))}</h1>",
             f"<p>pipeline: <code>{escape(report.get('pipeline') or '(none)')}</code></p>",
             _table(["", "before", "after"], [[k, _cell(k, report["before"]), _cell(k, report["after"])]
                                             for k in ("params", "size_bytes", "compressed_bytes", "sparsity",
                                                       "macs", "nodes")])]
    if "latency_ms" in report:
        lat = report["latency_ms"]["onnxruntime"]
        parts.append(_table(["onnxruntime latency (ms)", "before", "after"],
                            [["one sample, median", f"{lat['before']:.4f}", f"{lat['after']:.4f}"]]))
    parts.append("<h2>Passes</h2>" + _table(
        ["pass", "modified", "seconds", "decisions", "refused", "skipped", "stats"],
        [[p["name"], str(p["modified"]), f"{p['seconds']:.3f}", str(len(p.get("decisions", {}))),
          str(len(p.get("refused", []))), str(len(p.get("skipped", []))),
          f"<pre>{escape(json.dumps(p['stats'], indent=1, default=_jsonable))}</pre>"] for p in report["passes"]],
        raw_last=True))
    for p in report["passes"]:
        if "sensitivity" in p["stats"]:
            parts.append(f"<h2>Sensitivity: {escape(p['name'])}</h2>" + sensitivity_html(p["stats"]["sensitivity"]))
        choices = choices_table(p)
        if choices:
            parts.append(f"<h2>Choices: {escape(p['name'])}</h2>" + choices)
        if p.get("refused"):
            parts.append(f"<h2>Refused: {escape(p['name'])}</h2>" + _table(
                ["node", "reason"], [[r["node"], r["reason"]] for r in p["refused"]]))
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


def choices_table(record: dict) -> str:
    """`choices` as an HTML table: layer, choice, the time of each candidate and why; empty when
    the pass chose nothing."""
    layers = choices(record)
    if not layers:
        return ""
    candidates = list(dict.fromkeys(c for v in layers.values() for c in v.get("timings_ms", {})))
    rows = [[name, v["chosen"], *(_maybe(v.get("timings_ms", {}).get(c)) for c in candidates), v.get("reason", "")]
            for name, v in layers.items()]
    return _table(["layer", "chosen", *(f"{c} ms" for c in candidates), "why"], rows)


def _cell(key: str, summary: dict) -> str:
    value = summary.get(key)
    if value is None:
        return "n/a"
    return f"{value:.2%}" if key == "sparsity" else f"{value:,}"


def _maybe(value) -> str:
    return "n/a" if value is None else f"{value:,}"


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


def sensitivity_html(table: dict) -> str:
    """An inline SVG of cosine against ratio, one line per layer, and the table under it."""
    ratios = table["ratios"]
    head = ["layer", "op", "size"] + [f"cosine @ {r:g}" for r in ratios]
    with_acc = table.get("baseline_accuracy") is not None
    if with_acc:
        head += [f"accuracy @ {r:g}" for r in ratios]
    rows = [[layer["name"], layer["op"], f"{layer['size']:,}"] + [f"{p['cosine']:.6f}" for p in layer["points"]]
            + ([f"{p['accuracy']:.4f}" for p in layer["points"]] if with_acc else []) for layer in table["layers"]]
    note = f"<p>baseline accuracy {table['baseline_accuracy']:.4f}</p>" if with_acc else ""
    return _svg_plot(table["layers"]) + note + _table(head, rows)


_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf")


def _svg_plot(layers: list[dict], width: int = 560, height: int = 260, margin: int = 40) -> str:
    lowest = min([p["cosine"] for layer in layers for p in layer["points"]] + [0.99])
    bottom = np.floor(lowest * 20) / 20  # a round axis minimum, in steps of 0.05

    def xy(ratio: float, cosine: float) -> str:
        x = margin + ratio * (width - 2 * margin)
        y = margin + (1 - cosine) / (1 - bottom) * (height - 2 * margin)
        return f"{x:.1f},{y:.1f}"

    lines, legend = [], []
    for i, layer in enumerate(layers):
        colour = _COLOURS[i % len(_COLOURS)]
        points = " ".join(xy(p["ratio"], p["cosine"]) for p in [{"ratio": 0.0, "cosine": 1.0}] + layer["points"])
        lines.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{points}"/>')
        legend.append(f'<text x="{width + 4}" y="{margin + 14 * i}" fill="{colour}" font-size="11">'
                      f'{escape(layer["name"])}</text>')
    axes = (f'<line x1="{margin}" y1="{height - margin}" x2="{width - margin}" y2="{height - margin}" stroke="#999"/>'
            f'<line x1="{margin}" y1="{margin}" x2="{margin}" y2="{height - margin}" stroke="#999"/>'
            f'<text x="{width / 2}" y="{height - 8}" font-size="11" text-anchor="middle">ratio</text>'
            f'<text x="4" y="{margin - 8}" font-size="11">cosine</text>'
            f'<text x="{margin - 4}" y="{margin + 4}" font-size="10" text-anchor="end">1</text>'
            f'<text x="{margin - 4}" y="{height - margin}" font-size="10" text-anchor="end">{bottom:g}</text>'
            f'<text x="{width - margin}" y="{height - margin + 14}" font-size="10" text-anchor="middle">1</text>')
    tall = max(height, margin + 14 * len(layers))  # room for the legend
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + 160}" height="{tall}">'
            + axes + "".join(lines) + "".join(legend) + "</svg>")


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
