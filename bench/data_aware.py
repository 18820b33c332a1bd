"""Benchmark: data-aware compression (issue 14): accuracy on held-out labels of graphopt's old
weights-only defaults, its new defaults with --data, onnxsim 0.8.1 and onnxruntime.

    python bench/data_aware.py                          # both CNNs, every row, the BERT section
    python bench/data_aware.py --models digits --rows prune-n-m --no-bert
    python bench/data_aware.py --no-onnxsim --threads 2 --repeat 200

Models: models/digits_cnn.onnx (sklearn digits) and models/mnist1d_cnn.onnx (MNIST-1D,
models/make_mnist1d_cnn.py), each with its calibration npz and its labelled test npz. Every
graphopt cell is `graphopt.optimize(model, "canonicalize,<spec>", data=<calibration npz>,
latency=False, min_cosine=-1.0)` (min_cosine=-1 lowers the passes' own LOSSY bounds, so every
result is seen), then top-1 accuracy on the test set in onnxruntime (graph optimisations on, as
deployed). Old default: the pass with its weights-only method (magnitude, l1, weights, nearest
rounding) and uniform allocation, as it ran before issue 14; new default: the pass with no method
given, which chooses the data-aware one because the data is the user's. optimize() calibrates on
half of the npz (held aside: the other half, for its gate); onnxsim and onnxruntime's
quantize_static get that same half, from the same model with BatchNorms folded (canonicalize).
A row whose option a pass does not take yet reads "n/a (option missing)".

prune-channels by MACs: the smallest ratio (in steps of 0.01) that removes at least that fraction
of the model's MACs, from the report's before/after MACs; the cells show the MACs ratio reached.
factorize-svd: ratio=0.5 of the Gemm parameters; cells show the Gemm parameters kept.

onnxsim 0.8.1 is never a graphopt dependency. It runs in its own venv, in a subprocess:

    python3 -m venv /tmp/simvenv && /tmp/simvenv/bin/pip install onnxsim==0.8.1 onnxruntime

(--simvenv for another place; without it the column says why it is empty). Its equivalents:
apply_sparsegpt_pruning (unstructured and n=2, m=4), apply_structured_wanda_pruning (channels:
its `sparsity` is the fraction of channels of each chain it matches; for a MACs target the
smallest of 0.05, 0.10, ... reaching it), quantize_static (QDQ int8), quantize_weight_only_int4
then apply_gptq (block-32 int4 at opset 21: only layers whose K is a multiple of 32; GPTQ only on
Gemm/MatMul), quantize_dynamic; it has no low-rank factorization. Calibration goes to it in
batches of 32 samples.

BERT section: the pretrained g2p-id-bert encoder (tests/corpus), calibrated on 64 corpus samples
(32 after optimize's split; onnxruntime's and onnxsim's static int8 get those 32), measured on
64 others: output cosine against fp32 and onnxruntime
latency, every model timed in turn in this one process (bench/timing.py), speed-up against the
fp32 model after canonicalize (the same start every quantizer gets). Prints the tables and writes
bench/results/data_aware.json and bench/results/data_aware.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "corpus"))
import corpus_lib
from timing import interleaved_ms, machine  # bench/ is on sys.path when run as a script

import graphopt
from graphopt.ir import fidelity, ort
from graphopt.ir.data import hold_aside, input_specs, load_data
from graphopt.ir.errors import PipelineError
from graphopt.ir.graph import infer_shapes
from graphopt.optimize import DATA_SAMPLES
from graphopt.passes.pipeline import Pipeline
from graphopt.report import summarize

RESULTS = ROOT / "bench" / "results"
SIMVENV = Path("/tmp/simvenv")
CNNS = {"digits": "models/digits_cnn.onnx", "mnist1d": "models/mnist1d_cnn.onnx"}
SIM_BATCH = 32        # samples per calibration batch handed to onnxsim and onnxruntime
SIM_CHANNEL_GRID = [round(0.05 * i, 2) for i in range(1, 20)]
BERT_ID, BERT_CALIB_SEEDS, BERT_HELD_SEEDS = "g2p-id-bert", range(16), range(100, 116)
BERT_GRAPHOPT = {"graphopt old: quantize(rounding=nearest)": "quantize(rounding=nearest)",
                 "graphopt new: quantize": "quantize", "graphopt: quantize(mode=dynamic)": "quantize(mode=dynamic)"}


@dataclass(frozen=True)
class Row:
    key: str
    old: str                      # the pass's weights-only default (before issue 14)
    new: str                      # the pass's own choice with the user's data
    target: str
    max_drop: float | None        # points below fp32 the new default may lose; None: no bound
    sim: list | None = None       # onnxsim steps: [function, kwargs, how it takes the data]
    sim_missing: str = ""         # why onnxsim has no equivalent
    macs_removed: float | None = None   # prune-channels: search the ratio removing this much
    references: bool = False      # int8: must also match onnxruntime's and onnxsim's static int8


def _sparsegpt(**kw) -> list:
    return [["apply_sparsegpt_pruning", kw, "calibrated"]]


def _channels(sparsity: float) -> list:
    return [["apply_structured_wanda_pruning", {"sparsity": sparsity}, "calibrated"]]


ROWS = [
    Row("prune-magnitude 0.5", "prune-magnitude(sparsity=0.5, method=magnitude, allocation=uniform)",
        "prune-magnitude(sparsity=0.5)", "<= 0.3 pt", 0.3, _sparsegpt(sparsity=0.5)),
    Row("prune-magnitude 0.8", "prune-magnitude(sparsity=0.8, method=magnitude, allocation=uniform)",
        "prune-magnitude(sparsity=0.8)", "<= 2 pt", 2.0, _sparsegpt(sparsity=0.8)),
    Row("prune-n-m 2:4", "prune-n-m(method=magnitude)", "prune-n-m", "<= 0.5 pt", 0.5, _sparsegpt(n=2, m=4)),
    Row("prune-channels 30% MACs", "prune-channels(ratio={ratio}, method=l1)", "prune-channels(ratio={ratio})",
        "<= 1 pt", 1.0, macs_removed=0.3),
    Row("prune-channels 50% MACs", "prune-channels(ratio={ratio}, method=l1)", "prune-channels(ratio={ratio})",
        "<= 2 pt", 2.0, macs_removed=0.5),
    Row("prune-channels ratio=0.3", "prune-channels(ratio=0.3, method=l1)", "prune-channels(ratio=0.3)",
        "<= 1 pt (acceptance 11)", 1.0, _channels(0.3)),
    Row("prune-channels ratio=0.5", "prune-channels(ratio=0.5, method=l1)", "prune-channels(ratio=0.5)",
        "-", None, _channels(0.5)),
    Row("factorize-svd 0.5x Gemm params", "factorize-svd(ratio=0.5, method=weights, allocation=uniform)",
        "factorize-svd(ratio=0.5)", "<= 1 pt", 1.0, sim_missing="no low-rank factorization"),
    Row("quantize int8", "quantize(rounding=nearest)", "quantize", ">= ORT and onnxsim static int8", None,
        [["quantize_static", {}, "calibrated"]], references=True),
    Row("quantize int4 weights (GPTQ)", "quantize(weight_bits=4, rounding=nearest)", "quantize(weight_bits=4)",
        "<= 1 pt", 1.0, [["quantize_weight_only_int4", {}, "plain"], ["apply_gptq", {}, "refine"]]),
]

# Runs in onnxsim's venv (numpy, onnx, onnxsim, onnxruntime; no graphopt): each job's steps on
# its model with the calibration batches, the result saved; per job "ok" or the error, as JSON.
WORKER = r'''
import json, sys, time, traceback
import numpy as np, onnx, onnxsim
from onnx import version_converter
jobs, status = json.load(open(sys.argv[1])), {}
for job in jobs:
    start = time.perf_counter()
    try:
        model = onnx.load(job["model"])
        if job["opset"]:
            model = version_converter.convert_version(model, job["opset"])
        x = dict(np.load(job["calibration"]))
        n = len(next(iter(x.values())))
        batches = [{k: v[i:i + job["batch"]] for k, v in x.items()} for i in range(0, n, job["batch"])]
        float_model, out = model, model
        for fn, kwargs, how in job["steps"]:
            f = getattr(onnxsim, fn)
            out = (f(out, calibration_data=batches, **kwargs) if how == "calibrated" else
                   f(float_model, out, calibration_data=batches, **kwargs) if how == "refine" else f(out, **kwargs))
        onnx.save(out, job["out"])
        status[job["id"]] = {"ok": True, "seconds": round(time.perf_counter() - start, 2)}
    except Exception as e:
        status[job["id"]] = {"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
json.dump(status, open(sys.argv[2], "w"))
'''


@dataclass
class Case:
    """A model, its calibration and test data, and the common start of onnxsim and onnxruntime."""
    name: str
    path: Path
    calib: Path
    test: dict[str, np.ndarray]
    work: Path
    folded: Path = field(init=False)
    half: Path = field(init=False)     # the calibration half optimize() uses
    fp32: float = field(init=False)
    macs: int = field(init=False)
    gemm_params: int = field(init=False)

    def __post_init__(self) -> None:
        folded = graphopt.optimize(str(self.path), "canonicalize", latency=False).graph
        self.folded = self.work / f"{self.name}.folded.onnx"
        graphopt.save(folded, self.folded)
        self.half = self.work / f"{self.name}.calibration.npz"
        np.savez(self.half, **calibration_half(self.path, self.calib))
        self.fp32 = top1(self.path, self.test)
        self.macs = macs(self.folded, self.test)
        graph = onnx.load(self.folded).graph  # Gemm weights: what factorize-svd's ratio counts
        weights = {t.name: int(np.prod(t.dims)) for t in graph.initializer}
        self.gemm_params = sum(weights.get(n.input[1], 0) for n in graph.node if n.op_type in ("Gemm", "MatMul"))

    def sim_out(self, key: str) -> Path:
        return self.work / f"{self.name}.sim.{key}.onnx"


def calibration_half(model: Path, data) -> dict[str, np.ndarray]:
    """The samples optimize() calibrates on (graphopt.ir.data.hold_aside at its seed 0)."""
    specs = input_specs(graphopt.load(str(model)))
    feeds = load_data(data, specs, limit=DATA_SAMPLES)[0] if isinstance(data, Path) else data
    return hold_aside(feeds, specs, None, seed=0).calibration


def batches(npz: Path) -> list[dict[str, np.ndarray]]:
    x = dict(np.load(npz))
    n = len(next(iter(x.values())))
    return [{k: v[i:i + SIM_BATCH] for k, v in x.items()} for i in range(0, n, SIM_BATCH)]


def top1(model, test: dict[str, np.ndarray]) -> float:
    out = next(iter(ort.run(model, {"x": test["x"]}, optimize=True).values()))
    return float(np.mean(out.argmax(axis=1) == test["y"]))


def macs(model, test: dict[str, np.ndarray]) -> int:
    graph = graphopt.load(str(model)) if isinstance(model, (str, Path)) else model
    return summarize(infer_shapes(graph), shapes={"x": (1, *test["x"].shape[1:])})["macs"]


def run_graphopt(model: Path, spec: str, data) -> tuple[graphopt.Optimized | None, str]:
    """optimize(model, "canonicalize,spec", data), or None and why: an option the pass does not
    take (yet), or a failure."""
    passes = f"canonicalize,{spec}"
    try:
        Pipeline.parse(passes)
    except PipelineError as e:
        return None, f"n/a (option missing: {e})"
    try:
        return graphopt.optimize(str(model), passes=passes, data=data, latency=False, min_cosine=-1.0), ""
    except Exception as e:  # noqa: BLE001 - every failure is a cell of the table
        return None, f"failed: {_first_line(e)}"


def ort_quantize(folded: Path, out: Path, half: Path | None) -> str:
    """onnxruntime's quantize_static calibrated on `half` (QDQ, per-channel int8 weights, its
    default int8 activations), or its quantize_dynamic without; '' or why it failed."""
    from onnxruntime import quantization as q

    feeds = iter(batches(half) if half else [])

    class Reader(q.CalibrationDataReader):
        def get_next(self):
            return next(feeds, None)

    try:
        if half is None:
            q.quantize_dynamic(str(folded), str(out), weight_type=q.QuantType.QInt8)
        else:
            q.quantize_static(str(folded), str(out), Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True)
    except Exception as e:  # noqa: BLE001
        return f"failed: {_first_line(e)}"
    return ""


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:300]


def graphopt_cell(case: Case, spec: str) -> dict:
    """Accuracy of `canonicalize,spec` on the test set, or why there is none."""
    start = time.perf_counter()
    result, why = run_graphopt(case.path, spec, case.calib)
    if result is None:
        return {"spec": spec, "why": why}
    before, after = result.report["before"], result.report["after"]
    removed = before["params"] - after["params"]
    return {"spec": spec, "accuracy": top1(result.graph, case.test), "seconds": round(time.perf_counter() - start, 1),
            "macs_ratio": round(after["macs"] / before["macs"], 4), "sparsity": after["sparsity"],
            "gemm_params_ratio": round(1 - removed / case.gemm_params, 4)}


def channel_ratio(case: Case, removed: float) -> float | None:
    """The smallest ratio (hundredths) at which l1 channel pruning removes `removed` of the MACs;
    uniform allocation removes the same channel counts whatever the method."""
    def removes(k: int) -> bool:
        cell = graphopt_cell(case, f"prune-channels(ratio={k / 100}, method=l1)")
        return "accuracy" in cell and 1 - cell["macs_ratio"] >= removed
    lo, hi = 1, 95
    if not removes(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if removes(mid) else (mid + 1, hi)
    return lo / 100


def run_onnxsim(jobs: list[dict], simvenv: Path | None, work: Path) -> dict[str, dict]:
    """Each job in onnxsim's venv; {job id: status}, or a status for all saying why none ran."""
    python = simvenv / "bin" / "python" if simvenv else None
    if python is None or not python.exists():
        why = ("n/a (--no-onnxsim)" if simvenv is None else f"n/a (no venv at {simvenv}: python3 -m venv {simvenv} "
               f"&& {simvenv}/bin/pip install onnxsim==0.8.1 onnxruntime)")
        return {j["id"]: {"ok": False, "error": why} for j in jobs}
    spec, status = work / "sim_jobs.json", work / "sim_status.json"
    spec.write_text(json.dumps(jobs))
    status.unlink(missing_ok=True)
    done = subprocess.run([str(python), "-c", WORKER, str(spec), str(status)], capture_output=True, text=True,
                          timeout=3600, check=False)
    if not status.exists():
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {j["id"]: {"ok": False, "error": f"failed: onnxsim worker: {tail}"} for j in jobs}
    return json.loads(status.read_text())


