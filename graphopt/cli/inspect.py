"""The commands that only read models and print: inspect, passes, verify, sensitivity,
quant-debug."""
from __future__ import annotations

import json
import sys

import numpy as np

from graphopt.cli.progress import ProgressBar
from graphopt.ir import fidelity, io, ort
from graphopt.ir.data import input_specs, load_feeds, random_feeds
from graphopt.ir.errors import GraphoptError, PipelineError
from graphopt.ir.graph import infer_shapes
from graphopt.ir.shapes import check_input_shapes, parse_input_shapes
from graphopt.passes import registry
from graphopt.passes.base import option_help
from graphopt.passes.pipeline import Pipeline
from graphopt.report import format_summary, summarize


def cmd_inspect(args) -> int:
    shapes = parse_input_shapes(args.input_shape)
    graph = infer_shapes(_load_maybe_packed(args.model))
    check_input_shapes(graph, shapes, args.model)
    summary = summarize(graph, layers=True, shapes=shapes or None)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def _load_maybe_packed(path: str):
    """The model at `path`; a .gopt file (recognised by its magic bytes) is unpacked to a
    temporary folder first, so it shows exactly as the ONNX file it holds."""
    from graphopt import pack

    if not pack.is_packed(path):
        return io.load(path)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="graphopt-inspect-") as tmp:
        model = Path(tmp) / (Path(path).stem + ".onnx")
        pack.unpack(path, model)
        return io.load(model)


def cmd_passes(args) -> int:
    if args.name:
        _print_pass(registry.lookup(args.name), verbose=True)
        return 0
    for cls in registry.BUILTIN:
        _print_pass(cls, verbose=False)
    print("graphopt passes NAME prints one pass's contract and every option with its help.")
    return 0


def _print_pass(cls, verbose: bool) -> None:
    """One pass: name, semantics and options; with `verbose`, its contract (the module docstring)
    and each option's help."""
    print(f"{cls.name}    [{cls.info.semantics.describe()}]")
    doc = (sys.modules[cls.__module__].__doc__ or "").strip()
    if not verbose:
        print(f"    {doc.splitlines()[0] if doc else ''}")
        options = ", ".join(f"{name}={default!r}" for name, default, _ in option_help(cls.Options))
        print(f"    options: {options or 'none'}\n")
        return
    print("\n" + doc + "\n")
    rows = option_help(cls.Options)
    if rows:
        print("options:")
        width = max(len(f"{name}={default!r}") for name, default, _ in rows)
        for name, default, text in rows:
            print(f"  {f'{name}={default!r}':<{width}}  {text}")


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
