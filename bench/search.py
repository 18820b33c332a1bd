"""Benchmark: the search to a budget (issue 16) against a fixed pipeline written by hand.

    python bench/search.py                          # digits (5 min) and ResNet-18 (20 min)
    python bench/search.py --models digits --budget 120

For each model, `graphopt optimize MODEL --data D --max-drop 1% --target x86 --search-budget B`
runs as a user would (the CLI, in this process), and so does the hand-written pipeline below with
the same data and target. Columns: onnxruntime fp32 on the original (one sample, median of 50 runs
after warm-up, taken in turns with the two libraries: `bench.timing`), the chosen library and the
hand pipeline's library, their speed-ups over onnxruntime, top-1 on the held-aside half of the
data (accuracy against the labels), the
candidates measured and the search's wall time.

Models: the bundled digits CNN with its labelled test set (540 samples: 270 calibrate, 270 judge)
and the corpus's trained ResNet-18 (`torch-resnet18-digits`: torchvision's ResNet-18 trained on
the other 70% of the same digits at 112x112 RGB; models/corpus/make_torch_models.py builds it into
~/.cache/graphopt/corpus, ~2 minutes), judged by accuracy on the same labelled test set. The
corpus's random-weight ResNet-18 is no judge: it predicts one class (238) for every input, so any
compression keeps 100% agreement (measured: 75% of channels removed, agreement 100%, output cosine
0.9989). Target (issue 16): the chosen model at least 3x faster than the original in onnxruntime
fp32 within 1 point, found within 20 minutes on a 2-core machine. Writes bench/results/search.json
and search.md, with the CPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]  # this checkout's graphopt, not an installed one

RESULTS = ROOT / "bench" / "results"
CORPUS = Path.home() / ".cache" / "graphopt" / "corpus" / "torch"
HAND = "canonicalize,prune-channels(ratio=0.5,round_to=8),quantize,lower-int8"
MODELS = {
    "digits": (ROOT / "models" / "digits_cnn.onnx", 300),
    "resnet18-digits": (CORPUS / "torch-resnet18-digits" / "resnet18_digits.onnx", 1200),
}


def digits_images(x: np.ndarray, size: int = 112) -> np.ndarray:
    """scikit-learn's 8x8 digits (N, 1, 8, 8) in [0, 1] as the RGB images ResNet-18-digits takes:
    nearest-upsampled to `size`, three equal channels, centred and scaled. Its training
    (models/corpus/make_torch_models.py) uses this same function."""
    up = x.repeat(size // 8, axis=2).repeat(size // 8, axis=3)
    return ((np.repeat(up, 3, axis=1) - 0.5) / 0.25).astype(np.float32)


def data_for(name: str, folder: Path) -> Path:
    test = ROOT / "models" / "digits_test.npz"
    if name == "digits":
        return test
    path = folder / f"{name}_data.npz"
    with np.load(test) as d:
        np.savez(path, x=digits_images(d["x"]), y=d["y"])
    return path


def run(name: str, model: Path, budget: float, work: Path) -> dict:
    from graphopt.cli import main

    data = data_for(name, work)
    searched, hand = work / f"{name}_search", work / f"{name}_hand"
    common = ["--data", str(data), "--target", "x86", "-q"]
    if main(["optimize", str(model), *common, "--max-drop", "1%", "--search-budget", str(budget),
             "-o", str(searched)]) != 0:
        raise SystemExit(f"{name}: the search failed")
    if main(["optimize", str(model), *common, "--passes", HAND, "--no-verify", "-o", str(hand)]) != 0:
        raise SystemExit(f"{name}: the hand pipeline failed")
    report = json.loads((searched / "report.json").read_text())
    hand_report = json.loads((hand / "report.json").read_text())
    ort_ms, search_ms, hand_ms = _interleaved(model, searched, hand, data)
    search_call, hand_call = (_library_call_ms(folder, data) for folder in (searched, hand))
    search = report["search"]
    return {"model": name, "budget_s": budget, "elapsed_s": search["elapsed_s"],
            "candidates": len(search["candidates"]), "chosen": report["pipeline"], "hand": HAND,
            "metric": report.get("accuracy", {}).get("metric"),
            "top1_before": report["accuracy"]["before"], "top1_search": report["accuracy"]["after"],
            "top1_hand": hand_report.get("accuracy", {}).get("after"),
            "ort_fp32_ms": ort_ms, "search_ms": search_ms, "hand_ms": hand_ms,
            "speedup_search": round(ort_ms / search_ms, 2), "speedup_hand": round(ort_ms / hand_ms, 2),
            "search_library_call_ms": search_call, "hand_library_call_ms": hand_call,
            "speedup_search_library_call": round(ort_ms / search_call, 2),
            "pareto": [{k: p[k] for k in ("spec", "latency_ms", "accuracy")} for p in search["pareto"]]}


def _interleaved(model: Path, searched: Path, hand: Path, data: Path, rounds: int = 5, repeat: int = 50):
    """Best-of-rounds medians: onnxruntime on the original, the chosen library, the hand library."""
    import statistics
    import time

    from graphopt import codegen
    from graphopt.ir import ort

    x = np.load(data)["x"][:1]
    session = ort.session(str(model), optimize=True)
    name = session.get_inputs()[0].name
    libraries = [codegen.load(next(folder.glob("*.so"))) for folder in (searched, hand)]
    runs = [lambda: session.run(None, {name: x})] + [lambda lib=lib: lib.run({name: x}) for lib in libraries]
    best = [float("inf")] * len(runs)
    for _ in range(rounds):
        for i, f in enumerate(runs):
            for _ in range(5):
                f()
            times = []
            for _ in range(repeat):
                start = time.perf_counter()
                f()
                times.append(1000 * (time.perf_counter() - start))
            best[i] = min(best[i], statistics.median(times))
    return [round(t, 5) for t in best]


def _library_call_ms(folder: Path, data: Path) -> float:
    """The library's own time, inputs already in TVM tensors (`CompiledModel.benchmark`): what
    `report.json`'s codegen latency is; `run` adds the copies in and out (about 12 us)."""
    from graphopt import codegen

    lib = codegen.load(next(folder.glob("*.so")))
    x = np.load(data)["x"][:1]
    return round(min(lib.benchmark({lib.input_names[0]: x}, repeat=200) for _ in range(3)), 5)