def sim_job(key: str, model: Path, half: Path, out: Path, steps: list) -> dict:
    int4 = any(s[0] == "quantize_weight_only_int4" for s in steps)   # INT4 tensors need opset 21
    return {"id": key, "model": str(model), "calibration": str(half), "batch": SIM_BATCH, "out": str(out),
            "opset": 21 if int4 else None, "steps": steps}


def sim_jobs(case: Case, rows: list[Row]) -> list[dict]:
    keys = {r.key: r.sim for r in rows if r.sim}
    if any(r.macs_removed for r in rows):
        keys.update({f"channels {s}": _channels(s) for s in SIM_CHANNEL_GRID})
    return [sim_job(k, case.folded, case.half, case.sim_out(k), steps) for k, steps in keys.items()]


def sim_cell(case: Case, row: Row, status: dict[str, dict]) -> dict:
    if row.sim_missing:
        return {"why": f"n/a ({row.sim_missing})"}
    key = row.key
    if row.macs_removed:
        reached = [s for s in SIM_CHANNEL_GRID if 1 - _sim_macs_ratio(case, f"channels {s}", status) >= row.macs_removed]
        if not reached:
            first = next(iter(status.values()), {})
            return {"why": first.get("error") or f"n/a (no sparsity up to {SIM_CHANNEL_GRID[-1]} removes this much)"}
        key = f"channels {reached[0]}"
    got = status.get(key, {"ok": False, "error": "not run"})
    if not got["ok"]:
        return {"why": got["error"]}
    cell = {"accuracy": top1(case.sim_out(key), case.test), "seconds": got["seconds"]}
    if row.key.startswith("prune-channels"):
        cell.update(macs_ratio=_sim_macs_ratio(case, key, status), sparsity_option=float(key.split()[-1])
                    if row.macs_removed else None)
    return cell


