"""Benchmark: untuned CPU libraries, onnxruntime vs TVM 0.27's default pipeline vs graphopt's.

    python bench/untuned_cpu.py [--threads 1,2] [--rounds 7] [--repeat 30]

For each model (the 6-conv ResNet-style CNN of issue 3, five 3x3 convolutions and a 1x1 on a
3x56x56 input, with 64, 32 or 16 channels in its first stage; the bundled digits CNN; ResNet-50
at 3x112x112) it builds two x86 libraries with no tuning: TVM's own default pipeline
(`tvm.compile`, which leaves every kernel unscheduled) and graphopt's (`graphopt.codegen.compile`,
with `cpu_pipeline`'s default schedules). It reports build seconds, max |error| relative to the
output's scale against onnxruntime, and latency at each thread count.

Latency: every runtime gets the same inputs and the same number of threads (onnxruntime's
intra-op threads, TVM_NUM_THREADS). Each round takes, for each runtime in turn, the median of
`repeat` runs, after a short idle and two untimed runs so that the previous runtime's spinning
pool threads are out of its way; the table shows the best round, which other work on a shared
machine inflates least (the JSON keeps every round). Each thread count runs in a fresh
interpreter, as TVM reads TVM_NUM_THREADS once. Writes bench/results/untuned_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "untuned_cpu.json"
TARGET = "x86"
MAX_RELATIVE_ERROR = 1e-4
_SETTLE_S = 0.2  # idle before each median
_WARMUP = 2       # untimed runs before each median


def _models() -> dict:
    import onnx

    from graphopt.testing.builders import resnet, resnet50

    return {
        "resnet6-w64-56": resnet(blocks=(1, 1), width=64, image=56),
        "resnet6-w32-56": resnet(blocks=(1, 1), width=32, image=56),
        "resnet6-w16-56": resnet(blocks=(1, 1), width=16, image=56),
        "digits_cnn": onnx.load(REPO / "models" / "digits_cnn.onnx"),
        "resnet50-112": resnet50(image=112),
    }


# -- the measured child: one thread count ----------------------------------------------------------
def _build_stock(model, out_dir: Path) -> tuple[Path, float]:
    """TVM's default pipeline, exported with graphopt's linker: what graphopt built before."""
    import tvm

    from graphopt.codegen import build, targets

    start = time.perf_counter()
    target = targets.resolve(TARGET)
    executable = tvm.compile(build.to_relax(model), target=target.tvm_target())
    library = out_dir / "stock.so"
    executable.export_library(str(library), fcompile=targets.fcompile(target))
    return library, time.perf_counter() - start


def _build_graphopt(model, out_dir: Path) -> tuple[Path, float]:
    from graphopt import codegen

    result = codegen.compile(model, TARGET, out_dir, name="graphopt")
    return result.library, result.seconds


def _vm_runner(library: Path, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
    arguments = [tvm.runtime.tensor(v) for v in feeds.values()]
    return lambda: vm["main"](*arguments)


def _ort_runner(model, feeds: dict[str, np.ndarray], threads: int) -> Callable[[], object]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda: session.run(None, feeds)


def _median_ms(run: Callable[[], object], repeat: int) -> float:
    # The previous runtime's pool threads spin for a while after their last task, and on a
    # machine with few cores they would take this runtime's: let them go to sleep first.
    time.sleep(_SETTLE_S)
    for _ in range(_WARMUP):
        run()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _relative_error(got, reference: np.ndarray) -> float:
    got = got.numpy() if hasattr(got, "numpy") else np.asarray(got)
    scale = max(float(np.abs(reference).max()), np.finfo(np.float32).tiny)
    return float(np.abs(got - reference).max()) / scale


def measure(threads: int, rounds: int, repeat: int) -> dict:
    """Runs in the child, whose TVM_NUM_THREADS the parent set to `threads`."""
    import tvm

    from graphopt.codegen import build

    results = {"tvm_threads": tvm.runtime.num_threads(), "models": {}}
    for name, model in _models().items():
        shapes = build.static_shapes(model, {})
        rng = np.random.default_rng(0)
        feeds = {k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()}
        with tempfile.TemporaryDirectory() as tmp:
            stock, stock_s = _build_stock(model, Path(tmp))
            ours, ours_s = _build_graphopt(model, Path(tmp))
            runners = {"onnxruntime": _ort_runner(model, feeds, threads),
                       "tvm_stock": _vm_runner(stock, feeds), "graphopt": _vm_runner(ours, feeds)}
            reference = runners["onnxruntime"]()[0]
            errors = {k: _relative_error(runners[k](), reference) for k in ("tvm_stock", "graphopt")}
            # The stock library runs ~100x longer: fewer runs of it keep the benchmark short.
            repeats = {"onnxruntime": repeat, "tvm_stock": max(3, repeat // 10), "graphopt": repeat}
            ms = {k: [] for k in runners}
            for _ in range(rounds):
                for key, run in runners.items():
                    ms[key].append(_median_ms(run, repeats[key]))
        results["models"][name] = {"build_s": {"tvm_stock": stock_s, "graphopt": ours_s},
                                   "relative_error": errors, "rounds_ms": ms,
                                   "best_ms": {k: min(v) for k, v in ms.items()}}
    return results


# -- the parent --------------------------------------------------------------------------------
def _child(threads: int, rounds: int, repeat: int) -> dict:
    env = {**os.environ, "TVM_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--child", str(threads), "--rounds", str(rounds), "--repeat", str(repeat)]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env=env).stdout
    return json.loads(out.splitlines()[-1])  # the last line: libraries may print before it


def _tvm_default_threads() -> int:
    """How many threads a TVM library uses when nothing sets TVM_NUM_THREADS."""
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    cmd = [sys.executable, "-c", "import tvm; print(tvm.runtime.num_threads())"]
    return int(subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env=env).stdout.split()[-1])


def _print_table(result: dict) -> None:
    print(f"{'model':<16}{'threads':>8}{'onnxruntime':>13}{'TVM stock':>12}{'graphopt':>11}"
          f"{'vs ORT':>8}{'vs stock':>10}{'build s stock/graphopt':>24}{'rel. error':>12}")
    for threads, run in result["runs"].items():
        for name, m in run["models"].items():
            best = m["best_ms"]
            build_s, error = m["build_s"], m["relative_error"]["graphopt"]
            print(f"{name:<16}{threads:>8}{best['onnxruntime']:>11.3f}ms{best['tvm_stock']:>10.2f}ms"
                  f"{best['graphopt']:>9.3f}ms{best['graphopt'] / best['onnxruntime']:>7.2f}x"
                  f"{best['tvm_stock'] / best['graphopt']:>9.0f}x"
                  f"{build_s['tvm_stock']:>13.2f} / {build_s['graphopt']:<8.2f}{error:>12.1e}")
    print(f"\nlatency: best of {result['rounds']} rounds of medians; 'vs ORT' is graphopt / onnxruntime, "
          f"'vs stock' is TVM stock / graphopt")
    print(f"TVM's runtime uses {result['tvm_default_threads']} thread(s) on this machine when "
          "TVM_NUM_THREADS is unset (it halves the CPU count on x86, assuming hyper-threading)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cores = len(os.sched_getaffinity(0))
    parser.add_argument("--threads", default=",".join(sorted({"1", str(cores)}, key=int)),
                        help="comma-separated thread counts (default: 1 and this machine's cores)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args.rounds, args.repeat)))
        return
    runs = {t: _child(int(t), args.rounds, args.repeat) for t in args.threads.split(",")}
    result = {"target": TARGET, "rounds": args.rounds, "repeat": args.repeat, "cores": cores,
              "tvm_default_threads": _tvm_default_threads(), "runs": runs}
    _print_table(result)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {RESULTS}")
    worst = max(m["relative_error"]["graphopt"] for run in runs.values() for m in run["models"].values())
    # Slow is a result to report; a library that computes something else is an error.
    sys.exit(0 if worst < MAX_RELATIVE_ERROR else 1)


if __name__ == "__main__":
    main()
