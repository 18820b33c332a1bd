"""The `graphopt` command line. The only module that prints or parses arguments."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from onnx_graphsurgeon.logger import G_LOGGER as gs_logger

from graphopt import __version__
from graphopt.ir import fidelity, io, ort
from graphopt.ir.data import input_specs, load_feeds, random_feeds
from graphopt.ir.errors import DataError, GraphoptError, PipelineError
from graphopt.ir.graph import infer_shapes
from graphopt.optimize import optimize
from graphopt.passes import registry
from graphopt.passes.manager import Instrument
from graphopt.passes.pipeline import Pipeline
from graphopt.report import format_summary, summarize, write_html, write_json

MODEL_NAME = "model.opt.onnx"


class ProgressBar:
    """A progress callback (done, total) drawn on stderr: redrawn in place on a terminal, a line
    per tenth otherwise (logs stay short)."""

    def __init__(self, label: str):
        self.label, self.start, self.shown = label, time.perf_counter(), -1

    def __call__(self, done: int, total: int) -> None:
        total = max(total, 1)
        elapsed = time.perf_counter() - self.start
        if sys.stderr.isatty():
            filled = int(30 * min(done, total) / total)
            print(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} {elapsed:.0f}s",
                  end="", file=sys.stderr, flush=True)
        elif 10 * done // total > self.shown:
            self.shown = 10 * done // total
            print(f"{self.label}: {done}/{total} ({elapsed:.0f}s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if sys.stderr.isatty():
            print(file=sys.stderr)


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


class Progress(Instrument):
    """One line per pass on stderr: what is running, then how long it took."""

    def before_pass(self, pass_, graph, index, total):
        print(f"[{index + 1}/{total}] {pass_!r} ...", end="", file=sys.stderr, flush=True)
        self._start = time.perf_counter()

    def after_pass(self, pass_, graph, record):
        state = "modified" if record.modified else "unchanged"
        print(f" {state} in {time.perf_counter() - self._start:.2f}s", file=sys.stderr, flush=True)


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
    target = _target(args)
    result = optimize(args.model, pipeline, data=args.data, verify=not args.no_verify,
                      instruments=() if args.quiet or not pipeline else (Progress(),), seed=args.seed)
    _write_outputs(result, out_dir, args, target, write_model)
    if not args.quiet:
        _print_report(result.report, out_dir)
    if getattr(args, "explain", False):
        for line in _refusals(result.report["passes"]):
            print(line)
    return 0


def _target(args):
    if not args.target:
        if args.tune:
            raise GraphoptError("--tune needs --target")
        return None
    from graphopt import codegen

    return codegen.resolve(args.target, args.cuda_arch)


def _write_outputs(result, out_dir: Path, args, target, write_model: bool) -> None:
    """Stage every output in a temporary folder beside OUTDIR, then move them in: a failure
    leaves no partial output."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        staged = Path(tmp)
        report = dict(result.report, model=str(args.model))
        if write_model:
            io.save(result.graph, staged / MODEL_NAME)
            report["output"] = str(out_dir / MODEL_NAME)
            report["after"]["file_bytes"] = (staged / MODEL_NAME).stat().st_size
        if target is not None:
            report.update(_codegen(result, target, staged, out_dir, args))
        write_json(report, staged / "report.json")
        write_html(report, staged / "report.html")
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in os.listdir(staged):
            os.replace(staged / name, out_dir / name)
        result.report = report


def _codegen(result, target, staged: Path, out_dir: Path, args) -> dict:
    from graphopt import deploy

    if (out_dir / "manifest.json").exists():  # keep the entries of libraries built for other targets
        shutil.copy(out_dir / "manifest.json", staged / "manifest.json")
    sections = {}
    database = Path(args.db) if args.db else (out_dir / "tuning-db" if args.tune else None)
    if args.tune:
        bar = None if args.quiet else ProgressBar("tuning")
        sections["tuning"] = deploy.tune_for_target(result.graph, target, database, args.trials,
                                                    args.tune_seconds, bar)
        if bar:
            bar.close()
    section = deploy.build_for_target(result.graph, target, staged, result.feeds, result.reference, database)
    section["library"] = str(out_dir / Path(section["library"]).name)
    section["manifest"] = str(out_dir / "manifest.json")
    sections["codegen"] = section
    return sections


