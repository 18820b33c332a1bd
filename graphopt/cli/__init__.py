"""The `graphopt` command line: the only package that prints or parses arguments.

Imports here are the standard library's only: the commands (graphopt.cli.jobs, graphopt.cli.inspect)
import onnx, onnxruntime, numba and TVM, which take seconds, when they run; `graphopt --help`
needs none of it.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import signal
import sys

from graphopt import __version__
from graphopt.ir.errors import GraphoptError

EXIT_CODES = """\
exit codes:
  0    success
  1    the work failed: a pass broke its contract, the build or link failed, verify --min-cosine
       was not met, or writing OUTDIR failed (e.g. the disk is full)
  2    bad input or usage: arguments, the model, --data, the pass spec, the target, -o OUTDIR
  3    internal error: a bug (GRAPHOPT_DEBUG=1 prints the traceback)
  4    the quality gate stopped the pipeline (--max-drop, --min-cosine, a pass's own bound)
  130  interrupted by Ctrl-C (SIGINT); 143 by SIGTERM
  141  stdout was closed early (e.g. `graphopt inspect MODEL --json | head -1`)
Whatever the code, OUTDIR holds either all of a run's outputs or none of them."""

# The signal that interrupted this run (SIGINT or SIGTERM), if one did.
_interrupted_by: int | None = None


def interrupted_by() -> int | None:
    """The signal that interrupted the command now running, or None."""
    return _interrupted_by


class _Lazy:
    """Help text made only when help is printed: the --target help lists the target table, which
    lives in graphopt.codegen, whose import loads TVM. argparse calls strip() and `%` on it."""

    def __init__(self, make):
        self.make = make

    def __str__(self) -> str:
        return self.make()

    def strip(self) -> str:
        return str(self).strip()

    def __mod__(self, params) -> str:
        return str(self) % params


def _target_help() -> str:
    from graphopt.codegen import targets

    return targets.describe() + " (for arm and arm-dotprod: pip install 'graphopt[arm]')"


def _command(module: str, name: str):
    """The command `name` of graphopt.cli.`module`, imported when it runs."""

    def run(args) -> int:
        return getattr(importlib.import_module(f"graphopt.cli.{module}"), name)(args)

    run.__qualname__ = name
    return run


class _DeprecatedAlias(argparse.Action):
    """An old spelling of an option: works, warns, and is left out of --help."""

    def __init__(self, *args, new: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"graphopt: warning: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _target_options(p: argparse.ArgumentParser, required: bool = False, db_required: bool = False) -> None:
    g = p.add_argument_group("code generation (Apache TVM)")
    g.add_argument("--target", required=required, metavar="T", type=_target_name, help=_Lazy(_target_help))
    g.add_argument("--cuda-arch", metavar="sm_XX", help="CUDA architecture for --target cuda (default sm_80)")
    if not db_required:
        g.add_argument("--tune", action="store_true", help="tune with MetaSchedule before compiling")
    g.add_argument("--db", required=db_required, metavar="DIR",
                   help="tuning database folder, reused across runs: its measured schedules are applied when "
                        "compiling (default with --tune: OUTDIR/tuning-db)")
    g.add_argument("--trials", type=_positive, default=64, metavar="N", help="tuning trial budget (default 64)")
    g.add_argument("--time-budget", dest="time_budget", type=_duration, metavar="T",
                   help="tuning wall-clock budget: seconds, or with a unit (90s, 10m, 1h); tuning stops at "
                        "whichever of --trials and this comes first (default: no time limit)")
    g.add_argument("--tune-seconds", dest="time_budget", type=_duration, action=_DeprecatedAlias,
                   new="--time-budget", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _rpc_options(p: argparse.ArgumentParser, tune: bool = False) -> None:
    g = p.add_argument_group("measuring on devices (a TVM RPC tracker: graphopt farm up starts one here)")
    g.add_argument("--rpc", metavar="HOST:PORT",
                   help=("with --tune, " if tune else "") +
                        "measure on the RPC servers registered with this tracker instead of on this machine; "
                        "kernels are built here, and the database stays here")
    g.add_argument("--rpc-key", metavar="KEY", help="the key the servers registered under (rpc_server --key)")


def _input_shape_option(p: argparse.ArgumentParser, compiles: bool = False) -> None:
    more = ("; the library is built for these dims (x=4,1,8,8: it takes batches of 4)" if compiles else
            ". MACs, random inputs and shape analysis use them; --data's shapes serve the same way when "
            "this is not given")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=D0,D1,...",
                   help="concrete dims for a model input with symbolic dims, e.g. x=1,3,48,320 (repeatable; "
                        f"NAME= for a scalar){more}")


def _seed_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=_seed, default=0, metavar="N",
                   help="seed for the random inputs used when no --data is given: any integer, taken "
                        "modulo 2**32 (default 0)")


def _output_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", type=_outdir,
                   help="output folder, created if missing. Outputs of the same name are replaced, all "
                        "together; other files in it are kept. It must not hold the input under an "
                        "output's name")


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


