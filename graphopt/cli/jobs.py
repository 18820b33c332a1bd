"""The jobs that write outputs: optimize, compile and tune. All of a job's outputs appear together
in OUTDIR or none do."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from graphopt.cli.progress import Progress, ProgressBar
from graphopt.ir import io
from graphopt.ir.errors import GraphoptError
from graphopt.ir.shapes import parse_input_shapes, specialize
from graphopt.optimize import optimize
from graphopt.passes.pipeline import Pipeline
from graphopt.report import choices, pass_outcome, write_html, write_json

MODEL_NAME = "model.opt.onnx"


def cmd_tune(args) -> int:
    from graphopt import deploy

    target = _target(args)
    graph = io.load(args.model)
    bar = None if args.quiet else ProgressBar("tuning")
    result = deploy.tune_for_target(graph, target, Path(args.db), args.trials, args.tune_seconds, bar)
    if bar:
        bar.close()
    print(json.dumps(result, indent=2))
    return 0


def cmd_optimize(args) -> int:
    spec = Pipeline.load(args.pipeline) if args.pipeline else Pipeline.parse(args.passes)
    return _job(args, spec, write_model=True)


def cmd_compile(args) -> int:
    return _job(args, Pipeline([]), write_model=False)


def _job(args, pipeline: Pipeline, write_model: bool) -> int:
    """Passes, then (with --target) tuning and compilation; all outputs appear together or not at all."""
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise GraphoptError(f"{out_dir}: -o names a file; give a folder for the outputs")
    if (out_dir / MODEL_NAME).resolve() == Path(args.model).resolve():
        raise GraphoptError(f"{args.model}: output {out_dir / MODEL_NAME} would overwrite the input model")
    shapes = parse_input_shapes(args.input_shape)
    target = _target(args)
    progress = None if args.quiet or not pipeline else Progress()
    try:
        result = optimize(args.model, pipeline, data=args.data, verify=not args.no_verify,
                          instruments=(progress,) if progress else (), seed=args.seed,
                          target_timer=_timer(target, pipeline), input_shapes=shapes or None,
                          static=getattr(args, "static", False), opset=getattr(args, "opset", None),
                          max_drop=getattr(args, "max_drop", None), min_cosine=getattr(args, "min_cosine", None))
    finally:
        if progress:
            progress.end_line()
    _write_outputs(result, out_dir, args, target, write_model, shapes)
    if not args.quiet:
        print_report(result.report, out_dir)
    if getattr(args, "explain", False):
        for line in _refusals(result.report["passes"]):
            print(line)
    return 0


def _timer(target, pipeline: Pipeline):
    """The target's timer, only when a pass will measure (compiling candidates costs seconds)."""
    if target is None or not any(p.info.needs_latency for p in pipeline):
        return None
    from graphopt import deploy

    return deploy.target_timer(target)


def _target(args):
    if not args.target:
        if args.tune:
            raise GraphoptError("--tune needs --target")
        return None
    from graphopt import codegen

    return codegen.resolve(args.target, args.cuda_arch)


