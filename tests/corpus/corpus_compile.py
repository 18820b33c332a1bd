"""Compile a corpus model with graphopt's codegen and compare the library with onnxruntime (issue
13: `compile` succeeds on every corpus model and agrees with onnxruntime on the corpus data).

Used by bench/corpus.py (the table's compile column) and by test_corpus.py (slow tests).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import corpus_lib
import numpy as np
import onnx
import onnxruntime

from graphopt import codegen

# The library agrees with onnxruntime when every output is within this fraction of its largest
# magnitude: kernels reassociate sums differently, by float32 rounding, or by about ten steps of
# float16's 2^-10 where the model computes in float16. A model may set its own (compile_atol,
# with the reason in the manifest).
AGREE_ATOL = {np.dtype(np.float16): 1e-2}
AGREE_ATOL_DEFAULT = 1e-3


def compile_and_compare(model: corpus_lib.Model, path: Path, feeds: dict[str, np.ndarray],
                        target: str = "x86") -> dict:
    """Compile the original model at one sample's shapes; run it and onnxruntime on that sample.
    {"status": agrees | differs | failed, "message", "seconds", "max_relative_error"}."""
    sample = one_sample(path, feeds)
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as out:
            built = codegen.compile(str(path), target, out, shapes={k: np.shape(v) for k, v in sample.items()})
            got = codegen.load(built.library).run(sample)
    except Exception as e:  # noqa: BLE001 - every failure is a cell of the table
        return {"status": "failed", "message": f"{type(e).__name__}: {e}".splitlines()[0],
                "seconds": round(time.perf_counter() - start, 1)}
    seconds = round(time.perf_counter() - start, 1)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    expected = dict(zip(names, session.run(None, sample)))
    errors = {k: relative_error(expected[k], got[k]) for k in names if k in got}
    agrees = len(errors) == len(names) and all(errors[k] <= _atol(model, expected[k]) for k in errors)
    return {"status": "agrees" if agrees else "differs", "seconds": seconds, "max_relative_error": errors,
            "message": "" if agrees else f"outputs {sorted(set(names) - set(got))} missing or off: {errors}"}


def _atol(model: corpus_lib.Model, expected: np.ndarray) -> float:
    own = AGREE_ATOL.get(np.asarray(expected).dtype, AGREE_ATOL_DEFAULT)
    return max(own, model.compile_atol)


def one_sample(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The first sample along each input's symbolic batch axis (libraries are static-shaped).
    Symbolic first dims of different sizes are no batch axis (a graph network's atoms, edges and
    residues): slicing them would feed edges of atoms that are not there, so the sample is whole."""
    graph = onnx.load(str(path), load_external_data=False).graph
    symbolic = {i.name for i in graph.input
                if i.type.tensor_type.shape.dim and not i.type.tensor_type.shape.dim[0].HasField("dim_value")}
    if len({v.shape[0] for k, v in feeds.items() if k in symbolic and v.ndim}) > 1:
        return feeds
    return {k: v[:1] if k in symbolic and v.ndim else v for k, v in feeds.items()}


def relative_error(expected: np.ndarray, got: np.ndarray) -> float:
    """Largest absolute difference over max(1, largest |expected|); inf when shapes differ."""
    if np.asarray(expected).dtype.kind in "OUS":  # strings: equal or not
        return 0.0 if np.array_equal(expected, got) else float("inf")
    expected, got = np.asarray(expected, np.float64), np.asarray(got, np.float64)
    if expected.shape != got.shape:
        return float("inf")
    scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
    return float(np.max(np.abs(expected - got))) / scale if expected.size else 0.0
