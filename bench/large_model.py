"""Benchmark: graphopt on a model with external data, beside onnxruntime's own load of it.

    python bench/large_model.py                 # ~130 MB: 2 MatMul+Relu layers of 4096 x 4096, about a minute
    python bench/large_model.py --size 2400     # the acceptance model: 9 layers of 8192 x 8192, 2.4 GB

Builds MatMul+Relu layers with float32 weights in one external data file (as `onnx.save` writes
them) and input data, then runs each measurement in a process of its own: `graphopt inspect`,
`graphopt optimize --passes canonicalize`, `... canonicalize,quantize` (with --data), onnxruntime
creating an InferenceSession from the file, and creating one and running it once. Wall time and
peak RSS come from the child's own rusage (wait4), so each row holds that process alone; the
Python-with-imports baseline is a row of its own, and the last column is the peak above it.
At small sizes that baseline dominates the ratio; at the acceptance size it is noise. Also,
`optimize` computes the zlib-compressed size of models under 2 GiB (at about 15 MB/s here),
which dominates its time at a few hundred MB. Prints a table and writes
bench/results/large_model.json with the CPU it ran on. The target (issue 13): inspect and
canonicalize within 1.5x the model's size.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "large_model.json"
TARGET_RATIO = 1.5
# Layer width by model size: the acceptance model's 8192 from a gigabyte on, 4096 below.
WIDE, NARROW, WIDE_FROM_MB = 8192, 4096, 1024

BUILD = """
import sys, numpy as np, onnx
from onnx import helper as h, TensorProto as T, numpy_helper as nh
folder, layers, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0); inits, nodes, x = [], [], "x"
for i in range(layers):
    inits.append(nh.from_array(rng.standard_normal((k, k), dtype=np.float32) / np.float32(k ** 0.5), f"w{i}"))
    nodes += [h.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"mm{i}"),
              h.make_node("Relu", [f"m{i}"], [f"y{i}"], name=f"relu{i}")]
    x = f"y{i}"
g = h.make_graph(nodes, "big", [h.make_tensor_value_info("x", T.FLOAT, ["N", k])],
                 [h.make_tensor_value_info(x, T.FLOAT, ["N", k])], inits)
onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), f"{folder}/big.onnx",
          save_as_external_data=True, all_tensors_to_one_file=True, location="big.data")
np.savez(f"{folder}/d.npz", x=rng.standard_normal((8, k)).astype(np.float32))
"""
ORT_LOAD = """
import sys, onnxruntime as ort
ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
"""
ORT_RUN = """
import sys, numpy as np, onnxruntime as ort
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
s.run(None, {"x": np.load(sys.argv[2])["x"]})
"""
IMPORTS = "import graphopt.cli, graphopt.cli.inspect, graphopt.cli.jobs"


def layout(size_mb: float) -> tuple[int, int]:
    """(layers, width) of a model of about `size_mb` megabytes of float32 weights."""
    k = WIDE if size_mb >= WIDE_FROM_MB else NARROW
    return max(1, round(size_mb * 1e6 / (4 * k * k))), k


def measure(args: list[str]) -> dict:
    """Run `args`; its wall time, peak RSS and exit status, from its own rusage."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    row = {"seconds": round(seconds, 2), "peak_rss_bytes": usage.ru_maxrss * 1024, "exit": proc.returncode}
    if proc.returncode:
        row["error"] = (stderr.strip().splitlines() or [""])[-1]
    return row


def run(size_mb: float, keep: Path | None) -> dict:
    layers, k = layout(size_mb)
    folder = Path(keep or tempfile.mkdtemp(prefix="graphopt-large-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run([sys.executable, "-c", BUILD, str(folder), str(layers), str(k)], check=True)
        model, data = folder / "big.onnx", folder / "d.npz"
        size = model.stat().st_size + (folder / "big.data").stat().st_size
        exe = [sys.executable, "-m", "graphopt.cli"]
        cases = {
            "python + graphopt imports": [sys.executable, "-c", IMPORTS],
            "graphopt inspect": [*exe, "inspect", str(model)],
            "graphopt optimize canonicalize": [*exe, "optimize", str(model), "--passes", "canonicalize", "--data",
                                               str(data), "-o", str(folder / "o1"), "-q"],
            "graphopt optimize canonicalize,quantize": [*exe, "optimize", str(model), "--passes",
                                                        "canonicalize,quantize", "--data", str(data),
                                                        "-o", str(folder / "o2"), "-q"],
            "onnxruntime InferenceSession": [sys.executable, "-c", ORT_LOAD, str(model)],
            "onnxruntime session + one run": [sys.executable, "-c", ORT_RUN, str(model), str(data)],
        }
        rows = {}
        for name, args in cases.items():
            rows[name] = measure(args)
            rows[name]["peak_over_model"] = round(rows[name]["peak_rss_bytes"] / size, 3)
            for out in ("o1", "o2"):  # disk, not memory: no later row reads them
                shutil.rmtree(folder / out, ignore_errors=True)
        base = rows["python + graphopt imports"]["peak_rss_bytes"]
        for row in rows.values():
            row["above_baseline_over_model"] = round((row["peak_rss_bytes"] - base) / size, 3)
    finally:
        if keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    within = all(rows[n]["exit"] == 0 and rows[n]["peak_over_model"] <= TARGET_RATIO
                 for n in ("graphopt inspect", "graphopt optimize canonicalize"))
    return {"model": {"layers": layers, "width": k, "bytes": size}, "rows": rows,
            "target": {"peak_over_model": TARGET_RATIO, "inspect_and_canonicalize_met": within}}


def print_table(result: dict) -> None:
    m = result["model"]
    print(f"model: {m['layers']} x MatMul+Relu, {m['width']} x {m['width']} float32, "
          f"{m['bytes'] / 1e9:.2f} GB in external data")
    print(f"{'':42}{'seconds':>9}{'peak RSS MiB':>14}{'x model':>9}{'above base':>12}  result")
    for name, r in result["rows"].items():
        status = "ok" if r["exit"] == 0 else f"exit {r['exit']}: {r.get('error', '')}"
        print(f"{name:42}{r['seconds']:>9.1f}{r['peak_rss_bytes'] / 2**20:>14,.0f}{r['peak_over_model']:>9.2f}"
              f"{r['above_baseline_over_model']:>12.2f}  {status}")
    t = result["target"]
    print(f"\ninspect and canonicalize within {t['peak_over_model']:g}x the model: "
          f"{'met' if t['inspect_and_canonicalize_met'] else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=float, default=130,
                        help="weights in MB (default 130, about a minute; 2400 is the acceptance model)")
    parser.add_argument("--keep", type=Path, help="build the model in this folder and keep it")
    args = parser.parse_args()
    result = run(args.size, args.keep)
    from timing import machine  # bench/ is on sys.path when run as a script; imported late, after the children

    result["machine"] = machine()
    print_table(result)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
