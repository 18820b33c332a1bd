"""Benchmark: does prune-channels make a ResNet faster in onnxruntime, not just smaller?

    python bench/prune_channels_latency.py [--repeat 300] [--threads 1]

Builds `graphopt.testing.builders.resnet(blocks=(2, 2), width=64, image=56)` (residual Adds, so
coupled channels are pruned together), prunes it with round_to=1, 8 and 16, each at the `ratio`
that removes closest to 50% of the MACs, and times each model against the original in
onnxruntime with all graph optimisations on (BatchNormalization folded, as deployed). Runs of
the two models alternate, so that load from other processes falls on both alike; the table
shows the median and the interquartile range. Writes bench/results/prune_channels_latency.json.
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import fidelity, ort
from graphopt.ir.graph import infer_shapes
from graphopt.passes.manager import PassManager
from graphopt.passes.prune.channels import PruneChannels
from graphopt.report import summarize
from timing import interleaved_ms  # bench/ is on sys.path when run as a script

from graphopt.testing.builders import resnet

RESULTS = Path(__file__).resolve().parent / "results" / "prune_channels_latency.json"
TARGET_MACS = 0.5
RATIOS = np.round(np.arange(0.05, 0.65, 0.025), 3)


def prune(graph: gs.Graph, **options) -> gs.Graph:
    pruned = graph.copy()
    PassManager([PruneChannels(**options)], verify=False).run(pruned)
    return infer_shapes(pruned)


def pick_ratio(graph: gs.Graph, round_to: int) -> float:
    """The ratio whose pruned model keeps MACs closest to TARGET_MACS of the original."""
    macs = summarize(graph)["macs"]
    kept = [summarize(prune(graph, ratio=float(r), round_to=round_to))["macs"] / macs for r in RATIOS]
    return float(RATIOS[int(np.argmin(np.abs(np.array(kept) - TARGET_MACS)))])


def run(repeat: int, threads: int) -> dict:
    graph = infer_shapes(gs.import_onnx(resnet(blocks=(2, 2), width=64, image=56)))
    # onnxruntime's blocked (NCHWc) convolutions take channels in blocks of 8 (AVX2) or 16 (AVX-512).
    ratios = {f"round_to={k}": pick_ratio(graph, k) for k in (1, 8, 16)}
    models = {"original": graph, **{name: prune(graph, ratio=ratio, round_to=int(name.split("=")[1]))
                                    for name, ratio in ratios.items()}}
    feeds = {"input": np.random.default_rng(0).standard_normal((1, 3, 56, 56)).astype(np.float32)}
    reference = ort.run(graph, feeds)["output"]
    times = interleaved_ms(models, feeds, repeat, threads)
    base = float(np.median(times["original"]))
    rows = {}
    for name, g in models.items():
        s = summarize(g)
        q1, median, q3 = (float(q) for q in np.percentile(times[name], [25, 50, 75]))
        rows[name] = {"ratio": ratios.get(name, 0.0), "macs": s["macs"], "params": s["params"],
                      "median_ms": median, "iqr_ms": [q1, q3], "speedup": base / median,
                      "cosine": fidelity.measure(reference, ort.run(g, feeds)["output"]).cosine}
    return {"model": "resnet(blocks=(2, 2), width=64, image=56), batch 1",
            "repeat": repeat, "threads": threads, "machine": platform.processor() or platform.machine(),
            "models": rows}


def _print_table(r: dict) -> None:
    base = r["models"]["original"]
    print(f"{r['model']}; {r['repeat']} runs each, {r['threads'] or 'default'} thread(s)")
    print(f"{'model':<12}{'ratio':>7}{'MACs':>14}{'x':>7}{'params':>12}{'x':>7}{'median ms':>11}{'IQR ms':>16}"
          f"{'speedup':>9}{'cosine':>8}")
    for name, m in r["models"].items():
        iqr = f"{m['iqr_ms'][0]:.2f}-{m['iqr_ms'][1]:.2f}"
        print(f"{name:<12}{m['ratio']:>7.3f}{m['macs']:>14,}{m['macs'] / base['macs']:>7.2f}{m['params']:>12,}"
              f"{m['params'] / base['params']:>7.2f}{m['median_ms']:>11.2f}{iqr:>16}{m['speedup']:>8.2f}x"
              f"{m['cosine']:>8.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=300, help="timed runs per model (default 300)")
    parser.add_argument("--threads", type=int, default=1,
                        help="onnxruntime intra-op threads; 0 for its default (default 1: steadier on a busy host)")
    args = parser.parse_args()
    result = run(args.repeat, args.threads)
    _print_table(result)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
