"""Benchmark: onnxruntime vs TVM untuned vs TVM tuned (MetaSchedule) on the bundled models.

    python bench/codegen.py                  # 200 trials per model
    python bench/codegen.py --trials 64 --models resnet
    python bench/codegen.py --quick          # tiny budgets: checks that the pipeline works

Models: `models/digits_cnn.onnx`, and `resnet`: a ResNet-style CNN from
`graphopt.testing.builders.resnet` at 1x3x56x56 with six convolutions (3x3 stem, two basic blocks
of width 64 and 128, a 1x1 strided shortcut), the shape the codegen issue quotes.

Latency is the median of `--repeat` runs in this process on the same inputs, after warm-up:
onnxruntime with every graph optimisation and its default (all-core) thread pool; TVM through
`graphopt.codegen.load(...).benchmark`. The three take turns for `--rounds` rounds after tuning,
and the table shows each one's best round, so that other work on a shared machine inflates it
least; the JSON keeps every round. Tuning starts from an empty database unless `--db` names
one to reuse, and its wall time is reported. Compiled outputs are checked against onnxruntime.
Prints a table and writes bench/results/codegen.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from timing import machine, ort_median_ms  # bench/ is on sys.path when run as a script
from graphopt import codegen
from graphopt.codegen.tune import tune
from graphopt.testing.builders import resnet

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "codegen.json"
TARGET = "x86"
QUICK_TRIALS, QUICK_REPEAT, QUICK_ROUNDS = 8, 30, 2
# float32 reassociation in tiled kernels; anything larger is a miscompile.
MAX_ABS_ERROR = 1e-3


def models() -> dict[str, onnx.ModelProto]:
    return {"digits": onnx.load(ROOT / "models" / "digits_cnn.onnx"),
            "resnet": resnet(blocks=(1, 1), width=64, image=56)}


def feeds_for(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    weights = {t.name for t in model.graph.initializer}
    shapes = {i.name: [d.dim_value or 1 for d in i.type.tensor_type.shape.dim]
              for i in model.graph.input if i.name not in weights}
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def ort_session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def compiled(model: onnx.ModelProto, out: Path, feeds: dict, reference: np.ndarray,
             database: Path | None = None) -> tuple[codegen.CompiledModel, dict]:
    """Compile and check against onnxruntime."""
    result = codegen.compile(model, TARGET, out, database=database)
    lib = codegen.load(result.library)
    error = float(np.abs(lib.run(feeds)[model.graph.output[0].name] - reference).max())
    if error > MAX_ABS_ERROR:
        raise SystemExit(f"{out}: compiled output differs from onnxruntime by {error}")
    used = result.manifest["libraries"][result.library.name]["database"]
    return lib, {"max_abs_error": error, "build_s": round(result.seconds, 2),
                 "kernels_tuned": used and f"{used['tuned']}/{used['kernels']}"}


def latencies(runners: dict, rounds: int) -> dict[str, dict]:
    """Each runner's median latency in every round, the runners taking turns so that other work on
    a shared machine slows them alike; the best round is the figure reported."""
    per_round: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            per_round[name].append(run())
    return {name: {"ms": min(ms), "rounds_ms": [round(m, 4) for m in ms]} for name, ms in per_round.items()}


def bench_model(name: str, model: onnx.ModelProto, work: Path, db: Path, trials: int, seconds: float | None,
                repeat: int, rounds: int) -> dict:
    feeds = feeds_for(model)
    session = ort_session(model)
    reference = session.run(None, feeds)[0]
    untuned, untuned_info = compiled(model, work / f"{name}-untuned", feeds, reference)

    def progress(done: int, total: int, best_ms: float | None) -> None:
        best = "" if best_ms is None else f", best {best_ms:.4g} ms"
        print(f"\r  {name}: tuning {done}/{total} trials{best}", end="", file=sys.stderr, flush=True)

    result = tune(model, TARGET, db, trials=trials, seconds=seconds, progress=progress)
    print(file=sys.stderr)
    tuned, tuned_info = compiled(model, work / f"{name}-tuned", feeds, reference, database=db)
    for _ in range(10):  # warm-up
        session.run(None, feeds)
    timed = latencies({"onnxruntime": lambda: ort_median_ms(session, feeds, repeat),
                       "untuned": lambda: untuned.benchmark(feeds, repeat),
                       "tuned": lambda: tuned.benchmark(feeds, repeat)}, rounds)
    return {"model": name, "onnxruntime": timed["onnxruntime"],
            "untuned": {**timed["untuned"], **untuned_info}, "tuned": {**timed["tuned"], **tuned_info},
            "tuning": {"trials_run": result.trials, "trials_total": result.trials_total, "tasks": result.tasks,
                       "seconds": round(result.seconds, 1), "database": str(result.database)}}


def table(rows: list[dict]) -> str:
    head = (f"{'model':8} {'onnxruntime':>12} {'TVM untuned':>12} {'TVM tuned':>10} {'tuned/ORT':>10} "
            f"{'trials':>7} {'tuning s':>9} {'kernels':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        tuned, reference = r["tuned"]["ms"], r["onnxruntime"]["ms"]
        lines.append(f"{r['model']:8} {reference:10.3f}ms {r['untuned']['ms']:10.3f}ms "
                     f"{tuned:8.3f}ms {tuned / reference:9.2f}x {r['tuning']['trials_total']:7d} "
                     f"{r['tuning']['seconds']:9.1f} {r['tuned']['kernels_tuned']:>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200, help="tuning trials per model (default 200)")
    parser.add_argument("--seconds", type=float, help="wall-clock tuning budget per model")
    parser.add_argument("--repeat", type=int, default=100, help="timed runs per median (default 100)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="medians per runtime; the best is shown (default 5)")
    parser.add_argument("--models", default="digits,resnet", help="comma-separated: digits, resnet")
    parser.add_argument("--db", type=Path, help="folder of tuning databases to reuse (one per model)")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_TRIALS} trials, {QUICK_REPEAT} repeats: a smoke test, not a measurement")
    args = parser.parse_args(argv)
    trials, repeat, rounds = (QUICK_TRIALS, QUICK_REPEAT, QUICK_ROUNDS) if args.quick else (
        args.trials, args.repeat, args.rounds)
    available = models()
    chosen = args.models.split(",")
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(available)}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        databases = args.db or work / "db"
        rows = [bench_model(name, available[name], work, databases / name, trials, args.seconds, repeat, rounds)
                for name in chosen]
    print(table(rows))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"target": TARGET, "trials": trials, "repeat": repeat, "rounds": rounds,
                                   "quick": args.quick,
                                   "machine": machine(), "results": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
