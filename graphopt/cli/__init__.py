"""The `graphopt` command line: the only package that prints or parses arguments."""
from __future__ import annotations

import argparse
import os
import sys

from onnx_graphsurgeon.logger import G_LOGGER as gs_logger

from graphopt import __version__
from graphopt.cli.inspect import cmd_inspect, cmd_passes, cmd_quant_debug, cmd_sensitivity, cmd_verify
from graphopt.cli.jobs import cmd_compile, cmd_optimize, cmd_tune
from graphopt.codegen import targets
from graphopt.ir.errors import DataError, GraphoptError, PipelineError


def _target_options(p: argparse.ArgumentParser, required: bool = False, db_required: bool = False) -> None:
    g = p.add_argument_group("code generation (Apache TVM)")
    g.add_argument("--target", required=required, metavar="T", help=targets.describe())
    g.add_argument("--cuda-arch", metavar="sm_XX", help="CUDA architecture for --target cuda (default sm_80)")
    if not db_required:
        g.add_argument("--tune", action="store_true", help="tune with MetaSchedule before compiling")
    g.add_argument("--db", required=db_required, metavar="DIR",
                   help="tuning database folder, reused across runs (default with --tune: OUTDIR/tuning-db)")
    g.add_argument("--trials", type=int, default=64, help="tuning trial budget (default 64)")
    g.add_argument("--time-budget", "--tune-seconds", dest="tune_seconds", type=_duration, metavar="T",
                   help="tuning wall-clock budget: seconds, or with a unit (90s, 10m, 1h)")


def _input_shape_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=D0,D1,...",
                   help="concrete dims for a model input with symbolic dims, e.g. x=1,3,48,320 (repeatable; "
                        "NAME= for a scalar). MACs, random inputs and shape analysis use them; --data's "
                        "shapes serve the same way when this is not given")


def _points(text: str) -> float:
    try:
        value = float(text.rstrip().removesuffix("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of percentage points like 1%% or 0.5") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"'{text}': the most a pass may cost cannot be negative")
    return value


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
    gate = p.add_argument_group("quality gate (measured after every pass on the half of --data held aside "
                                "from calibration; exit 4 and nothing written when crossed)")
    gate.add_argument("--max-drop", type=_points, metavar="P%",
                      help="most top-1 accuracy a pass may cost, in percentage points (1%%, 0.5): against labels "
                           "y in --data, else agreement with the original's predictions")
    gate.add_argument("--min-cosine", type=float, metavar="C",
                      help="lowest cosine similarity to the original any output may reach. Either option replaces "
                           "the passes' own LOSSY bounds, which hold otherwise")
    p.add_argument("--no-verify", action="store_true", help="skip checker, invariants and fidelity checks between passes")
    p.add_argument("--explain", action="store_true", help="print why each refused rewrite was refused")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    _input_shape_option(p)
    p.add_argument("--static", action="store_true",
                   help="write concrete dims into the optimized model (those of --input-shape, or of --data past "
                        "the batch dim); the passes see them too. Without it the model keeps its symbolic dims")
    p.add_argument("--opset", type=int, metavar="N",
                   help="upgrade the model to opset N before the passes (onnx's version converter, checked "
                        "EXACT in onnxruntime); for passes that need a newer opset than the model has")
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
    _input_shape_option(p)
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
    _input_shape_option(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("passes", help="list the passes, their options and guarantees; with NAME, one pass's "
                                      "contract and every option's help")
    p.add_argument("name", nargs="?", metavar="NAME", help="a pass, e.g. quantize")
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