def _sim_macs_ratio(case: Case, key: str, status: dict[str, dict]) -> float:
    if not status.get(key, {}).get("ok"):
        return 1.0
    return round(macs(case.sim_out(key), case.test) / case.macs, 4)


def bench_case(case: Case, rows: list[Row], simvenv: Path | None) -> list[dict]:
    status = run_onnxsim(sim_jobs(case, rows), simvenv, case.work)
    results = []
    for row in rows:
        ratio = channel_ratio(case, row.macs_removed) if row.macs_removed else None
        if row.macs_removed and ratio is None:
            old = new = {"why": "n/a (no ratio removes this much)"}
        else:
            old, new = (graphopt_cell(case, spec.format(ratio=ratio)) for spec in (row.old, row.new))
        sim, ref = sim_cell(case, row, status), None
        if row.references:
            out = case.work / f"{case.name}.ort_static.onnx"
            why = ort_quantize(case.folded, out, case.half)
            ref = {"why": why} if why else {"accuracy": top1(out, case.test)}
        results.append({"row": row.key, "target": row.target, "old": old, "new": new, "onnxsim": sim,
                        "onnxruntime": ref, "met": target_met(case, row, new, sim, ref), "ratio": ratio})
        print(f"  {case.name:8s} {row.key:30s} old {_cell(old, case.fp32):22.22s} new {_cell(new, case.fp32):22.22s} "
              f"onnxsim {_cell(sim, case.fp32)}", flush=True)
    return results


