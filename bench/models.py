"""Benchmark: real CNNs and a BERT-base encoder, onnxruntime vs graphopt's TVM libraries, fp32 and int8.

    python bench/models.py                        # every model, 1 thread and every CPU
    python bench/models.py --models resnet18,bert_base --threads 2
    python bench/models.py --quick                # ResNet-18 and MobileNetV2 at 1 thread, short
    python bench/models.py --tune 200             # also MetaSchedule-tuned TVM fp32 (200 trials/model)
    python bench/models.py --profile efficientnet_b0 --threads 1   # top kernels: TVM fp32 vs onnxruntime

Models (issue 15): torchvision ResNet-18, ResNet-50, MobileNetV2, EfficientNet-B0 (1x3x224x224)
and a BERT-base encoder (sequence 128), random weights, built by models/make_bench_models.py
into ~/.cache/graphopt/bench_models (a missing one is skipped, with the command that builds it).
Each runs at batch 1. Columns: onnxruntime fp32; onnxruntime int8 on its own `quantize_static`
model (QDQ, per-channel int8 weights, uint8 activations, after its `quant_pre_process`) and on
graphopt's `canonicalize,quantize,lower-int8` model (weights rounded to nearest); TVM fp32 untuned (graphopt.codegen, default
schedules), TVM fp32 tuned (`--tune N` only), TVM int8 (graphopt's lowered model compiled). Both
quantizers calibrate on the same 32 samples (random normal images; random token ids, masks of
ones; onnxruntime's on BERT on the first 8 of them, for memory). Ratios: onnxruntime fp32 ms / the column's ms (above 1: faster), and for TVM int8 the best
onnxruntime int8 ms / its ms.

Builds run once, in this process; each thread count is then timed in a fresh interpreter (TVM reads
TVM_NUM_THREADS when its pool starts; onnxruntime gets the same intra-op count). There the
runtimes take turns for `--rounds` rounds, each taking the median of up to `--repeat` runs (fewer
for slow ones: about a second per median) after a short idle (the previous runtime's spinning
threads go to sleep first); the table shows each one's best round, the JSON every round. Every
library's output is checked first (max |error|, cosine): TVM fp32 against onnxruntime fp32, TVM
int8 against onnxruntime on the same lowered model; one that disagrees is marked and left out of
the ratios. Writes bench/results/models.json (with the CPU and its VNNI/AMX flags) and models.md.

`--profile MODEL` (a bench model or any .onnx file) times each kernel instead: TVM fp32 through the
Relax VM's instrument hook (every call, kernels and VM builtins, wall time), onnxruntime fp32
through its profiler (per-node kernel time); it prints the top 10 of each with their share of the
kernels' sum and writes bench/results/models_profile_<model>_<threads>t.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "models")]  # this checkout's graphopt, not an installed one
import make_bench_models as bench_models  # torch-free unless it builds
from timing import machine, ort_median_ms  # bench/ is on sys.path when run as a script

RESULTS = ROOT / "bench" / "results"
TARGET = "x86"
CALIBRATION_SAMPLES = 32
ORT_BERT_CALIBRATION_SAMPLES = 8  # see build()
QUICK_MODELS, QUICK_REPEAT, QUICK_ROUNDS = ("resnet18", "mobilenet_v2"), 10, 2
# graphopt's int8 pipeline. Rounding to nearest: GPTQ (quantize's default with data) picks other
# integers, which changes accuracy and not speed, and takes minutes per model on a small machine.
GRAPHOPT_INT8 = "canonicalize,quantize(rounding=nearest),lower-int8"
MEDIAN_BUDGET_S = 1.0  # a median takes about this long: slow runtimes get fewer runs
SETTLE_S = 0.2
# fp32: float reassociation only. int8 against the same lowered model in onnxruntime: rounding ties.
FP32_MIN_COSINE, FP32_MAX_RELATIVE = 0.99999, 1e-3
INT8_MIN_COSINE = 0.999
COLUMNS = {"ort_fp32": "ORT fp32", "ort_qdq": "ORT int8 (own QDQ)", "ort_graphopt_int8": "ORT int8 (graphopt)",
           "tvm_fp32": "TVM fp32", "tvm_fp32_tuned": "TVM fp32 tuned", "tvm_int8": "TVM int8"}
# What each library's output is checked against, and whether a mismatch disqualifies it.
REFERENCE = {"ort_qdq": ("ort_fp32", None), "ort_graphopt_int8": ("ort_fp32", None),
             "tvm_fp32": ("ort_fp32", "fp32"), "tvm_fp32_tuned": ("ort_fp32", "fp32"),
             "tvm_int8": ("ort_graphopt_int8", "int8")}


def cpu_flags() -> dict:
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    return {f: f in flags for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8")}


def feeds(name: str, samples: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if bench_models.MODELS[name].kind == "bert":
        ids = rng.integers(1, bench_models.BERT_VOCAB, (samples, bench_models.BERT_SEQUENCE), dtype=np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    return {"x": rng.standard_normal((samples, 3, 224, 224)).astype(np.float32)}


# -- builds (the parent) ------------------------------------------------------------------------------
def build(name: str, folder: Path, tune_trials: int) -> dict:
    """Every model file and library of one model: {column: path}, or {column: {"error": ...}}."""
    from graphopt import codegen
    from graphopt.deploy import quiet_tvm

    source = bench_models.path(name)
    shapes = {k: list(v.shape) for k, v in feeds(name, 1, 0).items()}
    calibration = feeds(name, CALIBRATION_SAMPLES, 1)
    # onnxruntime's calibrator keeps every intermediate tensor of every sample until the end (its
    # CalibMaxIntermediateOutputs drops them instead of merging, in 1.32): ~6 GB for 32 BERT samples.
    ort_calibration = {k: v[:ORT_BERT_CALIBRATION_SAMPLES] for k, v in calibration.items()} \
        if bench_models.MODELS[name].kind == "bert" else calibration
    steps = {"ort_fp32": lambda: source,
             "ort_qdq": lambda: _ort_quantized(source, ort_calibration, folder),
             "ort_graphopt_int8": lambda: _graphopt_int8(source, calibration, folder),
             "tvm_fp32": lambda: codegen.compile(source, TARGET, folder / "fp32", shapes=shapes).library}
    if tune_trials:
        steps["tvm_fp32_tuned"] = lambda: _tuned(source, folder, shapes, tune_trials)
    steps["tvm_int8"] = lambda: codegen.compile(_path(built["ort_graphopt_int8"]), TARGET, folder / "int8",
                                                shapes=shapes).library
    built: dict = {}
    for column, step in steps.items():
        start = time.perf_counter()
        try:
            with quiet_tvm():
                built[column] = str(step())
            print(f"  {name}: {column} built in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        except Exception as e:  # noqa: BLE001 - a failed build is a result of the benchmark, not its end
            built[column] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
            print(f"  {name}: {column} failed: {built[column]['error']}", file=sys.stderr, flush=True)
    return built


def _path(built: str | dict) -> str:
    if isinstance(built, dict):  # the step's error, recorded
        raise RuntimeError("graphopt's int8 model was not built")  # noqa: TRY004 - a missing input, not a bad type
    return built


def _ort_quantized(source: Path, calibration: dict, folder: Path) -> Path:
    from onnxruntime import quantization as q
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared, target = folder / "ort_prepared.onnx", folder / "ort_qdq.onnx"
    quant_pre_process(str(source), str(prepared))  # onnxruntime's own recommended first step

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self.samples = iter(range(len(next(iter(calibration.values())))))

        def get_next(self):
            i = next(self.samples, None)
            return None if i is None else {k: v[i:i + 1] for k, v in calibration.items()}

    q.quantize_static(str(prepared), str(target), Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                      activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8)
    return target


def _graphopt_int8(source: Path, calibration: dict, folder: Path) -> Path:
    import graphopt

    result = graphopt.optimize(str(source), GRAPHOPT_INT8, data=calibration, latency=False)
    return graphopt.save(result.graph, folder / "graphopt_int8.onnx")


def _tuned(source: Path, folder: Path, shapes: dict, trials: int) -> Path:
    from graphopt import codegen
    from graphopt.codegen.tune import tune

    db = folder / "tuning-db"
    tune(str(source), TARGET, db, trials=trials)
    return codegen.compile(source, TARGET, folder / "tuned", shapes=shapes, database=db).library


# -- timing (a child per thread count) ----------------------------------------------------------------
def measure(threads: int, plan: dict, repeat: int, rounds: int) -> dict:
    import tvm

    results = {"tvm_threads": tvm.runtime.num_threads(), "models": {}}
    for name, built in plan.items():
        results["models"][name] = _measure_model(name, built, threads, repeat, rounds)
        print(f"  {name} @ {threads} thread(s): timed", file=sys.stderr, flush=True)
    return results


def _measure_model(name: str, built: dict, threads: int, repeat: int, rounds: int) -> dict:
    from graphopt import codegen
    from graphopt.ir import ort

    sample = feeds(name, 1, 0)
    runners, outputs, row = {}, {}, {"errors": {}, "checks": {}}
    for column, where in built.items():
        if isinstance(where, dict):
            row["errors"][column] = where["error"]
            continue
        if column.startswith("ort"):
            session = ort.session(where, optimize=True, threads=threads)
            outputs[column] = session.run(None, sample)
            runners[column] = lambda s=session, n=None: ort_median_ms(s, sample, n)
        else:
            lib = codegen.load(where)
            outputs[column] = list(lib.run(sample).values())
            runners[column] = lambda lib=lib, n=None: lib.benchmark(sample, repeat=n, warmup=2)
    for column, (against, strict) in REFERENCE.items():
        if column in outputs and against in outputs:
            check = _compare(outputs[column], outputs[against])
            check["against"] = against
            check["ok"] = strict is None or (check["cosine"] >= (FP32_MIN_COSINE if strict == "fp32" else INT8_MIN_COSINE)
                                             and (strict != "fp32" or check["relative"] <= FP32_MAX_RELATIVE))
            row["checks"][column] = check
            print(f"  {name} @ {threads}: {column} vs {against}: max |error| {check['max_abs']:.3g}, cosine "
                  f"{check['cosine']:.6f}{'' if check['ok'] else '  DISAGREES'}", file=sys.stderr, flush=True)
    # About MEDIAN_BUDGET_S per median: one run's time, from two after the first.
    counts = {}
    for column, run in runners.items():
        once = min(run(n=1), run(n=1)) / 1000
        counts[column] = max(3, min(repeat, int(MEDIAN_BUDGET_S / max(once, 1e-6))))
    per_round: dict[str, list[float]] = {c: [] for c in runners}
    for _ in range(rounds):
        for column, run in runners.items():
            time.sleep(SETTLE_S)
            per_round[column].append(run(n=counts[column]))
    row["ms"] = {c: min(v) for c, v in per_round.items()}
    row["rounds_ms"] = {c: [round(m, 4) for m in v] for c, v in per_round.items()}
    row["runs_per_median"] = counts
    return row


def _compare(got: list, want: list) -> dict:
    got = [np.asarray(g, np.float64).ravel() for g in got]
    want = [np.asarray(w, np.float64).ravel() for w in want]
    error = max(float(np.abs(g - w).max()) for g, w in zip(got, want))
    scale = max(float(np.abs(w).max()) for w in want) or 1.0
    cosine = min(float(g @ w / (np.linalg.norm(g) * np.linalg.norm(w) or 1.0)) for g, w in zip(got, want))
    return {"max_abs": error, "relative": error / scale, "cosine": cosine}


def _child(threads: int, plan_file: Path, repeat: int, rounds: int) -> dict:
    env = {**os.environ, "TVM_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--child", str(threads), "--plan", str(plan_file), "--repeat", str(repeat),
           "--rounds", str(rounds)]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env=env).stdout
    return json.loads(out.splitlines()[-1])  # the last line: libraries may print before it


# -- where the time goes (--profile) -----------------------------------------------------------------
def profile(model: str, threads: int, work: Path, runs: int = 10, top: int = 10) -> dict:
    """Per-kernel ms of TVM fp32 (each call the VM makes, timed by its instrument hook) and of
    onnxruntime fp32 (its profiler's per-node kernel times), each kernel's best of `runs` runs."""
    import onnx

    from graphopt import codegen
    from graphopt.deploy import quiet_tvm

    if model in bench_models.MODELS:
        source, sample = bench_models.path(model), feeds(model, 1, 0)
    else:  # an .onnx file: normal float inputs, symbolic dims 1
        source, rng = Path(model), np.random.default_rng(0)
        sample = {i.name: rng.standard_normal([d.dim_value or 1 for d in i.type.tensor_type.shape.dim]).astype(
            np.float32) for i in onnx.load(source, load_external_data=False).graph.input}
    with quiet_tvm():
        library = codegen.compile(source, TARGET, work / "fp32", shapes={k: list(v.shape) for k, v in sample.items()})
    tvm_total, tvm = _tvm_kernels(library.library, sample, runs)
    ort_total, ort_nodes = _ort_kernels(source, sample, threads, runs, work)
    result = {"model": str(model), "threads": threads}
    for side, total, kernels in (("tvm", tvm_total, tvm), ("ort", ort_total, ort_nodes)):
        result[side] = {"ms": total, "kernels_ms": sum(ms for ms, _, _ in kernels.values()),
                        "top": _top(kernels, top)}
        print(f"{side.upper()} fp32 {total:.2f} ms (best uninstrumented run), its kernels' sum "
              f"{result[side]['kernels_ms']:.2f} ms; top {top}:")
        for k in result[side]["top"]:
            print(f"  {k['ms']:9.3f} ms {k['share_pct']:5.1f}%  x{k['calls']}  {k['name']}  {k['what']}")
    return result


def _tvm_kernels(library: Path, sample: dict, runs: int) -> tuple[float, dict]:
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
    arguments, main = [tvm.runtime.tensor(np.ascontiguousarray(v)) for v in sample.values()], vm["main"]
    started, per_run, what = {}, [], {}

    def instrument(_func, symbol, before, _ret, *args):
        if before:
            started[symbol] = time.perf_counter()
            return 0
        ms, calls = per_run[-1].get(symbol, (0.0, 0))
        per_run[-1][symbol] = (ms + 1000 * (time.perf_counter() - started.pop(symbol)), calls + 1)
        what.setdefault(symbol, " ".join("x".join(map(str, a.shape)) for a in args if hasattr(a, "shape")))
        return 0

    start = time.perf_counter()
    main(*arguments)
    # Slow libraries (seconds a run) get fewer runs: about 10 s of each kind.
    runs = max(2, min(runs, int(10 / (time.perf_counter() - start))))
    main(*arguments)
    totals = []
    for _ in range(runs):
        start = time.perf_counter()
        main(*arguments)
        totals.append(1000 * (time.perf_counter() - start))
    vm.set_instrument(instrument)
    for _ in range(runs):
        per_run.append({})
        main(*arguments)
    return min(totals), {k: (min(r[k][0] for r in per_run), per_run[0][k][1], what[k]) for k in per_run[0]}


def _ort_kernels(source: Path, sample: dict, threads: int, runs: int, work: Path) -> tuple[float, dict]:
    from graphopt.ir import ort

    session = ort.session(source, optimize=True, threads=threads)
    totals = []
    for _ in range(3 + runs):
        start = time.perf_counter()
        session.run(None, sample)
        totals.append(1000 * (time.perf_counter() - start))
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.enable_profiling = threads, True
    options.profile_file_prefix = str(work / "ort_profile")
    session = onnxruntime.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    for _ in range(3 + runs):
        session.run(None, sample)
    nodes: dict[str, list] = {}
    for event in json.loads(Path(session.end_profiling()).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            nodes.setdefault(event["name"][:-len("_kernel_time")], [event["args"].get("op_name", "")]).append(
                event["dur"] / 1000)
    return min(totals[3:]), {n: (min(v[4:] or v[1:]), 1, v[0]) for n, v in nodes.items()}


def _top(kernels: dict, top: int) -> list[dict]:
    total = sum(ms for ms, _, _ in kernels.values()) or 1.0
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    return [{"name": n, "ms": round(ms, 3), "share_pct": round(100 * ms / total, 1), "calls": calls, "what": what}
            for n, (ms, calls, what) in ranked]


# -- the table ----------------------------------------------------------------------------------------
def rows(result: dict) -> list[dict]:
    """One row per model and thread count: each column's ms (None: not built, or disagrees) and ratios."""
    table = []
    for threads, run in result["runs"].items():
        for name, m in run["models"].items():
            ok = {c: ms for c, ms in m["ms"].items() if m["checks"].get(c, {"ok": True})["ok"]}
            best_int8 = min((ok[c] for c in ("ort_qdq", "ort_graphopt_int8") if c in ok), default=None)
            table.append({"model": name, "threads": int(threads), "ms": m["ms"], "ok": ok, "best_ort_int8": best_int8,
                          "vs_ort_fp32": {c: ok["ort_fp32"] / ms for c, ms in ok.items() if "ort_fp32" in ok},
                          "tvm_int8_vs_ort_best_int8": (best_int8 / ok["tvm_int8"] if best_int8 and "tvm_int8" in ok
                                                        else None)})
    return table


def markdown(result: dict) -> str:
    head = ["model", "threads", *COLUMNS.values(), "TVM int8 vs ORT best int8"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows(result):
        cells = [r["model"], str(r["threads"])]
        for column in COLUMNS:
            if column not in r["ms"]:
                cells.append("—")
            elif column not in r["ok"]:
                cells.append(f"{r['ms'][column]:.2f} (disagrees)")
            else:
                ratio = r["vs_ort_fp32"].get(column)
                cells.append(f"{r['ms'][column]:.2f}" + (f" ({ratio:.2f}x)" if column != "ort_fp32" else ""))
        ratio = r["tvm_int8_vs_ort_best_int8"]
        cells.append(f"{ratio:.2f}x" if ratio else "—")
        lines.append("| " + " | ".join(cells) + " |")
    m = result["machine"]
    flags = ", ".join(f for f, on in m["flags"].items() if on)
    lines += ["", (f"ms, batch 1, best of {result['rounds']} rounds of medians; (Nx) = onnxruntime fp32 ms / the "
                   f"column's ms. {m['cpu']}, {m['logical_cpus']} logical CPUs ({flags}); TVM {m['tvm']}, "
                   f"onnxruntime {m['onnxruntime']}; load average at the end {m['load_average_at_end']}.")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cores = len(os.sched_getaffinity(0))
    parser.add_argument("--models", default=",".join(bench_models.MODELS),
                        help=f"comma-separated, from: {', '.join(bench_models.MODELS)}")
    parser.add_argument("--threads", default=",".join(sorted({"1", str(cores)}, key=int)),
                        help="comma-separated thread counts (default: 1 and every CPU this process may use)")
    parser.add_argument("--repeat", type=int, default=50, help="most timed runs per median (default 50)")
    parser.add_argument("--rounds", type=int, default=5, help="medians per runtime; the best is shown (default 5)")
    parser.add_argument("--tune", type=int, default=0, metavar="N", help="MetaSchedule trials per model (default off)")
    parser.add_argument("--quick", action="store_true", help=f"{', '.join(QUICK_MODELS)} at 1 thread, "
                        f"{QUICK_REPEAT} runs x {QUICK_ROUNDS} rounds: a smoke test, not a measurement")
    parser.add_argument("--keep", type=Path, help="build into this folder and keep it (default: a temporary one)")
    parser.add_argument("--profile", metavar="MODEL", help="instead of the table: per-kernel ms of TVM fp32 and "
                        "onnxruntime fp32 on MODEL (a bench model's name or an .onnx file), at the first --threads")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--plan", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure(args.child, json.loads(args.plan.read_text()), args.repeat, args.rounds)))
        return
    if args.profile:
        threads = int(args.threads.split(",")[0])
        os.environ["TVM_NUM_THREADS"] = str(threads)  # before the library starts TVM's pool
        with tempfile.TemporaryDirectory() as tmp:
            result = profile(args.profile, threads, Path(tmp))
        out = RESULTS / f"models_profile_{Path(args.profile).stem}_{threads}t.json"
        RESULTS.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**result, "machine": {**machine(), "flags": cpu_flags()}}, indent=1) + "\n")
        print(f"wrote {out.relative_to(ROOT)}")
        return
    chosen = list(QUICK_MODELS) if args.quick else args.models.split(",")
    unknown = sorted(set(chosen) - set(bench_models.MODELS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(bench_models.MODELS)}")
    threads = ["1"] if args.quick else args.threads.split(",")
    repeat, rounds = (QUICK_REPEAT, QUICK_ROUNDS) if args.quick else (args.repeat, args.rounds)
    present = []
    for name in chosen:
        if bench_models.path(name).is_file():
            present.append(name)
        else:
            print(f"{name}: skipped, {bench_models.path(name)} is missing; build it with "
                  f"`{bench_models.BUILD_COMMAND} --only {name}` (torch in its own venv, see that script)")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        plan = {}
        for name in present:
            (work / name).mkdir(parents=True, exist_ok=True)
            plan[name] = build(name, work / name, args.tune)
        plan_file = work / "plan.json"
        plan_file.write_text(json.dumps(plan, indent=1))
        runs = {t: _child(int(t), plan_file, repeat, rounds) for t in threads} if plan else {}
    result = {"target": TARGET, "quick": args.quick, "repeat": repeat, "rounds": rounds, "tune_trials": args.tune,
              "calibration_samples": CALIBRATION_SAMPLES, "machine": {**machine(), "flags": cpu_flags()},
              "builds": plan, "runs": runs}
    result["table"] = rows(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "models.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "models.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {RESULTS.relative_to(ROOT)}/models.json and models.md")


if __name__ == "__main__":
    main()
