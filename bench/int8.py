"""Benchmark: int8 in TVM (graphopt's packed AMX/VNNI/dotprod kernels) against TVM fp32 and onnxruntime.

    python bench/int8.py                     # every case, 100 runs per median, 5 rounds
    python bench/int8.py --cases conv3x3-64 --repeat 50
    python bench/int8.py --quick             # a smoke test, not a measurement

Cases: single convolutions (ResNet shapes at batch 1), single matmuls (one row, and a batch of
rows), and `resnet`: `graphopt.testing.builders.resnet(blocks=(1, 1), width=64, image=56)` with
its BatchNorms folded. Each float model is quantized with onnxruntime's `quantize_static` on
random calibration data (uint8 activations, per-channel int8 weights; Conv and MatMul only, so
that every op stays importable), in QOperator format (QLinearConv, QLinearMatMul: what graphopt
compiles) and QDQ format. Columns: TVM int8 (the QOperator model), TVM fp32 (graphopt's default
schedules, untuned), onnxruntime fp32, onnxruntime int8 QOperator and QDQ (all graph
optimisations on).

Latency is the median of `--repeat` runs in this process after warm-up, TVM and onnxruntime on
`--threads` threads each (on a machine shared with other work, `--threads 1` compares kernels
rather than who got the second core); the runtimes take turns
for `--rounds` rounds and the table shows each one's best round, so that other work on a shared
machine inflates it least (the JSON keeps every round). TVM int8 output is checked against
onnxruntime's QOperator output. Prints a table and writes bench/results/int8.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from timing import machine, ort_median_ms  # bench/ is on sys.path when run as a script
from graphopt import codegen, optimize
from graphopt.ir.graph import export
from graphopt.testing.builders import resnet

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "int8.json"
TARGET = "x86"
CALIBRATION_SAMPLES = 8
# A requantized output may differ from onnxruntime's by one step (a rounding tie); where the
# output is float (a network's float head), by a small fraction of its range.
MAX_STEPS = 1
MAX_RELATIVE_ERROR = 0.02


def conv(ic: int, oc: int, kernel: int, size: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((oc, ic, kernel, kernel)) / np.sqrt(ic * kernel * kernel)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[kernel // 2] * 4)
    return _model(node, [1, ic, size, size], {"w": w, "b": rng.standard_normal(oc).astype(np.float32)})


def matmul(rows: list[int], k: int, n: int) -> onnx.ModelProto:
    w = (np.random.default_rng(0).standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    return _model(helper.make_node("MatMul", ["x", "w"], ["y"]), [*rows, k], {"w": w})


def _model(node: onnx.NodeProto, shape: list[int], weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    graph = helper.make_graph([node], "bench", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def resnet_folded() -> onnx.ModelProto:
    """Folded, so that each Conv quantizes to one QLinearConv with no float BatchNorm after it."""
    graph = gs.import_onnx(resnet(blocks=(1, 1), width=64, image=56))
    return export(optimize(graph, "fold-batchnorm", latency=False).graph)


CASES: dict[str, Callable[[], onnx.ModelProto]] = {
    "conv3x3-64@56": lambda: conv(64, 64, 3, 56),
    "conv1x1-256>64@56": lambda: conv(256, 64, 1, 56),
    "conv1x1-64>256@56": lambda: conv(64, 256, 1, 56),
    "conv3x3-128@28": lambda: conv(128, 128, 3, 28),
    "conv3x3-256@14": lambda: conv(256, 256, 3, 14),
    "conv3x3-512@7": lambda: conv(512, 512, 3, 7),
    "matmul-1x1024x1024": lambda: matmul([1], 1024, 1024),
    "matmul-4x64x1024x1024": lambda: matmul([4, 64], 1024, 1024),
    "resnet": resnet_folded,
}


def quantized(model: onnx.ModelProto, fmt: str, folder: Path) -> onnx.ModelProto:
    from onnxruntime import quantization as q

    source, target = folder / "float.onnx", folder / f"{fmt}.onnx"
    onnx.save(model, source)
    feeds = [_feeds(model, seed) for seed in range(CALIBRATION_SAMPLES)]

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self.batches = iter(feeds)

        def get_next(self):
            return next(self.batches, None)

    q.quantize_static(str(source), str(target), Reader(), quant_format=getattr(q.QuantFormat, fmt),
                      per_channel=True, op_types_to_quantize=["Conv", "MatMul"],
                      activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8)
    return onnx.load(target)


def _feeds(model: onnx.ModelProto, seed: int = 1234) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = {t.name for t in model.graph.initializer}
    return {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
            for i in model.graph.input if i.name not in weights}


def ort_runner(model: onnx.ModelProto, feeds: dict, repeat: int, threads: int):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for _ in range(10):
        session.run(None, feeds)

    return session, lambda: ort_median_ms(session, feeds, repeat)


def bench_case(name: str, work: Path, repeat: int, rounds: int, threads: int) -> dict:
    model = CASES[name]()
    folder = work / name
    folder.mkdir()
    qoperator, qdq = quantized(model, "QOperator", folder), quantized(model, "QDQ", folder)
    feeds = _feeds(model)
    start = time.perf_counter()
    built = codegen.compile(qoperator, TARGET, folder / "int8")
    int8 = codegen.load(built.library)
    build_s = time.perf_counter() - start
    fp32 = codegen.load(codegen.compile(model, TARGET, folder / "fp32").library)
    session, ort_qoperator = ort_runner(qoperator, feeds, repeat, threads)
    reference = session.run(None, feeds)[0]
    error = float(np.abs(int8.run(feeds)[model.graph.output[0].name] - reference).max())
    step = _last_output_step(qoperator)
    bound = MAX_STEPS * step * 1.001 if step else MAX_RELATIVE_ERROR * float(np.abs(reference).max())
    if error > bound:
        raise SystemExit(f"{name}: TVM int8 differs from onnxruntime by {error} (bound {bound})")
    runners = {"tvm_int8": lambda: int8.benchmark(feeds, repeat), "tvm_fp32": lambda: fp32.benchmark(feeds, repeat),
               "ort_fp32": ort_runner(model, feeds, repeat, threads)[1], "ort_qoperator": ort_qoperator,
               "ort_qdq": ort_runner(qdq, feeds, repeat, threads)[1]}
    per_round: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for key, run in runners.items():
            per_round[key].append(run())
    return {"case": name, "max_abs_error_vs_ort_qoperator": error, "output_step": step,
            "tvm_int8_build_s": round(build_s, 2),
            "tvm_int8_instruction": built.manifest["libraries"][built.library.name]["int8_instruction"],
            **{k: {"ms": min(v), "rounds_ms": [round(m, 4) for m in v]} for k, v in per_round.items()}}


def _last_output_step(model: onnx.ModelProto) -> float:
    """The scale of the DequantizeLinear producing the graph output (one int8 step of it); 0 when
    the output is computed in float."""
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = next(n for n in model.graph.node if model.graph.output[0].name in n.output)
    if producer.op_type != "DequantizeLinear":
        return 0.0
    return float(weights[producer.input[1]].max())


def table(rows: list[dict]) -> str:
    columns = ["tvm_int8", "tvm_fp32", "ort_fp32", "ort_qoperator", "ort_qdq"]
    head = (f"{'case':22}" + "".join(f"{c:>15}" for c in ["TVM int8", "TVM fp32", "ORT fp32", "ORT int8 QOp",
                                                         "ORT int8 QDQ"])
            + f"{'fp32/int8':>11}{'ORTq/int8':>11}")
    lines = [head, "-" * len(head)]
    for r in rows:
        best_ort_int8 = min(r["ort_qoperator"]["ms"], r["ort_qdq"]["ms"])
        lines.append(f"{r['case']:22}" + "".join(f"{r[c]['ms']:13.3f}ms" for c in columns)
                     + f"{r['tvm_fp32']['ms'] / r['tvm_int8']['ms']:10.2f}x"
                     + f"{best_ort_int8 / r['tvm_int8']['ms']:10.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from: {', '.join(CASES)}")
    parser.add_argument("--repeat", type=int, default=100, help="timed runs per median (default 100)")
    parser.add_argument("--rounds", type=int, default=5, help="medians per runtime; the best is shown (default 5)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="threads for TVM and onnxruntime alike (default: every CPU this process may use)")
    parser.add_argument("--quick", action="store_true", help="10 runs, 1 round: a smoke test, not a measurement")
    args = parser.parse_args(argv)
    chosen = args.cases.split(",")
    unknown = sorted(set(chosen) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    repeat, rounds = (10, 1) if args.quick else (args.repeat, args.rounds)
    # Read when TVM's thread pool starts, at the first library loaded.
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for name in chosen:
            rows.append(bench_case(name, Path(tmp), repeat, rounds, args.threads))
            print(f"  {name}: done", file=sys.stderr, flush=True)
    print(table(rows))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"target": TARGET, "threads": args.threads, "repeat": repeat, "rounds": rounds,
                                   "quick": args.quick,
                                   "machine": machine(), "results": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