def target_met(case: Case, row: Row, new: dict, sim: dict, ref: dict | None) -> bool | None:
    if "accuracy" not in new:
        return None
    if row.references:
        return all(new["accuracy"] >= c["accuracy"] for c in (sim, ref) if c and "accuracy" in c)
    if row.max_drop is None:
        return None
    return 100 * (case.fp32 - new["accuracy"]) <= row.max_drop + 1e-9


def bench_bert(simvenv: Path | None, work: Path, threads: int, repeat: int, sizes: list[int]) -> dict:
    model = corpus_lib.by_id(BERT_ID)
    try:
        path = corpus_lib.fetch(model)
    except corpus_lib.Unavailable as e:
        return {"unavailable": str(e)}
    def stack(seeds: range) -> dict[str, np.ndarray]:
        return {k: np.concatenate([corpus_lib.samples(model, s)[k] for s in seeds]) for k in corpus_lib.samples(model)}
    data, held = stack(BERT_CALIB_SEEDS), stack(BERT_HELD_SEEDS)
    folded, half = work / "bert.folded.onnx", work / "bert.calibration.npz"
    graphopt.save(graphopt.optimize(str(path), "canonicalize", latency=False).graph, folded)
    np.savez(half, **calibration_half(path, data))
    rows: dict[str, dict] = {"fp32 (canonicalize)": {"path": folded}}
    for label, spec in BERT_GRAPHOPT.items():
        result, why = run_graphopt(path, spec, data)
        if result is not None:
            graphopt.save(result.graph, work / f"bert.{len(rows)}.onnx")
        rows[label] = {"why": why} if result is None else {"path": work / f"bert.{len(rows)}.onnx"}
    for label, calibrated in [("onnxruntime quantize_dynamic", None), ("onnxruntime quantize_static", half)]:
        out = work / f"bert.{len(rows)}.onnx"
        why = ort_quantize(folded, out, calibrated)
        rows[label] = {"why": why} if why else {"path": out}
    jobs = [sim_job(f"onnxsim {fn}", folded, half, work / f"bert.sim.{fn}.onnx", [[fn, {}, how]])
            for fn, how in [("quantize_dynamic", "plain"), ("quantize_static", "calibrated")]]
    for job, got in zip(jobs, (run_onnxsim(jobs, simvenv, work)[j["id"]] for j in jobs)):
        rows[job["id"]] = {"path": Path(job["out"])} if got["ok"] else {"why": got["error"]}
    reference = ort.run(folded, held)
    for row in rows.values():
        if "path" in row:
            out = ort.run(row["path"], held, optimize=True)
            row["cosine"] = min(fidelity.measure(reference[k], out[k]).cosine for k in reference)
    runnable = {k: graphopt.load(str(v["path"])) for k, v in rows.items() if "path" in v}
    for b in sizes:
        times = {k: float(np.median(v)) for k, v in
                 interleaved_ms(runnable, {k: v[:b] for k, v in held.items()}, repeat, threads).items()}
        for k, ms in times.items():
            rows[k].update({f"ms_b{b}": round(ms, 4), f"speedup_b{b}": round(times["fp32 (canonicalize)"] / ms, 3)})
    for label, row in rows.items():
        row.pop("path", None)   # a temporary file
        if label in BERT_GRAPHOPT and "cosine" in row:
            row["met"] = row["cosine"] >= 0.99 and all(row[f"speedup_b{b}"] >= 1.5 for b in sizes)
    return {"model": BERT_ID, "calibration_samples": len(np.load(half)["input_1"]), "batches": sizes,
            "held_samples": len(held["input_1"]), "threads": threads, "repeat": repeat, "rows": rows}