def _print_report(report: dict, out_dir: Path) -> None:
    b, a = report["before"], report["after"]
    print(f"{'':14}{'before':>16}{'after':>16}")
    for key in ("params", "size_bytes", "compressed_bytes", "macs", "nodes"):
        if b.get(key) is not None and a.get(key) is not None:
            print(f"{key:14}{b[key]:>16,}{a[key]:>16,}")
    if "sparsity" in a:
        print(f"{'sparsity':14}{b['sparsity']:>16.3f}{a['sparsity']:>16.3f}")
    if "latency_ms" in report:
        lat = report["latency_ms"]["onnxruntime"]
        print(f"{'ORT ms':14}{lat['before']:>16.4f}{lat['after']:>16.4f}")
    for name, f in report["fidelity"]["outputs"].items():
        print(f"fidelity {name}: {_metrics(f)}")
    cg = report.get("codegen")
    if cg:
        print(f"library {cg['library']} ({cg['target']}, built in {cg['build_seconds']:.1f}s)")
        for name, f in cg.get("fidelity", {}).items():
            print(f"library fidelity {name}: {_metrics(f)}; latency {cg['latency_ms']:.4f} ms")
        if "not_run" in cg:
            print(f"library not run: {cg['not_run']}")
    print(f"wrote {', '.join(sorted(os.listdir(out_dir)))} in {out_dir}")


def _metrics(f: dict) -> str:
    return f"max_abs={f['max_abs']:.3g} cosine={f['cosine']:.6f} sqnr={f['sqnr_db']:.1f} dB"


def _refusals(records: list[dict]):
    def walk(stats, where):
        if isinstance(stats, dict):
            for r in stats.get("refused", []):
                yield f"{where}: {r.get('node')}: {r['reason']}"
            for key, value in stats.items():
                if isinstance(value, dict):
                    yield from walk(value, key)
    for record in records:
        yield from walk(record["stats"], record["name"])


def cmd_inspect(args) -> int:
    graph = infer_shapes(io.load(args.model))
    summary = summarize(graph, layers=True)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def cmd_passes(args) -> int:
    import dataclasses

    for cls in registry.BUILTIN:
        doc = (sys.modules[cls.__module__].__doc__ or "").strip()
        print(f"{cls.name}    [{cls.info.semantics.describe()}]")
        for f in dataclasses.fields(cls.Options):
            print(f"    option {f.name} = {f.default!r}")
        print("    " + doc.replace("\n", "\n    ") + "\n")
    return 0


def cmd_verify(args) -> int:
    original, candidate = io.load(args.original), io.load(args.optimized)
    specs = input_specs(original)
    feeds = load_feeds(args.data, specs) if args.data else random_feeds(specs, args.seed)
    ref, out = ort.run(original, feeds), ort.run(candidate, feeds)
    try:
        metrics = fidelity.compare(ref, out)
    except ValueError as e:
        raise GraphoptError(f"{args.optimized}: {e}") from None
    worst = 1.0
    for name, m in metrics.items():
        print(f"{name}: max_abs={m.max_abs:.6g} cosine={m.cosine:.6f} sqnr_db={m.sqnr_db:.2f}")
        worst = min(worst, m.cosine)
    labels = _labels(args.data)
    if labels is not None:
        first = next(iter(ref))
        acc = [float(np.mean(np.argmax(o[first], axis=-1) == labels)) for o in (ref, out)]
        print(f"accuracy: original={acc[0]:.4f} optimized={acc[1]:.4f}")
    if args.min_cosine is not None and worst < args.min_cosine:
        print(f"cosine {worst:.6f} is below --min-cosine {args.min_cosine}", file=sys.stderr)
        return 1
    return 0


