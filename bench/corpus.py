"""Benchmark: every pass family on every corpus model (tests/corpus/manifest.toml), and compilation.

    python bench/corpus.py                      # every model that can be had, every family, compile
    python bench/corpus.py --quick              # the default suite's models, no compile
    python bench/corpus.py --models magika --families quantize lower-int8

Each cell runs graphopt's Python API (load, optimize with the model's sample data, verify on) and is
modified / refused / failed (tests/corpus/corpus_run.py says what each means), with the output
cosine against the original, the size and MACs ratios (after / before) and seconds. The compile
column builds the original model for x86 (`graphopt.codegen.compile`, input shapes of one sample)
and says whether the library's outputs agree with onnxruntime's. Models that cannot be had
(registry unreachable, torch models not built) are listed as such. Prints the table and writes
bench/results/corpus.json and bench/results/corpus.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
# The corpus helpers live with its tests; timing.py beside this script (bench/ is on sys.path).
sys.path.insert(0, str(ROOT / "tests" / "corpus"))
import corpus_compile
import corpus_lib
import corpus_run
from timing import machine


RESULTS = ROOT / "bench" / "results"
TARGET = "x86"
def bench_model(model: corpus_lib.Model, families: list[str], compile_: bool) -> dict:
    try:
        path = corpus_lib.fetch(model)
    except corpus_lib.Unavailable as e:
        return {"id": model.id, "unavailable": str(e)}
    feeds = corpus_lib.samples(model)
    row = {"id": model.id, "opset": model.opset, "exporter": model.exporter, "cells": {}}
    for family in families:
        outcome = corpus_run.run(path, family, feeds)
        row["cells"][family] = _cell(outcome)
        print(f"  {model.id:26s} {family:17s} {outcome.status:8s} {outcome.seconds:6.1f}s  "
              f"{outcome.message[:150]}", flush=True)
    if compile_:
        row["compile"] = corpus_compile.compile_and_compare(model, path, feeds, TARGET)
        print(f"  {model.id:26s} {'compile':17s} {row['compile']['status']:8s} "
              f"{row['compile']['seconds']:6.1f}s  {row['compile']['message'][:150]}", flush=True)
    return row


def _cell(outcome: corpus_run.Outcome) -> dict:
    cell = {"status": outcome.status, "message": outcome.message, "seconds": round(outcome.seconds, 2)}
    if outcome.result is not None:
        before, after = outcome.result.report["before"], outcome.result.report["after"]
        cell["cosine"] = corpus_run.min_cosine(outcome.result)
        cell["size_ratio"] = round(after["size_bytes"] / before["size_bytes"], 4)
        cell["macs_ratio"] = round(after["macs"] / before["macs"], 4) if before["macs"] else None
    return cell


def markdown(rows: list[dict], families: list[str]) -> str:
    has_compile = any("compile" in r for r in rows)
    head = ["model", "opset", *families] + (["compile (x86)"] if has_compile else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if "unavailable" in row:
            lines.append(f"| {row['id']} | | unavailable: {row['unavailable']} |")
            continue
        cells = [_short(row["cells"][f]) for f in families]
        if has_compile:
            cells.append(row["compile"]["status"] if "compile" in row else "")
        lines.append(f"| {row['id']} | {row['opset']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nCell: status, output cosine, size ratio, MACs ratio, seconds.\n"


def _short(cell: dict) -> str:
    parts = [cell["status"]]
    if cell["status"] == "modified":
        parts += [f"cos {cell['cosine']:.4f}" if cell.get("cosine") is not None else "cos -",
                  f"size {cell['size_ratio']:.2f}", f"MACs {cell['macs_ratio']:.2f}" if cell.get("macs_ratio") else "MACs -"]
    parts.append(f"{cell['seconds']:.1f}s")
    return " ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="models of the default suite only, no compile")
    parser.add_argument("--models", nargs="*", help="corpus ids (default: all)")
    parser.add_argument("--families", nargs="*", choices=list(corpus_run.FAMILIES), default=list(corpus_run.FAMILIES))
    parser.add_argument("--no-compile", action="store_true", help="leave out the compile column")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for corpus.json and corpus.md")
    args = parser.parse_args()
    models = [m for m in corpus_lib.models() if (not args.models or m.id in args.models)
              and not (args.quick and m.slow)]
    compile_ = not (args.quick or args.no_compile)
    rows = []
    for model in models:
        print(model.id, flush=True)
        rows.append(bench_model(model, args.families, compile_))
    table = markdown(rows, args.families)
    print("\n" + table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "corpus.json").write_text(json.dumps({"machine": machine(), "target": TARGET, "rows": rows}, indent=1))
    (args.out / "corpus.md").write_text(table)


if __name__ == "__main__":
    main()