def _cell(cell: dict | None, fp32: float) -> str:
    if cell is None:
        return ""
    if "accuracy" not in cell:
        return cell["why"][:160]
    text = f"{100 * cell['accuracy']:.2f} ({100 * (cell['accuracy'] - fp32):+.2f})"
    if cell.get("macs_ratio") is not None and cell["macs_ratio"] < 1:
        text += f" MACs x{cell['macs_ratio']:.2f}"
    if cell.get("sparsity_option") is not None:
        text += f" at sparsity={cell['sparsity_option']}"
    return text


def markdown(cases: dict[str, dict], bert: dict | None, meta: dict, rows: list[Row]) -> str:
    m = meta["machine"]
    lines = ["# Data-aware compression (issue 14)\n", (f"`{meta['command']}` on {m['cpu']} ({m['logical_cpus']} logical "
                                                        f"CPUs), onnxruntime {m['onnxruntime']}, onnxsim {meta['onnxsim']}.\n")]
    for name, case in cases.items():
        lines += _cnn_table(name, case)
    lines.append("Cells: top-1 % on the test set (points against fp32); MACs ratio after/before where channels go. "
                 "Specs (after `canonicalize,`; {ratio}: the searched ratio):\n")
    lines += [f"- {r.key}: old `{r.old}`, new `{r.new}`" for r in rows] + [""]
    if bert and "rows" in bert:
        lines += _bert_table(bert)
    elif bert:
        lines.append(f"## {BERT_ID}: unavailable: {bert['unavailable']}")
    return "\n".join(lines) + "\n"


