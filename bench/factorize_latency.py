"""Benchmark: do factorize-svd and factorize-tucker make models faster in onnxruntime, not just smaller?

    python bench/factorize_latency.py [--repeat 200] [--threads 1]

Two models where factorization removes at least 40% of the MACs:
  - a wide MLP, `builders.mlp(sizes=(512, 2048, 2048, 512), batch=32)`, with factorize-svd at
    ratio 0.4 (each product keeps 40% of its parameters, hence of its MACs);
  - a ResNet, `builders.resnet(blocks=(2, 2), width=64, image=56)`, BatchNormalization folded
    first (as onnxruntime would), with factorize-tucker at ratio 0.4.
Each factored model is timed against its original in onnxruntime with all graph optimisations on.
Runs of the two alternate, so that load from other processes falls on both alike; the table shows
the median and the interquartile range. The weights are random, so the cosine column says how much
a random-weight model loses, not what a trained one would. Writes bench/results/factorize_latency.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

# Set before numpy loads OpenBLAS. On a small host shared with other jobs, OpenBLAS threads wait on
# each other: the 2048 x 2048 SVD takes about 4 s on one thread and 20 s on two busy cores.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import fidelity, ort
from graphopt.ir.graph import infer_shapes
from graphopt.passes.cleanup.fold_batchnorm import FoldBatchNorm
from graphopt.passes.factorize.svd import FactorizeSVD
from graphopt.passes.factorize.tucker import FactorizeTucker
from graphopt.passes.manager import PassManager
from graphopt.report import summarize
from timing import interleaved_ms  # bench/ is on sys.path when run as a script

from graphopt.testing import builders

RESULTS = Path(__file__).resolve().parent / "results" / "factorize_latency.json"
CASES = {
    "mlp 512-2048-2048-512, batch 32 / factorize-svd(ratio=0.4)":
        (lambda: builders.mlp(sizes=(512, 2048, 2048, 512), batch=32), [], FactorizeSVD(ratio=0.4)),
    "resnet(blocks=(2, 2), width=64, image=56), batch 1 / factorize-tucker(ratio=0.4)":
        (lambda: builders.resnet(blocks=(2, 2), width=64, image=56), [FoldBatchNorm()], FactorizeTucker(ratio=0.4)),
}


def prepare(build, setup: list, factorize) -> tuple[gs.Graph, gs.Graph]:
    """(original, factored); both after `setup`, so the comparison is of the factorization alone."""
    original = gs.import_onnx(build())
    PassManager(setup).run(original)
    factored = original.copy()
    PassManager([factorize]).run(factored)
    return infer_shapes(original), infer_shapes(factored)


def measure(case: str, repeat: int, threads: int) -> dict:
    build, setup, factorize = CASES[case]
    original, factored = prepare(build, setup, factorize)
    spec = original.inputs[0]
    feeds = {spec.name: np.random.default_rng(0).standard_normal(spec.shape).astype(np.float32)}
    times = interleaved_ms({"original": original, "factored": factored}, feeds, repeat, threads)
    reference, out = (ort.run(g, feeds)["output"] for g in (original, factored))
    rows = {}
    for name, graph in (("original", original), ("factored", factored)):
        s = summarize(graph)
        q1, median, q3 = (float(q) for q in np.percentile(times[name], [25, 50, 75]))
        rows[name] = {"macs": s["macs"], "params": s["params"], "median_ms": median, "iqr_ms": [q1, q3]}
    rows["factored"]["speedup"] = rows["original"]["median_ms"] / rows["factored"]["median_ms"]
    measured = fidelity.measure(reference, out)
    rows["factored"].update(cosine=measured.cosine, sqnr_db=measured.sqnr_db)
    return rows


def _print_table(result: dict) -> None:
    print(f"{result['repeat']} runs each, {result['threads'] or 'default'} thread(s), {result['machine']}")
    print(f"{'case':<84}{'MACs':>9}{'params':>9}{'median ms':>11}{'IQR ms':>16}{'speedup':>9}{'cosine':>8}")
    for case, rows in result["cases"].items():
        base, new = rows["original"], rows["factored"]
        iqr = "-".join(f"{q:.2f}" for q in new["iqr_ms"])
        print(f"{case:<84}{new['macs'] / base['macs']:>8.2f}x{new['params'] / base['params']:>8.2f}x"
              f"{new['median_ms']:>11.2f}{iqr:>16}{new['speedup']:>8.2f}x{new['cosine']:>8.3f}")
        print(f"{'  original':<84}{base['macs']:>9.2e}{base['params']:>9.2e}{base['median_ms']:>11.2f}"
              f"{'-'.join(f'{q:.2f}' for q in base['iqr_ms']):>16}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200, help="timed runs per model (default 200)")
    parser.add_argument("--threads", type=int, default=1,
                        help="onnxruntime intra-op threads; 0 for its default (default 1: steadier on a busy host)")
    args = parser.parse_args()
    result = {"repeat": args.repeat, "threads": args.threads, "machine": platform.processor() or platform.machine(),
              "cases": {case: measure(case, args.repeat, args.threads) for case in CASES}}
    _print_table(result)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
