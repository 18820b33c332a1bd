"""Benchmark: canonicalize a ResNet-50-size model the way the CLI does, timing and measuring memory.

    python bench/canonicalize_resnet50.py

Builds `graphopt.testing.builders.resnet50()` (25.6M parameters, BatchNormalization unfolded),
saves it, then in a fresh subprocess (so that peak RSS holds only this work) loads it with the
validating loader, runs `canonicalize` under PassManager(verify=True) and saves the result.
Reports wall time per phase, peak RSS above the post-import baseline against the model's file
size, BatchNormalization nodes before and after, and whether the canonicalized model matches the
original in onnxruntime. Targets (from the issue): canonicalize under 20 s, peak memory under 3x
the model's size. Writes bench/results/canonicalize_resnet50.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results" / "canonicalize_resnet50.json"
TARGET_CANONICALIZE_S = 20.0
TARGET_MEMORY_RATIO = 3.0
# Outputs may differ by float32 reassociation only: BN folding rescales the weights.
MAX_RELATIVE_DIFF = 1e-4


def _peak_rss_bytes() -> int:
    # ru_maxrss is kilobytes on Linux and bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# -- the measured child ----------------------------------------------------------------------
def measure(model: Path, optimized: Path) -> dict:
    """Runs in the subprocess: load, canonicalize, save; wall time and peak RSS after each phase."""
    from graphopt.ir import io
    from graphopt.passes.manager import PassManager
    from graphopt.passes.pipeline import Pipeline

    baseline = _peak_rss_bytes()
    seconds: dict[str, float] = {}
    peaks: dict[str, int] = {}

    def phase(name: str, work: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = work()
        seconds[name], peaks[name] = time.perf_counter() - start, _peak_rss_bytes() - baseline
        return result

    graph = phase("load", lambda: io.load(model))
    records = phase("canonicalize", lambda: PassManager(Pipeline.parse("canonicalize"), verify=True).run(graph))
    phase("save", lambda: io.save(graph, optimized))
    seconds["total"] = sum(seconds.values())
    return {"seconds": seconds, "baseline_rss_bytes": baseline, "peak_rss_above_baseline_bytes": peaks,
            "canonicalize_stats": records[0].stats}


# -- the parent ------------------------------------------------------------------------------
def build(path: Path) -> None:
    """Runs in a subprocess too: see `_child`."""
    import onnx

    from graphopt.testing.builders import resnet50

    onnx.save_model(resnet50(), str(path))


def _child(*args: str) -> str:
    """Run this script with `args` in a fresh interpreter and return what it printed.

    This process must stay small until both children have run: Linux carries the peak RSS of the
    process that spawns a child over into the child's ru_maxrss, across exec.
    """
    return subprocess.run([sys.executable, __file__, *args], check=True, stdout=subprocess.PIPE, text=True).stdout


def _batchnorms(path: Path) -> int:
    import onnx

    model = onnx.load_model(str(path), load_external_data=False)
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


def _fidelity(original: Path, optimized: Path) -> dict:
    """Max abs difference per output, relative to the output's scale, on seeded random inputs."""
    import numpy as np

    from graphopt.ir import io, ort
    from graphopt.ir.data import input_specs, random_feeds

    feeds = random_feeds(input_specs(io.load(original)), seed=0)
    reference, candidate = ort.run(original, feeds), ort.run(optimized, feeds)
    result = {}
    for name, ref in reference.items():
        scale = max(float(np.max(np.abs(ref))), np.finfo(np.float32).tiny)
        result[name] = float(np.max(np.abs(candidate[name] - ref))) / scale
    return result


def run() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model, optimized = Path(tmp) / "resnet50.onnx", Path(tmp) / "resnet50.opt.onnx"
        _child("--build", str(model))
        # The measurement is the child's last line; libraries may print warnings before it.
        child = json.loads(_child("--measure", str(model), str(optimized)).splitlines()[-1])
        size = model.stat().st_size
        peak = max(child["peak_rss_above_baseline_bytes"].values())
        fidelity = _fidelity(model, optimized)
        return {
            **child,
            "model_bytes": size,
            "optimized_bytes": optimized.stat().st_size,
            "peak_rss_over_model_size": peak / size,
            "batchnorm_nodes": {"before": _batchnorms(model), "after": _batchnorms(optimized)},
            "max_relative_diff": fidelity,
            "targets": {
                "canonicalize_s": TARGET_CANONICALIZE_S, "memory_ratio": TARGET_MEMORY_RATIO,
                "canonicalize_met": child["seconds"]["canonicalize"] < TARGET_CANONICALIZE_S,
                "memory_met": peak / size < TARGET_MEMORY_RATIO,
                "fidelity_met": max(fidelity.values()) < MAX_RELATIVE_DIFF,
            },
        }


def _print_table(r: dict) -> None:
    mb = 1 / 2**20
    peaks = r["peak_rss_above_baseline_bytes"]
    # ru_maxrss only grows: each phase shows the peak reached by its end.
    print(f"{'phase':<14}{'seconds':>10}{'peak RSS above baseline (MiB)':>32}")
    for phase, seconds in r["seconds"].items():
        peak = f"{peaks[phase] * mb:.0f}" if phase in peaks else ""
        print(f"{phase:<14}{seconds:>10.2f}{peak:>32}")
    print(f"\nbaseline RSS after imports  {r['baseline_rss_bytes'] * mb:.0f} MiB")
    print(f"model file                  {r['model_bytes'] * mb:.0f} MiB (optimized {r['optimized_bytes'] * mb:.0f} MiB)")
    print(f"peak RSS / model size       {r['peak_rss_over_model_size']:.2f}x")
    print(f"BatchNormalization nodes    {r['batchnorm_nodes']['before']} -> {r['batchnorm_nodes']['after']}")
    for name, diff in r["max_relative_diff"].items():
        print(f"max |diff| / scale ({name})  {diff:.2e}")
    t = r["targets"]
    print(f"\ncanonicalize < {t['canonicalize_s']:g} s: {'met' if t['canonicalize_met'] else 'MISSED'}; "
          f"peak memory < {t['memory_ratio']:g}x model: {'met' if t['memory_met'] else 'MISSED'}; "
          f"matches original (< {MAX_RELATIVE_DIFF:g}): {'yes' if t['fidelity_met'] else 'NO'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--measure", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        build(Path(args.build))
        return
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), Path(args.measure[1]))))
        return
    result = run()
    _print_table(result)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {RESULTS}")
    # Missed targets are results to report; a canonicalized model that computes something else is an error.
    sys.exit(0 if result["targets"]["fidelity_met"] else 1)


if __name__ == "__main__":
    main()