def _cnn_table(name: str, case: dict) -> list[str]:
    fp32 = case["fp32"]
    lines = [(f"## {name}: fp32 top-1 {100 * fp32:.2f}% on {case['test_samples']} test samples, "
              f"calibration {case['calibration_samples']} samples\n"),
             "| row | target | old default | new default (--data) | onnxsim 0.8.1 | onnxruntime | met |",
             "|---|---|---|---|---|---|---|"]
    for r in case["rows"]:
        extra = f" (ratio {r['ratio']})" if r["ratio"] else ""
        if r["row"].startswith("factorize") and "accuracy" in r["new"]:
            extra = f" (Gemm params x{r['new']['gemm_params_ratio']:.2f})"
        met = {True: "yes", False: "NO", None: "-"}[r["met"]]
        lines.append(f"| {r['row']}{extra} | {r['target']} | {_cell(r['old'], fp32)} | {_cell(r['new'], fp32)} | "
                     f"{_cell(r['onnxsim'], fp32)} | {_cell(r['onnxruntime'], fp32)} | {met} |")
    return lines + [""]


def _bert_table(bert: dict) -> list[str]:
    sizes = bert["batches"]
    cols = [f"ms b={b}" for b in sizes] + [f"speed-up b={b}" for b in sizes]
    lines = [f"## {bert['model']} int8 (targets: cosine >= 0.99, speed-up >= 1.5x)\n",
             (f"Calibration {bert['calibration_samples']} samples, cosine on {bert['held_samples']} held-out samples; "
              f"onnxruntime on {bert['threads']} thread(s), median of {bert['repeat']} interleaved runs; speed-up "
              f"against fp32 after canonicalize.\n"),
             "| model | cosine vs fp32 | " + " | ".join(cols) + " | met |", "|---|---|" + "---|" * (len(cols) + 1)]
    for label, e in bert["rows"].items():
        if "cosine" not in e:
            lines.append(f"| {label} | {e['why'][:160]} |" + " |" * (len(cols) + 1))
            continue
        cells = [f"{e[f'ms_b{b}']:.3f}" for b in sizes] + [f"{e[f'speedup_b{b}']:.2f}x" for b in sizes]
        met = {True: "yes", False: "NO"}.get(e.get("met"), "-")
        lines.append(f"| {label} | {e['cosine']:.4f} | " + " | ".join(cells) + f" | {met} |")
    return lines