def cmd_sensitivity(args) -> int:
    from graphopt.passes import sensitivity
    from graphopt.report import format_sensitivity

    pipeline = Pipeline.parse(args.pass_spec)
    layerwise = [c.name for c in registry.BUILTIN if hasattr(c, "apply_layer")]
    if len(pipeline) != 1 or not hasattr(pipeline[0], "apply_layer"):
        raise PipelineError(f"--pass takes one pass that works per layer ({', '.join(layerwise)}), "
                            f"not {args.pass_spec!r}")
    try:
        ratios = [float(r) for r in args.ratios.split(",")]
    except ValueError:
        raise PipelineError(f"--ratios {args.ratios!r}: give fractions separated by commas, e.g. 0.25,0.5,0.75"
                            ) from None
    graph = io.load(args.model)
    specs = input_specs(graph)
    feeds = load_feeds(args.data, specs) if args.data else random_feeds(specs, args.seed)
    bar = None if args.json or args.quiet else ProgressBar("sensitivity")
    table = sensitivity.analyze_pass(graph, pipeline[0], ratios, feeds, _labels(args.data), bar)
    if bar:
        bar.close()
    print(json.dumps(table.as_dict(), indent=2) if args.json else format_sensitivity(table.as_dict()))
    return 0


def _labels(data) -> np.ndarray | None:
    if not data or not str(data).endswith(".npz"):
        return None
    with np.load(data, allow_pickle=False) as z:
        return z["y"] if "y" in z.files else None


def _target_options(p: argparse.ArgumentParser, required: bool = False, db_required: bool = False) -> None:
    g = p.add_argument_group("code generation (Apache TVM)")
    g.add_argument("--target", required=required, metavar="T",
                   help="x86 (this CPU), x86-64 (generic), arm (aarch64+NEON), arm-dotprod, cuda, or a JSON target dict")
    g.add_argument("--cuda-arch", metavar="sm_XX", help="CUDA architecture for --target cuda (default sm_80)")
    if not db_required:
        g.add_argument("--tune", action="store_true", help="tune with MetaSchedule before compiling")
    g.add_argument("--db", required=db_required, metavar="DIR",
                   help="tuning database folder, reused across runs (default with --tune: OUTDIR/tuning-db)")
    g.add_argument("--trials", type=int, default=64, help="tuning trial budget (default 64)")
    g.add_argument("--time-budget", "--tune-seconds", dest="tune_seconds", type=_duration, metavar="T",
                   help="tuning wall-clock budget: seconds, or with a unit (90s, 10m, 1h)")