def _seed(text: str) -> int:
    """Any integer; numpy's generators take 0 .. 2**32-1, so -1 is 2**32-1 (as numpy's own
    SeedSequence would not have it)."""
    try:
        return int(text) % 2**32
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}': give at least 1")
    return value


def _outdir(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty name: give the folder for the outputs")
    return text


def _port(text: str) -> int:
    value = _positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"'{text}' is not a port (1 to 65535)")
    return value


def _target_name(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty name: give a target such as x86 (graphopt compile --help "
                                         "lists them)")
    return text


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="graphopt", description="Compress ONNX models with verified graph passes.",
                                     epilog=EXIT_CODES, formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"graphopt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("optimize", help="run a pass pipeline and write OUTDIR/model.opt.onnx and report.json",
                       description="Run a pass pipeline; write OUTDIR/model.opt.onnx, report.json and report.html "
                                   "(with --target also the library and manifest.json).",
                       epilog=EXIT_CODES, formatter_class=fmt)
    p.add_argument("model", help="input ONNX model (never modified)")
    _output_option(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--passes", metavar="SPEC",
                       help='pass spec, e.g. "fold-constants,fold-batchnorm" (default: canonicalize; with '
                            '--max-drop or --min-cosine and no --passes, the search chooses)')
    group.add_argument("--pipeline", metavar="FILE", help="pipeline as a YAML or TOML file")
    p.add_argument("--data", metavar="FILE", help="inputs as .npz (by input name, or x) or a folder of .npy")
    _seed_option(p)
    gate = p.add_argument_group("quality gate (measured after every pass on the half of --data held aside "
                                "from calibration; exit 4 and nothing written when crossed)")
    gate.add_argument("--max-drop", type=_points, metavar="P%",
                      help="most top-1 accuracy a pass may cost, in percentage points (1%%, 0.5): against labels "
                           "y in --data, else agreement with the original's predictions")
    gate.add_argument("--min-cosine", type=float, metavar="C",
                      help="lowest cosine similarity to the original any output may reach. Either option replaces "
                           "the passes' own LOSSY bounds, which hold otherwise")
    search = p.add_argument_group("search (without --passes or --pipeline, with --data and --max-drop or "
                                  "--min-cosine: measure candidate pipelines and keep the cheapest within the gate; "
                                  "OUTDIR/search keeps every candidate measured, and running again resumes)")
    search.add_argument("--objective", choices=("latency", "size"), default="latency",
                        help="what the search minimizes: latency on --target (its library where it runs here, "
                             "else onnxruntime), or compressed bytes (default latency)")
    search.add_argument("--search-budget", type=_duration, default=1200.0, metavar="T",
                        help="wall-clock time the search may start candidates in: seconds, or with a unit (90s, "
                             "20m, 1h; default 20m)")
    p.add_argument("--no-verify", action="store_true", help="skip checker, invariants and fidelity checks between passes")
    p.add_argument("--explain", action="store_true", help="print why each refused rewrite was refused")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    _input_shape_option(p)
    p.add_argument("--static", action="store_true",
                   help="write concrete dims into the optimized model (those of --input-shape, or of --data past "
                        "the batch dim); the passes see them too. Without it the model keeps its symbolic dims")
    p.add_argument("--opset", type=_positive, metavar="N",
                   help="upgrade the model to opset N before the passes (onnx's version converter, checked "
                        "EXACT in onnxruntime); for passes that need a newer opset than the model has")
    _target_options(p)
    _rpc_options(p, tune=True)
    p.set_defaults(func=_command("jobs", "cmd_optimize"))

    p = sub.add_parser("compile", help="compile a model with TVM for a target (no passes); writes the library, "
                                       "manifest.json and report.json",
                       description="Compile a model with TVM for --target, without passes: writes "
                                   "OUTDIR/model.<target>.so, manifest.json (other targets' entries are kept), "
                                   "report.json and report.html. Where the library runs here, the report has its "
                                   "fidelity against onnxruntime and its latency.",
                       epilog=EXIT_CODES, formatter_class=fmt)
    p.add_argument("model", help="input ONNX model (never modified)")
    _output_option(p)
    p.add_argument("--data", metavar="FILE", help="inputs (.npz or a folder of .npy) to check the library against "
                                                  "onnxruntime; their shapes set symbolic dims (one sample of the "
                                                  "batch) where --input-shape does not")
    _seed_option(p)
    p.add_argument("--no-verify", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    _input_shape_option(p, compiles=True)
    _target_options(p, required=True)
    _rpc_options(p, tune=True)
    p.set_defaults(func=_command("jobs", "cmd_compile"))

    p = sub.add_parser("tune", help="tune a model's kernels with MetaSchedule into a reusable database",
                       description="Tune a model's kernels for --target with MetaSchedule into the --db folder; "
                                   "compile and optimize --target with the same --db use its schedules. Prints "
                                   "the tuning summary as JSON.",
                       epilog=EXIT_CODES, formatter_class=fmt)
    p.add_argument("model", nargs="+", help="input ONNX model(s): several tune their kernels together, a kernel "
                                            "they share once")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _target_options(p, required=True, db_required=True)
    _rpc_options(p)
    p.set_defaults(func=_command("jobs", "cmd_tune"), tune=True)

    p = sub.add_parser("measure", help="run a built library here or on a device (--rpc): its outputs against "
                                       "onnxruntime, and its latency",
                       description="Run a library graphopt built (a .so, or an OUTDIR holding one) on --data or "
                                   "random inputs, here or on a device registered with a TVM RPC tracker; compare "
                                   "its outputs with onnxruntime on the ONNX model it was built from (OUTDIR's "
                                   "model.opt.onnx, the model report.json names, or --model) and time it.",
                       epilog=EXIT_CODES, formatter_class=fmt)
    p.add_argument("library", help="the library (.so) or the folder graphopt compiled it into")
    p.add_argument("--model", metavar="ONNX", help="the model it was built from (default: found beside it)")
    p.add_argument("--data", metavar="FILE", help="inputs (.npz or a folder of .npy); default random")
    _seed_option(p)
    p.add_argument("--repeat", type=_positive, default=50, metavar="N", help="timed runs (default 50)")
    p.add_argument("--min-cosine", type=float, default=0.999, metavar="C",
                   help="exit 1 if an output's cosine against onnxruntime is below C (default 0.999)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _rpc_options(p)
    p.set_defaults(func=_command("remote", "cmd_measure"))

    p = sub.add_parser("farm", help="start, show or stop a TVM RPC tracker and servers on 127.0.0.1",
                       description="A local device farm for tune --rpc: a TVM RPC tracker and N RPC servers on "
                                   "127.0.0.1, started detached and recorded in --dir.",
                       epilog=EXIT_CODES, formatter_class=fmt)
    farm = p.add_subparsers(dest="farm_command", required=True, metavar="ACTION")
    up = farm.add_parser("up", help="start a tracker and --servers N servers; print the --rpc options to use")
    up.add_argument("--servers", type=_positive, default=1, metavar="N", help="RPC servers to start (default 1)")
    up.add_argument("--port", type=_port, metavar="P", help="the tracker's port (default 9190, or a free one if "
                                                            "9190 is taken)")
    up.add_argument("--key", metavar="KEY", help="the key the servers register under (default local; with --arm, "
                                                 "arm-qemu)")
    up.add_argument("--arm", action="store_true", help="servers in the emulated aarch64 Python of "
                                                       "tools/arm_env.py (qemu-user; run its setup first), for "
                                                       "--target arm: emulation speed, not a device's")
    status = farm.add_parser("status", help="the tracker's servers and queues")
    status.add_argument("--json", action="store_true", help="print the tracker's summary as JSON")
    down = farm.add_parser("down", help="stop the tracker and servers (their logs stay)")
    for action in (up, status, down):
        action.add_argument("--dir", metavar="DIR", help="where the farm's state and logs are (default "
                                                         "~/.cache/graphopt/farm)")
    p.set_defaults(func=_command("remote", "cmd_farm"))

    p = sub.add_parser("inspect", help="ops, parameters, size, MACs per layer, inputs and outputs")
    p.add_argument("model", help="ONNX model")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _input_shape_option(p)
    p.set_defaults(func=_command("inspect", "cmd_inspect"))

    p = sub.add_parser("pack", help="store a model as a smaller .gopt file (Huffman-coded indices, sparse "
                                    "weights) that unpacks to the same bytes",
                       description="Pack an ONNX model into a .gopt container: each tensor's data coded by the "
                                   "smallest of Huffman, relative indexing of zeros, zlib or raw; the rest "
                                   "compressed as one stream. graphopt unpack restores the file byte for byte.",
                       epilog=EXIT_CODES, formatter_class=fmt)
    p.add_argument("model", help="input ONNX model, weights inline (never modified)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the .gopt file to write")
    p.add_argument("--json", action="store_true", help="print the sizes per codec as JSON")
    p.set_defaults(func=_command("pack", "cmd_pack"))

    p = sub.add_parser("unpack", help="restore the ONNX model a .gopt file holds, byte for byte",
                       epilog=EXIT_CODES, formatter_class=fmt)
    p.add_argument("packed", help="a .gopt file written by graphopt pack")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the ONNX file to write")
    p.set_defaults(func=_command("pack", "cmd_unpack"))

    p = sub.add_parser("passes", help="list the passes, their options and guarantees; with NAME, one pass's "
                                      "contract and every option's help")
    p.add_argument("name", nargs="?", metavar="NAME", help="a pass, e.g. quantize")
    p.set_defaults(func=_command("inspect", "cmd_passes"))

    p = sub.add_parser("verify", help="compare two models' outputs in onnxruntime")
    p.add_argument("original", help="the reference ONNX model")
    p.add_argument("optimized", help="the ONNX model to compare with it")
    p.add_argument("--data", metavar="FILE", help="inputs (.npz or .npy folder); an npz with y also gives accuracy")
    _seed_option(p)
    p.add_argument("--min-cosine", type=float, help="exit 1 if any output's cosine similarity is lower")
    p.set_defaults(func=_command("inspect", "cmd_verify"))

    p = sub.add_parser("sensitivity", help="apply a pass to one layer at a time at several ratios and "
                                           "measure fidelity (and accuracy)")
    p.add_argument("model", help="ONNX model")
    p.add_argument("--data", metavar="FILE", help="inputs (.npz or .npy folder); an npz with y also gives "
                                                  "accuracy (default: random inputs)")
    p.add_argument("--pass", dest="pass_spec", default="prune-magnitude", metavar="SPEC",
                   help="the pass, with options, e.g. \"prune-magnitude(prune_bias=true)\" (default prune-magnitude)")
    p.add_argument("--ratios", default="0.25,0.5,0.75", help="ratios to measure (default 0.25,0.5,0.75)")
    _seed_option(p)
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_command("inspect", "cmd_sensitivity"))

    p = sub.add_parser("quant-debug", help="rank layers by the error their int8 quantization alone adds")
    p.add_argument("model", help="ONNX model")
    p.add_argument("--data", metavar="FILE", help="calibration inputs (.npz or .npy folder; default: random)")
    p.add_argument("--calibration", default="minmax", choices=("minmax", "percentile", "entropy", "mse"),
                   help="how activation ranges are calibrated (default minmax)")
    _seed_option(p)
    p.add_argument("--json", action="store_true", help="print {layer: SQNR dB} as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_command("inspect", "cmd_quant_debug"))
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse cannot say alone: options that need another option. Exit 2 before any work."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command = commands.choices[args.command]
    if getattr(args, "tune", False) and not args.target:
        command.error("--tune needs --target")
    if getattr(args, "cuda_arch", None) and not args.target:
        command.error("--cuda-arch needs --target cuda")
    if getattr(args, "rpc", None) and not args.rpc_key:
        command.error("--rpc needs --rpc-key: the key its servers registered under")
    if getattr(args, "rpc_key", None) and not args.rpc:
        command.error("--rpc-key needs --rpc HOST:PORT")
    if getattr(args, "rpc", None) and args.command in ("optimize", "compile") and not args.tune:
        command.error("--rpc measures tuning trials on the devices: give --tune (graphopt measure LIB.so --rpc "
                      "times a built library)")


# Once interrupted, errors Python cannot raise (a finalizer such as llvmlite's __del__ that the
# KeyboardInterrupt cut short) would print "Exception ignored ... Traceback": the one line that
# says what became of OUTDIR is the whole story, so main() keeps them quiet from then on.
def _on_signal(signum, frame) -> None:
    global _interrupted_by
    _interrupted_by = signum
    raise KeyboardInterrupt


def _handle_signals() -> dict:
    """SIGTERM ends a run as Ctrl-C does (KeyboardInterrupt: outputs staged so far are removed);
    returns the handlers to restore. Signals can be handled only in the main thread."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit code (EXIT_CODES). SIGINT and SIGTERM end it as
    KeyboardInterrupt: 130 or 143, and one line saying what became of OUTDIR."""
    global _interrupted_by
    _interrupted_by = None
    previous = _handle_signals()
    default_hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None if _interrupted_by else default_hook(unraisable)
    try:
        code = _run(argv)
    finally:
        sys.unraisablehook = default_hook
        for sig, handler in previous.items():
            # As the program (no argv) the run is over: a signal before the interpreter exits could
            # only turn the exit code into a traceback. Called with argv, put the caller's back.
            signal.signal(sig, signal.SIG_IGN if argv is None else handler)
    if argv is None and _interrupted_by is not None:
        # The program, interrupted and cleaned up: end here. CPython ends a process whose
        # KeyboardInterrupt once crossed code a C extension ran through PyRun_* by killing itself
        # with SIGINT at exit, caught or not (seen as exit -2 instead of 143 under load).
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a closed pipe
                stream.flush()
        os._exit(code)
    return code


def _run(argv: list[str] | None) -> int:
    # Everything, imports included, runs inside this try: a signal or an error at any moment is
    # one line on stderr and an exit code from the table, never a traceback.
    args = None
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
            _check_args(parser, args)
        except SystemExit:  # --help, --version or a usage error: flush where a closed pipe is handled
            sys.stdout.flush()
            raise
        from onnx_graphsurgeon.logger import G_LOGGER

        # graphsurgeon logs warnings to stdout, which would corrupt `inspect --json`.
        G_LOGGER.severity = G_LOGGER.ERROR
        code = args.func(args)
        sys.stdout.flush()  # here, where a closed pipe can still be handled
        return code
    except BrokenPipeError:
        _stdout_to_devnull()
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt as e:
        return _interrupted(args, getattr(e, "message", None))
    except GraphoptError as e:
        if _interrupted_by is not None:
            return _interrupted(args)
        print(f"graphopt: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 1)
    except OSError as e:
        if _interrupted_by is not None:
            return _interrupted(args)
        where = f"{e.filename}: " if e.filename else ""
        print(f"graphopt: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1 if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO) else 2
    except Exception as e:  # noqa: BLE001 - last line of defence: one line, no traceback
        if _interrupted_by is not None:  # e.g. TVM turned the KeyboardInterrupt into its own error
            return _interrupted(args)
        if os.environ.get("GRAPHOPT_DEBUG"):
            raise
        print(f"graphopt: internal error: {type(e).__name__}: {e} (set GRAPHOPT_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 3


def _interrupted(args: argparse.Namespace | None, message: str | None = None) -> int:
    """One line: what the job says became of OUTDIR, or (interrupted before it began) that OUTDIR
    was not touched."""
    if message is None:
        output = getattr(args, "output", None)
        message = f"interrupted; {output} unchanged" if output else "interrupted"
    print(f"graphopt: {message}", file=sys.stderr)
    return 128 + (_interrupted_by or signal.SIGINT)


def _stdout_to_devnull() -> None:
    """After EPIPE, point stdout at /dev/null so that the interpreter's final flush is quiet
    (https://docs.python.org/3/library/signal.html#note-on-sigpipe)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout replaced by an object without a descriptor
        pass