def _onnxsim_version(simvenv: Path | None) -> str:
    python = simvenv / "bin" / "python" if simvenv else None
    if not python or not python.exists():
        return "absent"
    done = subprocess.run([str(python), "-c", "import onnxsim; print(onnxsim.__version__)"], capture_output=True,
                          text=True, check=False)
    return done.stdout.strip() or "not importable"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", choices=list(CNNS), default=list(CNNS))
    parser.add_argument("--rows", nargs="*", help="rows whose name starts with one of these (default: all)")
    parser.add_argument("--simvenv", type=Path, default=SIMVENV, help=f"onnxsim 0.8.1's venv (default {SIMVENV})")
    parser.add_argument("--no-onnxsim", action="store_true", help="leave out the onnxsim column")
    parser.add_argument("--no-bert", action="store_true", help=f"leave out the {BERT_ID} int8 section")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads for the BERT timing (default 1)")
    parser.add_argument("--repeat", type=int, default=100, help="timed runs per model and batch (default 100)")
    parser.add_argument("--bert-batches", default="1,32", help="BERT batch sizes timed (default 1,32)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for data_aware.json and .md")
    args = parser.parse_args(argv)
    rows = [r for r in ROWS if not args.rows or any(r.key.startswith(p) for p in args.rows)]
    simvenv = None if args.no_onnxsim else args.simvenv
    cases = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            path = ROOT / CNNS[name]
            case = Case(name, path, path.with_name(f"{name}_calib.npz"), dict(np.load(path.with_name(f"{name}_test.npz"))),
                        Path(tmp))
            print(f"{name}: fp32 top-1 {100 * case.fp32:.2f}%", flush=True)
            cases[name] = {"fp32": case.fp32, "test_samples": len(case.test["y"]), "macs": case.macs,
                           "calibration_samples": len(np.load(case.half)["x"]), "rows": bench_case(case, rows, simvenv)}
        bert = None if args.no_bert else bench_bert(simvenv, Path(tmp), args.threads, args.repeat,
                                                    [int(b) for b in args.bert_batches.split(",")])
    meta = {"command": " ".join(["python", "bench/data_aware.py", *(argv if argv is not None else sys.argv[1:])]),
            "machine": machine(), "onnxsim": _onnxsim_version(simvenv)}
    text = markdown(cases, bert, meta, rows)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data_aware.json").write_text(json.dumps({**meta, "models": cases, "bert": bert}, indent=2) + "\n")
    (args.out / "data_aware.md").write_text(text)
    print(f"wrote {args.out / 'data_aware.json'} and data_aware.md")


if __name__ == "__main__":
    main()