def markdown(rows: list[dict], where: dict) -> str:
    lines = [f"# Search to a budget vs a hand pipeline ({where['cpu']}, {where['logical_cpus']} CPUs)", "",
             f"Hand pipeline: `{HAND}`", "",
             "Library times are `run` (numpy in, numpy out); the library call alone (inputs already "
             "TVM tensors, as report.json's codegen latency) in brackets.", "",
             "| model | ORT fp32 ms | search ms (x) [call] | hand ms (x) | top-1 before / search / hand | "
             "candidates | search s | chosen |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['ort_fp32_ms']:.4g} | {r['search_ms']:.4g} ({r['speedup_search']}x) "
                     f"[{r['search_library_call_ms']:.4g} ({r['speedup_search_library_call']}x)] | "
                     f"{r['hand_ms']:.4g} ({r['speedup_hand']}x) | {r['top1_before']} / {r['top1_search']} / "
                     f"{r['top1_hand']} | {r['candidates']} | {r['elapsed_s']} | `{r['chosen']}` |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--budget", type=float, help="search budget in seconds for every model "
                                                     "(default: 300 digits, 1200 ResNet-18)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="graphopt-search-bench-") as tmp:
        for name in args.models.split(","):
            model, budget = MODELS[name]
            if not model.exists():
                print(f"{name}: {model} is missing; build it with models/corpus/make_torch_models.py", file=sys.stderr)
                continue
            rows.append(run(name, model, args.budget or budget, Path(tmp)))
            print(json.dumps(rows[-1], indent=1))
    from timing import machine  # bench/ is on sys.path when run as a script; numpy-only above, for
                                # models/corpus/make_torch_models.py's use of digits_images

    where = machine()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "search.json").write_text(json.dumps({"machine": where, "rows": rows}, indent=1))
    (RESULTS / "search.md").write_text(markdown(rows, where))
    print(markdown(rows, where))


if __name__ == "__main__":
    main()