def _write_outputs(result, out_dir: Path, args, target, write_model: bool, shapes: dict) -> None:
    """Stage every output in a temporary folder beside OUTDIR, then move them in: a failure
    leaves no partial output."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        staged = Path(tmp)
        report = dict(result.report, model=str(args.model))
        if write_model:
            io.save(result.graph, staged / MODEL_NAME)
            report["output"] = str(out_dir / MODEL_NAME)
            # Over 2 GB the weights are in MODEL_NAME.data beside the model.
            report["after"]["file_bytes"] = sum(p.stat().st_size for p in staged.glob(MODEL_NAME + "*"))
        if target is not None:
            report.update(_codegen(result, target, staged, out_dir, args, shapes))
        write_json(report, staged / "report.json")
        write_html(report, staged / "report.html")
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in os.listdir(staged):
            os.replace(staged / name, out_dir / name)
        result.report = report


def _codegen(result, target, staged: Path, out_dir: Path, args, shapes: dict) -> dict:
    """Tune and build; with --input-shape the library is built for those dims (shape-computing
    subgraphs then resolve to constants)."""
    from graphopt import deploy

    graph = specialize(result.graph, shapes) if shapes else result.graph
    if (out_dir / "manifest.json").exists():  # keep the entries of libraries built for other targets
        shutil.copy(out_dir / "manifest.json", staged / "manifest.json")
    sections = {}
    database = Path(args.db) if args.db else (out_dir / "tuning-db" if args.tune else None)
    if args.tune:
        bar = None if args.quiet else ProgressBar("tuning")
        sections["tuning"] = deploy.tune_for_target(graph, target, database, args.trials,
                                                    args.tune_seconds, bar, feeds=result.feeds)
        if bar:
            bar.close()
    section = deploy.build_for_target(graph, target, staged, result.feeds, result.reference, database)
    section["library"] = str(out_dir / Path(section["library"]).name)
    section["manifest"] = str(out_dir / "manifest.json")
    sections["codegen"] = section
    return sections


def print_report(report: dict, out_dir: Path) -> None:
    b, a = report["before"], report["after"]
    print(f"{'':17}{'before':>16}{'after':>16}")
    for key in ("params", "size_bytes", "compressed_bytes", "macs", "nodes"):
        if b.get(key) is not None and a.get(key) is not None:
            print(f"{key:17}{b[key]:>16,}{a[key]:>16,}")
    if "sparsity" in a:
        print(f"{'sparsity':17}{b['sparsity']:>16.3f}{a['sparsity']:>16.3f}")
    if "latency_ms" in report:
        lat = report["latency_ms"]["onnxruntime"]
        print(f"{'ORT ms':17}{lat['before']:>16.4f}{lat['after']:>16.4f}")
    if b.get("symbolic_dims"):
        print(f"MACs count the symbolic dims {', '.join(b['symbolic_dims'])} as 1: give --input-shape NAME=D0,D1,... "
              f"or --data for the real count")
    for note in report.get("notes", []):
        print(f"note: {note}")
    for record in report["passes"]:
        if record["stats"].get("warning"):
            print(f"warning: {record['name']}: {record['stats']['warning']}")
        if "opset" in record["stats"]:
            print(f"{record['name']}: upgraded the model's opset {record['stats']['opset']} first (verified EXACT)")
        for layer, choice in choices(record).items():
            print(f"{record['name']}: {layer}: {choice['chosen']} ({choice.get('reason', '')})")
        line = pass_outcome(record)
        if line:
            print(line)
    if report["passes"] and not any(r["modified"] for r in report["passes"]):
        print("no pass changed the model")
    for name, f in report["fidelity"]["outputs"].items():
        print(f"fidelity {name}: {_metrics(f)}")
    acc = report.get("accuracy")
    if acc:
        print(f"{acc['metric']}: {acc['before']:.2f}% -> {acc['after']:.2f}% on {acc['samples']} held-aside samples")
    cg = report.get("codegen")
    if cg:
        print(f"library {cg['library']} ({cg['target']}, built in {cg['build_seconds']:.1f}s)")
        for line in cg.get("host", []):
            print(f"on the host: {line}")
        for name, f in cg.get("fidelity", {}).items():
            print(f"library fidelity {name}: {_metrics(f)}; latency {cg['latency_ms']:.4f} ms")
        if "not_run" in cg:
            print(f"library not run: {cg['not_run']}")
    print(f"wrote {', '.join(sorted(os.listdir(out_dir)))} in {out_dir}")


def _metrics(f: dict) -> str:
    return f"max_abs={f['max_abs']:.3g} cosine={f['cosine']:.6f} sqnr={f['sqnr_db']:.1f} dB"


def _refusals(records: list[dict]):
    for record in records:
        for kind in ("refused", "skipped"):
            for r in record.get(kind, []):
                where = f"{record['name']} ({r['rule']})" if r.get("rule") else record["name"]
                yield f"{where}: {kind} {r['node'] or '(graph)'}: {r['reason']}"
