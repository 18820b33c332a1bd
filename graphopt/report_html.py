"""report.html: the page people open after `graphopt optimize` / `compile`, built from the report
dict alone (what report.json holds), so the page and the JSON cannot disagree.

One self-contained file whose plots are SVG drawn here in Python, not a JavaScript charting
library: it needs no download, opens offline and from a mail attachment, runs no script, and what
it shows is plain text a test can read. Every name in it comes from an untrusted model and is
escaped. Verified by tests/test_report_html.py (strict structure, escaping, and a headless chromium
rendering without console errors).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from html import escape
from pathlib import Path

import numpy as np

from graphopt.report import choices, deep_compression_rows, json_text, thousands


def write_html(report: dict, path: Path) -> None:
    """report.html: the page to open. Headline ratios, the before/after table (regressions in
    red), ops before and after, one row and plot per pass, the per-layer plots the passes' records
    allow, the search's Pareto front when there was one, fidelity and the library. Plots are SVG
    drawn here (see the module docstring); every name from the model is escaped."""
    parts = [f"<h1>graphopt report: {escape(str(report.get('model', '')))}</h1>",
             f"<p>pipeline: <code>{escape(report.get('pipeline') or '(none)')}</code></p>",
             _headline(report), "<h2>Before and after</h2>" + _sizes(report)]
    ops = _ops_table(report["before"], report["after"])
    if ops:
        parts.append("<h2>Ops</h2>" + ops)
    if report["passes"]:
        parts.append("<h2>Passes</h2>" + _passes(report["passes"]))
    for p in report["passes"]:
        parts += _layer_plots(p)
        if "sensitivity" in p["stats"]:
            parts.append(f"<h2>Sensitivity: {escape(p['name'])}</h2>" + sensitivity_html(p["stats"]["sensitivity"]))
        table = choices_table(p)
        if table:
            parts.append(f"<h2>Choices: {escape(p['name'])}</h2>" + _choice_plot(p) + table)
        if p.get("refused"):
            parts.append(f"<h2>Refused: {escape(p['name'])}</h2>" + _table(
                ["node", "reason"], [[r["node"], r["reason"]] for r in p["refused"]]))
    if report.get("deep_compression"):
        parts.append("<h2>Deep Compression, stage by stage</h2>" + _table(
            ["stage", "bytes", "vs original", "top-1"], deep_compression_rows(report["deep_compression"])))
    layers = ((report.get("latency_ms") or {}).get("onnxruntime") or {}).get("layers")
    if layers:
        parts.append("<h2>Latency per layer (onnxruntime profiler)</h2>" + _layer_latency(layers))
    if report.get("search"):
        parts.append("<h2>Search</h2>" + _search(report["search"]))
    parts.append("<h2>Fidelity vs the original (onnxruntime)</h2>" + _fidelity(report["fidelity"]["outputs"]))
    parts += _library(report.get("codegen"), report.get("tuning"))
    html = f"<!doctype html><html lang=en><meta charset=utf-8><title>graphopt report</title><style>{_STYLE}</style>" \
           f"<body>{''.join(parts)}</body></html>"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(html)
    tmp.replace(path)


_STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1100px}td,th{border:1px solid #ccc;padding:4px 8px}"
          "td{text-align:right}td:first-child{text-align:left}table{border-collapse:collapse;margin:1em 0}"
          "pre{margin:0;font-size:11px;text-align:left}.bad{color:#c00;font-weight:bold}.good{color:#080}"
          ".headline span{font-size:1.6em;margin-right:1.2em}tr.changed td{background:#fff6d5}"
          "svg{display:block;margin:.5em 0}")


_GREEN, _RED, _GREY = "#2ca02c", "#d62728", "#999"


# Byte and MAC counts that a compression pipeline should not raise: a rise is shown in red.
_LOWER_IS_BETTER = ("params", "size_bytes", "compressed_bytes", "file_bytes", "macs")


def headline(report: dict) -> list[tuple[str, bool]]:
    """The ratios a user looks for first, each with whether it is a regression: ("3.7x smaller",
    False), ("1.4x slower", True), ("accuracy −0.2 pt", True)."""
    b, a = report["before"], report["after"]
    items = [_ratio(b.get("size_bytes"), a.get("size_bytes"), "smaller", "bigger", "same size")]
    if b.get("macs") and a.get("macs") != b.get("macs"):
        items.append(_ratio(b["macs"], a["macs"], "fewer MACs", "more MACs", ""))
    lat = report.get("latency_ms", {}).get("onnxruntime")
    if lat:
        items.append(_ratio(lat.get("before"), lat.get("after"), "faster", "slower", "same speed"))
    acc = report.get("accuracy")
    if acc and _finite(acc.get("before")) and _finite(acc.get("after")):
        drop = acc["after"] - acc["before"]
        items.append(("accuracy unchanged", False) if abs(drop) < 0.005 else
                     (f"accuracy {'+' if drop > 0 else '−'}{abs(drop):.1f} pt", drop < 0))
    cg = report.get("codegen") or {}
    if lat and cg.get("latency_ms"):
        text, bad = _ratio(lat.get("before"), cg["latency_ms"], "faster", "slower", "as fast")
        items.append((f"library {text} than onnxruntime on the original", bad))
    return [item for item in items if item[0]]


def _ratio(before, after, better: str, worse: str, same: str) -> tuple[str, bool]:
    if not (_finite(before) and _finite(after)) or before <= 0 or after <= 0:
        return "", False
    if after == before:
        return same, False
    return (f"{before / after:.1f}x {better}", False) if after < before else (f"{after / before:.1f}x {worse}", True)


def _headline(report: dict) -> str:
    spans = "".join(f'<span class="{"bad" if bad else "good"}">{escape(text)}</span>' for text, bad in headline(report))
    return f'<p class="headline">{spans}</p>'


def _sizes(report: dict) -> str:
    b, a = report["before"], report["after"]
    rows = []
    for key in ("params", "size_bytes", "compressed_bytes", "file_bytes", "sparsity", "macs", "nodes"):
        if key in a:
            worse = key in _LOWER_IS_BETTER and _finite(b.get(key)) and _finite(a.get(key)) and a[key] > b[key]
            rows.append([key, _cell(key, b), _mark(_cell(key, a), worse)])
    lat = report.get("latency_ms", {}).get("onnxruntime")
    if lat:
        spread = lat.get("spread_pct") or {}
        slower = _finite(lat.get("before")) and _finite(lat.get("after")) and lat["after"] > lat["before"]
        rows.append(["onnxruntime latency, one sample (median ± half IQR)", escape(_ms(lat.get("before"),
                     spread.get("before"))), _mark(_ms(lat.get("after"), spread.get("after")), slower)])
    acc = report.get("accuracy")
    if acc:
        lost = _finite(acc.get("after")) and _finite(acc.get("before")) and acc["after"] < acc["before"]
        rows.append([f"{acc['metric']} ({acc.get('samples', '?')} samples)", escape(_num(acc.get("before"), ".2f")),
                     _mark(_num(acc.get("after"), ".2f"), lost)])
    return _table(["", "before", "after"], rows, raw=(1, 2))


def _mark(text: str, bad: bool) -> str:
    return f'<span class="bad">{escape(text)}</span>' if bad else escape(text)


def _ops_table(before: dict, after: dict) -> str:
    b, a = before.get("ops") or {}, after.get("ops") or {}
    if not (a or b):
        return ""
    rows = "".join(f'<tr{" class=changed" if b.get(op, 0) != a.get(op, 0) else ""}><td>{escape(op)}</td>'
                   f"<td>{b.get(op, 0):,}</td><td>{a.get(op, 0):,}</td><td>{a.get(op, 0) - b.get(op, 0):+,}</td></tr>"
                   for op in sorted(set(a) | set(b)))
    total = f"<tr><th>total</th><th>{sum(b.values()):,}</th><th>{sum(a.values()):,}</th><th></th></tr>"
    return f"<table><tr><th>op</th><th>before</th><th>after</th><th>change</th></tr>{rows}{total}</table>"


def _passes(records: list[dict]) -> str:
    rows = []
    for p in records:
        fid = list((p.get("fidelity") or {}).values())
        cosine = min((f["cosine"] for f in fid if _finite(f.get("cosine"))), default=None)
        sqnr = min((f.get("sqnr_db") for f in fid if f.get("sqnr_db") is not None), default=None)
        stats = escape(json_text(p["stats"], 1))
        rows.append([escape(p["name"]), escape(str(p["modified"])), escape(_num(p.get("seconds"), ".3f")),
                     str(len(p.get("decisions", {}))), str(len(p.get("refused", []))),
                     str(len(p.get("skipped", []))), escape(_num(cosine, ".6f")), escape(_db(sqnr)),
                     escape(_num(p.get("top1"), ".2f")),
                     f"<details><summary>stats</summary><pre>{stats}</pre></details>" if p["stats"] else ""])
    table = _table(["pass", "modified", "seconds", "layers decided", "refused", "skipped", "cosine after",
                    "SQNR after (dB)", "top-1 after (%)", ""], rows, raw=range(10))
    plots = _bars("seconds per pass", [(p["name"], p.get("seconds") or 0.0, _num(p.get("seconds"), ".2f") + " s",
                                        _GREY) for p in records])
    sqnrs = [(p["name"], min(f.get("sqnr_db", math.inf) for f in p["fidelity"].values())) for p in records
             if p.get("fidelity")]
    if sqnrs:
        plots += _bars("output SQNR vs the original after each pass (dB; ∞: identical outputs)",
                       [(name, s, _db(s), _GREEN if s is None or s >= 30 else _RED) for name, s in sqnrs])
    return table + plots


def _layer_plots(p: dict) -> list[str]:
    """One bar plot per kind of per-layer figure a pass recorded in its decisions."""
    d, name, plots = p.get("decisions") or {}, escape(p["name"]), []
    sparsity = [(k, 100 * v["sparsity"], f"{v['sparsity']:.1%}", _GREEN) for k, v in d.items()
                if _finite(v.get("sparsity"))]
    if sparsity:
        plots.append(_bars(f"{name}: sparsity per layer (%)", sparsity, top=100))
    channels = [(k, 100 * v["channels"][1] / v["channels"][0], f"{v['channels'][1]} of {v['channels'][0]} channels",
                 _GREEN) for k, v in d.items() if len(v.get("channels") or ()) == 2 and v["channels"][0]]
    if channels:
        plots.append(_bars(f"{name}: channels kept per group (%)", channels, top=100))
    ranks = [(k, 100 * v["params"]["after"] / v["params"]["before"],
              "rank " + ", ".join(f"{r}" if m == "rank" else f"{m} {r}" for m, r in v["ranks"].items())
              + f"; params {v['params']['after']:,} of {v['params']['before']:,}", _GREEN)
             for k, v in d.items() if isinstance(v.get("ranks"), dict) and (v.get("params") or {}).get("before")]
    if ranks:
        plots.append(_bars(f"{name}: rank kept per layer (bar: parameters kept, %)", ranks, top=100))
    sqnr = [(k, v.get("output_sqnr_db", v.get("weight_sqnr_db")), "; ".join(
             f"{w} {_db(v[key])} dB" for w, key in (("weight", "weight_sqnr_db"), ("output", "output_sqnr_db"))
             if key in v), _GREEN) for k, v in d.items() if "weight_sqnr_db" in v or "output_sqnr_db" in v]
    if sqnr:
        plots.append(_bars(f"{name}: SQNR per quantized layer (dB)", sqnr))
    sens = [(k, v["sensitivity_sqnr_db"], f"{_db(v['sensitivity_sqnr_db'])} dB; {v.get('chosen', '')}",
             _RED if v.get("chosen") == "float" else _GREEN) for k, v in d.items() if "sensitivity_sqnr_db" in v]
    if sens:
        plots.append(_bars(f"{name}: model SQNR with only this layer quantized (dB; red: kept float)", sens))
    return [f"<h2>Per layer: {name}</h2>" + "".join(plots)] if plots else []


def _choice_plot(p: dict) -> str:
    rows = [(f"{layer} {c}", ms, f"{_num(ms, '.4g')} ms" + (" (chosen)" if c == v["chosen"] else ""),
             _GREEN if c == v["chosen"] else _GREY)
            for layer, v in choices(p).items() for c, ms in (v.get("timings_ms") or {}).items()]
    return _bars("measured time per candidate (ms)", rows) if rows else ""


def _layer_latency(layers: dict, shown: int = 20) -> str:
    """Before and after bars of the `shown` nodes that take longest in either model (by the names
    onnxruntime runs them under: a node a pass removed has no after bar, a new one no before)."""
    before, after = layers.get("before") or {}, layers.get("after") or {}
    names = sorted(set(before) | set(after), key=lambda n: -max(before.get(n, 0.0), after.get(n, 0.0)))[:shown]
    rows = []
    for name in names:
        b, a = before.get(name), after.get(name)
        rows.append((f"{name} before", b, "-" if b is None else f"{b:.4f} ms", _GREY))
        worse = b is not None and a is not None and a > b * 1.1
        rows.append((f"{name} after", a, "-" if a is None else f"{a:.4f} ms", _RED if worse else _GREEN))
    total = f"all nodes: {sum(before.values()):.4f} ms before, {sum(after.values()):.4f} ms after (per run)"
    return f"<p>{escape(total)}</p>" + _bars(f"the {len(names)} slowest nodes, ms per run", rows)


def _bars(title: str, rows: list[tuple[str, float | None, str, str]], top: float | None = None) -> str:
    """A horizontal bar chart as inline SVG: one row per (label, value, text, colour). A value of
    inf (an exact layer's SQNR) fills the row; None or NaN draws no bar."""
    label_w, bar_w, row_h = 200, 380, 18
    finite = [v for _, v, _, _ in rows if _finite(v)]
    top = top or max(finite + [1e-12])
    out = [f'<text x="0" y="14" font-size="13" font-weight="bold">{escape(title)}</text>']
    for i, (label, value, text, colour) in enumerate(rows):
        y = 24 + i * row_h
        if value is not None and not math.isnan(value):
            w = bar_w if math.isinf(value) and value > 0 else max(0.0, min(value, top)) / top * bar_w
            out.append(f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{row_h - 4}" fill="{colour}"/>')
        short = label if len(label) <= 30 else label[:29] + "…"
        out.append(f'<text x="{label_w - 6}" y="{y + 11}" font-size="11" text-anchor="end">'
                   f"<title>{escape(label)}</title>{escape(short)}</text>"
                   f'<text x="{label_w + bar_w + 6}" y="{y + 11}" font-size="11">{escape(text)}</text>')
    height = 30 + len(rows) * row_h
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + bar_w + 260}" height="{height}" '
            f'role="img">{"".join(out)}</svg>')


