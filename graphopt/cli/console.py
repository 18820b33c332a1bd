"""The summary `graphopt optimize` and `compile` print: size and cost before and after, the ops
whose count changed (as onnxslim prints them), latency as median ± spread, what each pass left
alone, fidelity and the library. Built from report.json's dict alone, so what the console says
and what the report holds cannot disagree."""
from __future__ import annotations

import math
import os
from pathlib import Path

from graphopt.report import choices, format_deep_compression, pass_outcome

VALUE = 16  # width of the before / after columns
_COUNTS = ("params", "size_bytes", "compressed_bytes", "macs", "nodes")


def print_report(report: dict, out_dir: Path) -> None:
    for line in summary_lines(report):
        print(line)
    written = report.get("written") or sorted(os.listdir(out_dir))  # a report from before "written" existed
    print(f"wrote {', '.join(written)} in {out_dir}")


def summary_lines(report: dict) -> list[str]:
    b, a = report["before"], report["after"]
    changed = op_changes(b, a)
    # One label column for every row, wide enough for the longest (compressed_bytes, an op name).
    width = max([len(k) for k in _COUNTS] + [len(op) for op, _, _ in changed] + [len("ORT latency")]) + 2
    lines = [f"{'':{width}}{'before':>{VALUE}}{'after':>{VALUE}}"]
    for key in _COUNTS:
        if b.get(key) is not None and a.get(key) is not None:
            lines.append(f"{key:{width}}{b[key]:>{VALUE},}{a[key]:>{VALUE},}")
    if "sparsity" in a and "sparsity" in b:
        lines.append(f"{'sparsity':{width}}{b['sparsity']:>{VALUE}.3f}{a['sparsity']:>{VALUE}.3f}")
    lat = report.get("latency_ms", {}).get("onnxruntime")
    if lat:
        spread = lat.get("spread_pct") or {}
        row = (f"{'ORT latency':{width}}{latency_text(lat['before'], spread.get('before')):>{VALUE}}"
               f"{latency_text(lat['after'], spread.get('after')):>{VALUE}}")
        lines.append(row + ("  slower than the original" if _slower(lat["before"], lat["after"]) else ""))
    if changed:
        lines.append(f"{'op':{width}}{'before':>{VALUE}}{'after':>{VALUE}}")
        lines += [f"{op:{width}}{n0:>{VALUE},}{n1:>{VALUE},}" for op, n0, n1 in changed]
        lines.append(f"{'total':{width}}{sum(b['ops'].values()):>{VALUE},}{sum(a['ops'].values()):>{VALUE},}")
    if b.get("symbolic_dims"):
        lines.append(f"MACs count the symbolic dims {', '.join(b['symbolic_dims'])} as 1: give --input-shape "
                     f"NAME=D0,D1,... or --data for the real count")
    lines += [f"note: {note}" for note in report.get("notes", [])]
    lines += _pass_lines(report["passes"])
    for name, f in report["fidelity"]["outputs"].items():
        lines.append(f"fidelity {name}: {_metrics(f)}")
    acc = report.get("accuracy")
    if acc:
        lines.append(f"{acc['metric']}: {acc['before']:.2f}% -> {acc['after']:.2f}% on {acc['samples']} "
                     f"held-aside samples")
    if report.get("deep_compression"):
        lines += format_deep_compression(report["deep_compression"])
    lines += _library_lines(report.get("codegen"))
    return lines


def op_changes(before: dict, after: dict) -> list[tuple[str, int, int]]:
    """(op type, count before, count after) for each op whose count changed, in name order."""
    b, a = before.get("ops") or {}, after.get("ops") or {}
    return [(op, b.get(op, 0), a.get(op, 0)) for op in sorted(set(b) | set(a)) if b.get(op, 0) != a.get(op, 0)]


def latency_text(median: float | None, spread_pct: float | None = None) -> str:
    """'0.0280 ms ±12%'; without a spread (an older report) the median alone."""
    if median is None:
        return "n/a"
    text = f"{median:.4f} ms"
    return text + (f" ±{spread_pct:.0f}%" if spread_pct is not None and math.isfinite(spread_pct) else "")


def _slower(before, after) -> bool:
    return before is not None and after is not None and after > before


def _pass_lines(records: list[dict]) -> list[str]:
    lines = []
    for record in records:
        if record["stats"].get("warning"):
            lines.append(f"warning: {record['name']}: {record['stats']['warning']}")
        if "opset" in record["stats"]:
            lines.append(f"{record['name']}: upgraded the model's opset {record['stats']['opset']} first "
                         f"(verified EXACT)")
        for layer, choice in choices(record).items():
            lines.append(f"{record['name']}: {layer}: {choice['chosen']} ({choice.get('reason', '')})")
        line = pass_outcome(record)
        if line:
            lines.append(line)
    if records and not any(r["modified"] for r in records):
        lines.append("no pass changed the model")
    return lines


def _library_lines(cg: dict | None) -> list[str]:
    if not cg:
        return []
    int8 = f", int8 on {cg['int8_instruction']}" if cg.get("int8_instruction") else ""
    lines = [f"library {cg['library']} ({cg['target']}{int8}, built in {cg['build_seconds']:.1f}s)"]
    lines += [f"on the host: {line}" for line in cg.get("host", [])]
    for name, f in cg.get("fidelity", {}).items():
        lines.append(f"library fidelity {name}: {_metrics(f)}; latency "
                     f"{latency_text(cg.get('latency_ms'), cg.get('latency_spread_pct'))}")
    if "not_run" in cg:
        lines.append(f"library not run: {cg['not_run']}")
    return lines


def _metrics(f: dict) -> str:
    """max_abs, cosine and SQNR of one output (an SQNR of inf: identical outputs; None, as
    report.json writes a non-finite value: n/a)."""
    return (f"max_abs={_num(f.get('max_abs'), '.3g')} cosine={_num(f.get('cosine'), '.6f')} "
            f"sqnr={_num(f.get('sqnr_db'), '.1f')} dB")


def _num(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)
