"""Benchmark: 3x3 convolutions, direct vs Winograd, in TVM (untuned and tuned) and onnxruntime.

    python bench/winograd.py                       # 32 trials per tuned kernel set
    python bench/winograd.py --trials 16 --layers 64x56
    python bench/winograd.py --quick               # tiny budgets: checks that the pipeline works

Layers: the 3x3 stride-1 convolutions of the ResNet-style builder (`graphopt.testing.builders`:
He-initialised weights, pads 1, with bias), alone at batch 1: 64 channels at 56x56, 128 at 28x28,
256 at 14x14. Columns:

- TVM direct: the plain Conv through graphopt's CPU pipeline (NHWC; the single-layer library
  transposes its NCHW input and output, a pass over each that a network in NHWC does not pay);
- TVM F(4x4), F(2x2): the conv marked by the winograd pass (emit="tvm") and compiled with TVM's
  Winograd kernel (NCHW, no transposes);
  each untuned (graphopt's default schedules) and tuned with the same MetaSchedule trial budget
  from an empty database (`--trials`, `--seconds`);
- ORT: onnxruntime on the original conv, and on the winograd pass's ONNX rewrite (emit="onnx",
  F(4x4)).

Latency is the median of `--repeat` runs after warm-up; all variants of a layer take turns for
`--rounds` rounds and the table shows each one's best round (other work on a shared machine
inflates it least); the JSON keeps every round. Every compiled output is checked against
onnxruntime. Prints a table and writes bench/results/winograd.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from timing import machine, ort_median_ms  # bench/ is on sys.path when run as a script
from graphopt import codegen
from graphopt.codegen.tune import tune
from graphopt.ir.graph import export
from graphopt.passes.base import PassContext
from graphopt.passes.conv.winograd import Winograd

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "winograd.json"
TARGET = "x86"
LAYERS = {"64x56": (64, 56), "128x28": (128, 28), "256x14": (256, 14)}
TILES = (4, 2)
QUICK_TRIALS, QUICK_REPEAT, QUICK_ROUNDS = 6, 20, 2
# float32 reassociation (direct) and F(4x4)'s transforms at up to 256 channels; more is a bug.
MAX_ABS_ERROR = 5e-4


def conv_layer(channels: int, size: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((channels, channels, 3, 3)) * np.sqrt(2.0 / (channels * 9))).astype(np.float32)
    bias = (rng.standard_normal(channels) * 0.1).astype(np.float32)
    shape = [1, channels, size, size]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])], "conv3x3",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        initializer=[numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def winograd(model: onnx.ModelProto, tile: int, emit: str) -> onnx.ModelProto:
    graph = gs.import_onnx(model)
    Winograd(tile=tile, emit=emit).run(graph, PassContext())
    return export(graph)


def ort_runner(model: onnx.ModelProto, feeds: dict, repeat: int):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for _ in range(10):
        session.run(None, feeds)

    return lambda: ort_median_ms(session, feeds, repeat)


def tvm_variant(name: str, model: onnx.ModelProto, work: Path, feeds: dict, reference: np.ndarray,
                trials: int, seconds: float | None, repeat: int) -> tuple[dict, dict]:
    """Untuned and tuned builds of `model`: (runners by column, details for the JSON)."""
    runners, details = {}, {}
    untuned = codegen.compile(model, TARGET, work / f"{name}-untuned")
    db = work / f"{name}-db"
    start = time.perf_counter()
    result = tune(model, TARGET, db, trials=trials, seconds=seconds,
                  progress=lambda done, total, _best: print(f"\r  {name}: tuning {done}/{total}", end="",
                                                            file=sys.stderr, flush=True))
    print(file=sys.stderr)
    tuned = codegen.compile(model, TARGET, work / f"{name}-tuned", database=db)
    for label, built in (("untuned", untuned), ("tuned", tuned)):
        lib = codegen.load(built.library)
        error = float(np.abs(lib.run(feeds)["y"] - reference).max())
        if error > MAX_ABS_ERROR:
            raise SystemExit(f"{name} {label}: output differs from onnxruntime by {error}")
        runners[f"{name} {label}"] = lambda lib=lib: lib.benchmark(feeds, repeat)
        database = built.manifest["libraries"][built.library.name]["database"]
        details[f"{name} {label}"] = {"max_abs_error": error, "build_s": round(built.seconds, 2),
                                      "kernels_tuned": database and f"{database['tuned']}/{database['kernels']}"}
    details[f"{name} tuned"]["tuning"] = {"trials_total": result.trials_total, "tasks": result.tasks,
                                          "seconds": round(time.perf_counter() - start, 1)}
    return runners, details


def bench_layer(label: str, channels: int, size: int, work: Path, trials: int, seconds: float | None,
                repeat: int, rounds: int) -> dict:
    model = conv_layer(channels, size)
    feeds = {"x": np.random.default_rng(1).standard_normal((1, channels, size, size)).astype(np.float32)}
    runners = {"ORT direct": ort_runner(model, feeds, repeat)}
    reference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    runners["ORT F4 rewrite"] = ort_runner(winograd(model, 4, "onnx"), feeds, repeat)
    details: dict = {}
    variants = {"direct": model, **{f"F{t}": winograd(model, t, "tvm") for t in TILES}}
    for name, variant in variants.items():
        print(f"{label} {name}", file=sys.stderr)
        more, info = tvm_variant(name, variant, work / label, feeds, reference, trials, seconds, repeat)
        runners.update(more)
        details.update(info)
    per_round: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            per_round[name].append(run())
    return {"layer": label, "ms": {name: min(ms) for name, ms in per_round.items()},
            "rounds_ms": {name: [round(m, 4) for m in ms] for name, ms in per_round.items()}, "details": details}


COLUMNS = ["direct untuned", "direct tuned", "F4 untuned", "F4 tuned", "F2 untuned", "F2 tuned",
           "ORT direct", "ORT F4 rewrite"]


def table(rows: list[dict]) -> str:
    head = f"{'layer':8}" + "".join(f"{c:>15}" for c in COLUMNS) + f"{'tuned F4/direct':>17}"
    lines = [head + "   (ms)", "-" * len(head)]
    for r in rows:
        ms = r["ms"]
        speedup = ms["direct tuned"] / ms["F4 tuned"]
        lines.append(f"{r['layer']:8}" + "".join(f"{ms[c]:15.3f}" for c in COLUMNS) + f"{speedup:16.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=32, help="tuning trials per variant and layer (default 32)")
    parser.add_argument("--seconds", type=float, help="wall-clock tuning budget per variant and layer")
    parser.add_argument("--repeat", type=int, default=50, help="timed runs per median (default 50)")
    parser.add_argument("--rounds", type=int, default=3, help="medians per variant; the best is shown (default 3)")
    parser.add_argument("--layers", default=",".join(LAYERS), help=f"comma-separated: {', '.join(LAYERS)}")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_TRIALS} trials, {QUICK_REPEAT} repeats: a smoke test, not a measurement")
    args = parser.parse_args(argv)
    trials, repeat, rounds = (QUICK_TRIALS, QUICK_REPEAT, QUICK_ROUNDS) if args.quick else (
        args.trials, args.repeat, args.rounds)
    chosen = args.layers.split(",")
    unknown = sorted(set(chosen) - set(LAYERS))
    if unknown:
        parser.error(f"unknown layer(s) {', '.join(unknown)}; choose from {', '.join(LAYERS)}")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench_layer(name, *LAYERS[name], Path(tmp), trials, args.seconds, repeat, rounds) for name in chosen]
    print(table(rows))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"target": TARGET, "trials": trials, "seconds": args.seconds, "repeat": repeat,
                                   "rounds": rounds, "quick": args.quick, "machine": machine(),
                                   "results": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