def cmd_quant_debug(args) -> int:
    from graphopt.passes.quant.insert_qdq import Options, diagnose

    graph = io.load(args.model)
    specs = input_specs(graph)
    feeds = load_feeds(args.data, specs) if args.data else random_feeds(specs, args.seed, batch=8)
    if not args.data:
        print("graphopt: warning: no --data; calibrating on random inputs", file=sys.stderr)
    bar = None if args.json or args.quiet else ProgressBar("calibration")
    ranking = diagnose(graph, feeds, Options(calibration=args.calibration), bar)
    if bar:
        bar.close()
    if args.json:
        print(json.dumps(ranking, indent=2))
    else:
        print(f"{'layer':<32} {'SQNR dB':>8}   (model outputs, only this layer quantized; worst first)")
        for name, sqnr in ranking.items():
            print(f"{name:<32} {sqnr:>8.2f}")
    return 0


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    scale = units.get(text[-1:].lower(), 1)
    try:
        value = float(text[:-1] if text[-1:].lower() in units else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a duration like 600, 90s, 10m or 1h") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"'{text}': the budget must be positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graphopt", description="Compress ONNX models with verified graph passes.")
    parser.add_argument("--version", action="version", version=f"graphopt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("optimize", help="run a pass pipeline and write OUTDIR/model.opt.onnx and report.json")
    p.add_argument("model", help="input ONNX model (never modified)")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--passes", default="canonicalize", metavar="SPEC",
                       help='pass spec, e.g. "fold-constants,fold-batchnorm" (default: canonicalize)')
    group.add_argument("--pipeline", metavar="FILE", help="pipeline as a YAML or TOML file")
    p.add_argument("--data", metavar="FILE", help="inputs as .npz (by input name, or x) or a folder of .npy")
    p.add_argument("--seed", type=int, default=0, help="seed for random inputs when no --data is given")
    p.add_argument("--no-verify", action="store_true", help="skip checker, invariants and fidelity checks between passes")
    p.add_argument("--explain", action="store_true", help="print why each refused rewrite was refused")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    _target_options(p)
    p.set_defaults(func=cmd_optimize)

    p = sub.add_parser("compile", help="compile a model with TVM for a target (no passes); writes the library, "
                                       "manifest.json and report.json")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR")
    p.add_argument("--data", metavar="FILE", help="inputs to check the library against onnxruntime")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-verify", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-q", "--quiet", action="store_true")
    _target_options(p, required=True)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("tune", help="tune a model's kernels with MetaSchedule into a reusable database")
    p.add_argument("model")
    p.add_argument("-q", "--quiet", action="store_true")
    _target_options(p, required=True, db_required=True)
    p.set_defaults(func=cmd_tune, tune=True)

    p = sub.add_parser("inspect", help="ops, parameters, size, MACs per layer, inputs and outputs")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("passes", help="list the passes, their options and guarantees")
    p.set_defaults(func=cmd_passes)

    p = sub.add_parser("verify", help="compare two models' outputs in onnxruntime")
    p.add_argument("original")
    p.add_argument("optimized")
    p.add_argument("--data", metavar="FILE", help="inputs (.npz or .npy folder); an npz with y also gives accuracy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-cosine", type=float, help="exit 1 if any output's cosine similarity is lower")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("sensitivity", help="apply a pass to one layer at a time at several ratios and "
                                           "measure fidelity (and accuracy)")
    p.add_argument("model")
    p.add_argument("--data", metavar="FILE", help="inputs (.npz or .npy folder); an npz with y also gives "
                                                  "accuracy (default: random inputs)")
    p.add_argument("--pass", dest="pass_spec", default="prune-magnitude", metavar="SPEC",
                   help="the pass, with options, e.g. \"prune-magnitude(prune_bias=true)\" (default prune-magnitude)")
    p.add_argument("--ratios", default="0.25,0.5,0.75", help="ratios to measure (default 0.25,0.5,0.75)")
    p.add_argument("--seed", type=int, default=0, help="seed for random inputs when no --data is given")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sensitivity)

    p = sub.add_parser("quant-debug", help="rank layers by the error their int8 quantization alone adds")
    p.add_argument("model")
    p.add_argument("--data", metavar="FILE", help="calibration inputs (.npz or .npy folder; default: random)")
    p.add_argument("--calibration", default="minmax", choices=("minmax", "percentile", "entropy", "mse"))
    p.add_argument("--seed", type=int, default=0, help="seed for random inputs when no --data is given")
    p.add_argument("--json", action="store_true", help="print {layer: SQNR dB} as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_quant_debug)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # graphsurgeon logs warnings to stdout, which would corrupt `inspect --json`.
    gs_logger.severity = gs_logger.ERROR
    try:
        return args.func(args)
    except (GraphoptError, DataError, PipelineError) as e:
        print(f"graphopt: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 1)
    except KeyboardInterrupt:
        print("graphopt: interrupted; nothing was written (a tuning database keeps its measured trials: "
              "re-run to resume)", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - last line of defence: one line, no traceback
        if os.environ.get("GRAPHOPT_DEBUG"):
            raise
        print(f"graphopt: internal error: {type(e).__name__}: {e} (set GRAPHOPT_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
