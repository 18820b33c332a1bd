"""canonicalize keeps every ONNX backend node test case that onnxruntime passes, passing.

The onnx package ships ~1,900 single-node test cases with inputs and expected outputs. For each
case onnxruntime itself passes (graph optimisations off), the model goes through graphopt's
loader and the `canonicalize` pipeline with verification on, and the optimized model must still
load in onnxruntime and match the expected outputs at the tolerance onnx's backend tests use.
The loader may refuse a model, but only with a ModelError, whose reason is collected.

The cases run in one aggregated test (not 1,900 parametrized ones) so that the summary stays
readable; the counts are printed (`pytest -s`) and written to bench/results/conformance.json.
"""
from __future__ import annotations

import json
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnx.backend.test.loader import load_model_tests
from onnx.backend.test.runner import Runner

from graphopt.ir import io, ort
from graphopt.ir.errors import GraphoptError, ModelError
from graphopt.passes.manager import PassManager
from graphopt.passes.pipeline import Pipeline

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "conformance.json"
# A harness that skips nearly everything must not pass silently: onnxruntime 1.18+ passes most cases.
MIN_PASSED = 1000

DataSet = tuple[list[np.ndarray], list[np.ndarray]]


@dataclass
class Tally:
    total: int = 0
    skipped_non_tensor: int = 0
    skipped_ort_fails: int = 0
    rejected: int = 0
    passed: int = 0
    failed: int = 0
    seconds: float = 0.0
    rejections: dict[str, str] = field(default_factory=dict)  # case -> ModelError message
    failures: dict[str, str] = field(default_factory=dict)  # case -> what went wrong

    def counts(self) -> dict[str, int | float]:
        return {k: v for k, v in asdict(self).items() if not isinstance(v, dict)}


class CaseFailed(Exception):
    """The optimized model broke a case that the original passes."""


def _is_tensor_model(model: onnx.ModelProto) -> bool:
    return all(v.type.HasField("tensor_type") for v in (*model.graph.input, *model.graph.output))


def _data_sets(case) -> list[DataSet] | None:
    """The case's inputs and expected outputs as arrays, or None when some are not plain tensors."""
    if case.model_dir is not None:  # onnx < 1.19 ships the cases as files
        return [_read_data_set(d) for d in sorted(Path(case.model_dir).glob("test_data_set_*"))]
    sets = []
    for inputs, outputs in case.data_sets:
        items = [numpy_helper.to_array(x) if isinstance(x, onnx.TensorProto) else x for x in (*inputs, *outputs)]
        if not all(isinstance(x, np.ndarray) for x in items):
            return None  # sequences, optionals or maps
        sets.append((items[:len(inputs)], items[len(inputs):]))
    return sets


def _read_data_set(folder: Path) -> DataSet:
    def read(kind: str) -> list[np.ndarray]:
        files = sorted(folder.glob(f"{kind}_*.pb"), key=lambda p: int(p.stem.split("_")[1]))
        return [numpy_helper.to_array(onnx.load_tensor(str(f))) for f in files]
    return read("input"), read("output")


def _load_case(case) -> tuple[onnx.ModelProto, list[DataSet]] | None:
    model = onnx.load(str(Path(case.model_dir) / "model.onnx")) if case.model_dir else case.model
    if not _is_tensor_model(model):
        return None
    sets = _data_sets(case)
    return (model, sets) if sets is not None else None


def _feeds(model: onnx.ModelProto, sets: list[DataSet]) -> list[tuple[dict[str, np.ndarray], list[np.ndarray]]]:
    """Inputs by name: the data sets list values for the graph inputs that are not initializers, in order."""
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    return [(dict(zip(names, inputs)), expected) for inputs, expected in sets]


def _mismatch(model, feeds, case) -> str | None:
    """Why `model` does not reproduce the expected outputs in onnxruntime, or None if it does."""
    session = ort.session(model, threads=1)
    for inputs, expected in feeds:
        got = ort.run(session, inputs)
        try:
            Runner.assert_similar_outputs(expected, list(got.values()), rtol=case.rtol, atol=case.atol)
        except AssertionError as e:
            return " ".join(str(e).split())[:300]
    return None


def _canonicalize(model: onnx.ModelProto, folder: Path):
    path = folder / "model.onnx"
    onnx.save_model(model, str(path))
    graph = io.load(path)
    PassManager(Pipeline.parse("canonicalize"), verify=True).run(graph)
    return graph


def _run_case(case, folder: Path, tally: Tally) -> None:
    loaded = _load_case(case)
    if loaded is None:
        tally.skipped_non_tensor += 1
        return
    model, sets = loaded
    feeds = _feeds(model, sets)
    try:
        if _mismatch(model, feeds, case):
            tally.skipped_ort_fails += 1
            return
    except GraphoptError:
        tally.skipped_ort_fails += 1
        return
    try:
        graph = _canonicalize(model, folder)
    except ModelError as e:
        tally.rejected += 1
        tally.rejections[case.name] = e.what
        return
    except Exception as e:  # noqa: BLE001 - any other exception is a bug we want named
        tally.failed += 1
        tally.failures[case.name] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        return
    try:
        why = _mismatch(graph, feeds, case)
    except GraphoptError as e:
        why = str(e)
    if why:
        tally.failed += 1
        tally.failures[case.name] = f"optimized model: {why}"
    else:
        tally.passed += 1


def _cases() -> Iterator:
    yield from sorted(load_model_tests(kind="node"), key=lambda c: c.name)


def run_suite() -> Tally:
    tally = Tally()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for case in _cases():
            tally.total += 1
            _run_case(case, Path(tmp), tally)
    tally.seconds = round(time.perf_counter() - start, 1)
    return tally


def _report(tally: Tally) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    reasons = Counter(tally.rejections.values())
    RESULTS.write_text(json.dumps({**tally.counts(), "rejection_reasons": dict(reasons.most_common()),
                                   "rejections": tally.rejections, "failures": tally.failures}, indent=1))
    print("\nONNX node suite through canonicalize:", json.dumps(tally.counts()))
    for why, n in reasons.most_common():
        print(f"  rejected x{n}: {why}")
    for name, why in tally.failures.items():
        print(f"  FAILED {name}: {why}")


@pytest.fixture(scope="module")
def tally() -> Tally:
    result = run_suite()
    _report(result)
    return result


def test_canonicalize_keeps_node_suite_passing(tally: Tally) -> None:
    assert not tally.failures, f"{tally.failed} cases broken: {sorted(tally.failures)}"


def test_suite_actually_ran(tally: Tally) -> None:
    assert tally.passed >= MIN_PASSED, tally.counts()