def pareto_front(points: list[dict], x: str, y: str) -> list[dict]:
    """The points no other point beats on both `x` (lower is better) and `y` (higher is better),
    in increasing `x`."""
    front, best = [], -math.inf
    for p in sorted(points, key=lambda p: (p[x], -p[y])):
        if p[y] > best:
            front.append(p)
            best = p[y]
    return front


def _search(search: dict) -> str:
    """The candidates the search measured and their Pareto front: cost (latency, else size, else
    MACs) against quality (accuracy, else cosine, else SQNR)."""
    points = next((v for k in ("candidates", "trials", "points", "evaluated", "pareto") for v in [search.get(k)]
                   if isinstance(v, list) and v and isinstance(v[0], dict)), [])
    x = next((k for k in ("latency_ms", "size_bytes", "compressed_bytes", "macs", "params")
              if any(_finite(p.get(k)) for p in points)), None)
    y = next((k for k in ("accuracy", "top1", "cosine", "sqnr_db") if any(_finite(p.get(k)) for p in points)), None)
    if not (x and y):
        return f"<details><summary>search</summary><pre>{escape(json_text(search, 1))}</pre></details>"
    points = [p for p in points if _finite(p.get(x)) and _finite(p.get(y))]
    front = pareto_front(points, x, y)
    width, height, m = 560, 300, 50
    x0, x1 = min(p[x] for p in points), max(p[x] for p in points)
    y0, y1 = min(p[y] for p in points), max(p[y] for p in points)

    def xy(p):
        return (m + (p[x] - x0) / ((x1 - x0) or 1) * (width - 2 * m),
                height - m - (p[y] - y0) / ((y1 - y0) or 1) * (height - 2 * m))

    def label(p):
        return str(p.get("spec") or p.get("pipeline") or p.get("passes") or "")

    dots = "".join(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{5 if p in front else 3}" '
                   f'fill="{_RED if p in front else _GREY}"><title>{escape(label(p))}</title></circle>'
                   for p in points for cx, cy in [xy(p)])
    line = " ".join(f"{cx:.1f},{cy:.1f}" for cx, cy in map(xy, front))
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">'
           f'<line x1="{m}" y1="{height - m}" x2="{width - m}" y2="{height - m}" stroke="#999"/>'
           f'<line x1="{m}" y1="{m}" x2="{m}" y2="{height - m}" stroke="#999"/>'
           f'<polyline fill="none" stroke="{_RED}" points="{line}"/>{dots}'
           f'<text x="{width / 2}" y="{height - 12}" font-size="11" text-anchor="middle">{escape(x)} '
           f"({x0:.4g} .. {x1:.4g}; lower is better)</text>"
           f'<text x="4" y="{m - 10}" font-size="11">{escape(y)} ({y0:.4g} .. {y1:.4g}; higher is better)</text></svg>')
    rows = [[label(p), _num(p[x], ".4g"), _num(p[y], ".4g")] for p in front]
    return f"<p>{len(points)} candidates; red: the Pareto front</p>" + svg + _table(["candidate", x, y], rows)


def _library(cg: dict | None, tuning: dict | None) -> list[str]:
    if not cg:
        return []
    parts = [f"<h2>Library: {escape(cg['target'])}</h2><p>{escape(cg['library'])}, "
             f"built in {_num(cg.get('build_seconds'), '.1f')} s</p>"]
    if "fidelity" in cg:
        parts.append(_fidelity(cg["fidelity"]) + f"<p>latency {escape(_ms(cg.get('latency_ms'), cg.get('latency_spread_pct')))}"
                     " (median ± half the interquartile range)</p>")
    if "not_run" in cg:
        parts.append(f"<p>not run: {escape(cg['not_run'])}</p>")
    if tuning:
        parts.append("<details><summary>tuning</summary><pre>"
                     f"{escape(json_text(tuning, 1))}</pre></details>")
    return parts


def _fidelity(outputs: dict) -> str:
    return _table(["output", "max abs error", "cosine", "SQNR (dB)"],
                  [[name, _num(f.get("max_abs"), ".3g"), _num(f.get("cosine"), ".6f"), _db(f.get("sqnr_db"))]
                   for name, f in outputs.items()])


def _finite(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(value)


def _num(value, spec: str) -> str:
    return format(value, spec) if _finite(value) else "n/a"


def _db(value) -> str:
    if value is not None and math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return _num(value, ".1f")


def _ms(median, spread=None) -> str:
    if not _finite(median):
        return "n/a"
    return f"{median:.4f} ms" + (f" ±{spread:.0f}%" if _finite(spread) else "")


def choices_table(record: dict) -> str:
    """`choices` as an HTML table: layer, choice, the time of each candidate and why; empty when
    the pass chose nothing."""
    layers = choices(record)
    if not layers:
        return ""
    candidates = list(dict.fromkeys(c for v in layers.values() for c in v.get("timings_ms", {})))
    rows = [[name, v["chosen"], *(thousands(v.get("timings_ms", {}).get(c)) for c in candidates), v.get("reason", "")]
            for name, v in layers.items()]
    return _table(["layer", "chosen", *(f"{c} ms" for c in candidates), "why"], rows)


def _cell(key: str, summary: dict) -> str:
    value = summary.get(key)
    if value is None:
        return "n/a"
    return f"{value:.2%}" if key == "sparsity" else f"{value:,}"


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


def _table(header: list[str], rows: list[list[str]], raw: Iterable[int] = ()) -> str:
    """An HTML table; every cell is escaped except the columns in `raw` (already HTML)."""
    raw = set(raw)
    body = "".join("<tr>" + "".join(f"<td>{c if i in raw else escape(c)}</td>" for i, c in enumerate(r)) + "</tr>"
                   for r in rows)
    return "<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + f"</tr>{body}</table>"
