"""canonicalize keeps every ONNX backend node test case that onnxruntime passes, passing.

The onnx package ships ~1,900 single-node test cases with inputs and expected outputs. For each
case onnxruntime itself passes (graph optimisations off), the model goes through graphopt's
loader and the `canonicalize` pipeline with verification on; the optimized model must still load
in onnxruntime and match the expected outputs at the tolerance onnx's backend tests use. The
loader may refuse a model, but only with a ModelError, whose reason is collected. Cases that
onnxruntime cannot run still go through canonicalize, which may refuse them with a GraphoptError
but must never crash with another exception.

Two variants: the cases as given (inputs fed at run time, so canonicalize mostly has to leave the
graph alone), and with the inputs baked in as initializers, so that fold-constants evaluates
nearly every op in the suite at compile time.

Each variant is one aggregated test rather than 1,900 parametrized ones; the counts are printed
(`pytest -s`). The default suite runs every 4th case as given; `-m slow` runs the whole suite in
both variants and writes the counts to bench/results/conformance.json.
"""
from __future__ import annotations

import json
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper, numpy_helper
from onnx.backend.test.case.test_case import TestCase
from onnx.backend.test.loader import load_model_tests
from onnx.backend.test.runner import Runner

from graphopt.ir import io, ort
from graphopt.ir.errors import GraphoptError, ModelError, PassError
from graphopt.passes.manager import PassManager, PassRecord
from graphopt.passes.pipeline import Pipeline

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "conformance.json"
# A harness that skips nearly everything must not pass silently; onnxruntime passes ~1,400 cases.
MIN_PASSED = 1000
# Two float16 ULPs, as onnx's runner allows two ULPs for bfloat16: a folded node runs through a
# different onnxruntime kernel path (all inputs initializers), which may round differently.
FLOAT16_FOLDED_RTOL = 2 * 2.0**-10
# Default-domain opset imported for the added Identity nodes by models that import only ai.onnx.ml.
IDENTITY_OPSET = 13

Feeds = dict[str, np.ndarray]
DataSet = tuple[Feeds, list[np.ndarray]]  # inputs by name, expected outputs in graph order


@dataclass(frozen=True)
class Variant:
    name: str
    prepare: Callable[[onnx.ModelProto, DataSet], tuple[onnx.ModelProto, DataSet]]
    folded_float16_rtol: float | None = None


@dataclass
class Tally:
    total: int = 0
    skipped_non_tensor: int = 0
    skipped_ort_fails: int = 0
    rejected: int = 0
    passed: int = 0
    failed: int = 0
    modified: int = 0  # cases canonicalize changed: how much of the suite exercised the passes
    outside_opset_range: int = 0  # canonicalize declined the opset and left the graph as it was
    seconds: float = 0.0
    rejections: dict[str, str] = field(default_factory=dict)  # case -> ModelError message
    failures: dict[str, str] = field(default_factory=dict)  # case -> what went wrong

    def counts(self) -> dict[str, int | float]:
        return {k: v for k, v in asdict(self).items() if not isinstance(v, dict)}


# -- cases -----------------------------------------------------------------------------------
@cache
def _cases() -> tuple[TestCase, ...]:
    with warnings.catch_warnings():
        # The case generators compute expected outputs with numpy, overflowing on purpose.
        warnings.simplefilter("ignore", RuntimeWarning)
        return tuple(sorted(load_model_tests(kind="node"), key=lambda c: c.name))


def _load_case(case: TestCase) -> tuple[onnx.ModelProto, list[DataSet]] | None:
    """The model and its data sets, or None when some input or output is not a plain tensor."""
    model = onnx.load(str(Path(case.model_dir) / "model.onnx")) if case.model_dir else case.model
    if not all(v.type.HasField("tensor_type") for v in (*model.graph.input, *model.graph.output)):
        return None  # sequences, optionals, maps, sparse tensors
    raw = _read_data_sets(Path(case.model_dir)) if case.model_dir else case.data_sets
    sets = []
    for inputs, outputs in raw:
        values = [numpy_helper.to_array(x) if isinstance(x, onnx.TensorProto) else x for x in (*inputs, *outputs)]
        if not all(isinstance(x, np.ndarray) for x in values):
            return None
        sets.append((_by_name(model, values[:len(inputs)]), values[len(inputs):]))
    return model, sets


def _read_data_sets(model_dir: Path) -> list[tuple[list, list]]:
    """onnx < 1.19 ships the cases as files: test_data_set_N/{input,output}_K.pb."""
    def read(folder: Path, kind: str) -> list[onnx.TensorProto]:
        files = sorted(folder.glob(f"{kind}_*.pb"), key=lambda p: int(p.stem.split("_")[1]))
        return [onnx.load_tensor(str(f)) for f in files]
    return [(read(d, "input"), read(d, "output")) for d in sorted(model_dir.glob("test_data_set_*"))]


def _by_name(model: onnx.ModelProto, inputs: list[np.ndarray]) -> Feeds:
    # Data sets list values for the graph inputs that are not initializers, in order.
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    return dict(zip(names, inputs))


# -- variants --------------------------------------------------------------------------------
def as_given(model: onnx.ModelProto, data: DataSet) -> tuple[onnx.ModelProto, DataSet]:
    return model, data


def constant_inputs(model: onnx.ModelProto, data: DataSet) -> tuple[onnx.ModelProto, DataSet]:
    """The inputs become initializers, and each graph output is produced by an Identity.

    fold-constants never folds a node whose output is a graph output, so the Identity lets it
    fold the op under test and leaves Identity(constant) as the model.
    """
    feeds, expected = data
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    remaining = [i for i in g.input if i.name not in feeds]
    del g.input[:]
    g.input.extend(remaining)
    g.initializer.extend(numpy_helper.from_array(v, name) for name, v in feeds.items())
    outputs = {o.name for o in g.output}
    for node in g.node:
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                if name in outputs:
                    names[i] = f"{name}__computed"
    g.node.extend(helper.make_node("Identity", [f"{o}__computed"], [o], name=f"{o}__identity") for o in outputs)
    # IR 3 requires every initializer to be a graph input, which would make the inputs feedable again.
    out.ir_version = max(out.ir_version, 4)
    if not any(o.domain in ("", "ai.onnx") for o in out.opset_import):  # ai.onnx.ml-only cases
        out.opset_import.append(helper.make_opsetid("", IDENTITY_OPSET))
    return out, ({}, expected)


VARIANTS = (Variant("as_given", as_given),
            Variant("constant_inputs", constant_inputs, folded_float16_rtol=FLOAT16_FOLDED_RTOL))


# -- one case --------------------------------------------------------------------------------
def _mismatch(model: onnx.ModelProto | gs.Graph, data: DataSet, rtol: float, atol: float) -> str | None:
    """Why `model` does not reproduce the expected outputs in onnxruntime, or None if it does."""
    feeds, expected = data
    got = ort.run(ort.session(model, threads=1), feeds)
    try:
        Runner.assert_similar_outputs(expected, list(got.values()), rtol=rtol, atol=atol)
    except AssertionError as e:
        return " ".join(str(e).split())[:300]
    return None


def _canonicalize(model: onnx.ModelProto, folder: Path) -> tuple[gs.Graph, PassRecord]:
    """The CLI's path: the validating loader, then canonicalize verified after every pass."""
    path = folder / "model.onnx"
    onnx.save_model(model, str(path))
    graph = io.load(path)
    records = PassManager(Pipeline.parse("canonicalize"), verify=True).run(graph)
    return graph, records[0]


def _ort_passes(model: onnx.ModelProto, data: DataSet, case: TestCase) -> bool:
    try:
        return _mismatch(model, data, case.rtol, case.atol) is None
    except GraphoptError:
        return False


def _run_case(case: TestCase, variant: Variant, folder: Path, tally: Tally) -> None:
    loaded = _load_case(case)
    if loaded is None:
        tally.skipped_non_tensor += 1
        return
    model, data = variant.prepare(loaded[0], loaded[1][0])  # node cases have exactly one data set
    reference = _ort_passes(model, data, case)
    try:
        graph, record = _canonicalize(model, folder)
    except PassError as e:  # a bug in a pass: never acceptable, even on a model onnxruntime cannot run
        _fail(tally, case, str(e))
        return
    except GraphoptError as e:
        _refused(case, e, reference, tally)
        return
    except Exception as e:  # noqa: BLE001 - never acceptable, even on a model onnxruntime cannot run
        _fail(tally, case, f"{type(e).__name__}: {e}")
        return
    if not reference:
        tally.skipped_ort_fails += 1  # no ground truth; canonicalize had only not to crash
        return
    tally.modified += record.modified
    tally.outside_opset_range += any("outside the pass's range" in s.reason for s in record.skipped)
    _compare(case, variant, graph, data, tally)


def _refused(case: TestCase, error: GraphoptError, reference: bool, tally: Tally) -> None:
    """A clear error is fine for a model onnxruntime cannot run; otherwise only the loader may refuse."""
    if not reference:
        tally.skipped_ort_fails += 1
    elif isinstance(error, ModelError):
        tally.rejected += 1
        tally.rejections[case.name] = error.what
    else:
        _fail(tally, case, f"{type(error).__name__}: {error}")


def _compare(case: TestCase, variant: Variant, graph: gs.Graph, data: DataSet, tally: Tally) -> None:
    rtol = case.rtol
    if variant.folded_float16_rtol and any(e.dtype == np.float16 for e in data[1]):
        rtol = max(rtol, variant.folded_float16_rtol)
    try:
        why = _mismatch(graph, data, rtol, case.atol)
    except GraphoptError as e:
        why = str(e)
    if why:
        _fail(tally, case, f"optimized model: {why}")
    else:
        tally.passed += 1


def _fail(tally: Tally, case: TestCase, why: str) -> None:
    tally.failed += 1
    tally.failures[case.name] = " ".join(why.split())[:400]


def run_suite(variant: Variant, every: int = 1) -> Tally:
    """Every `every`-th case of the suite (all by default) through canonicalize."""
    tally = Tally()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for case in _cases()[::every]:
            tally.total += 1
            _run_case(case, variant, Path(tmp), tally)
    tally.seconds = round(time.perf_counter() - start, 1)
    return tally


# -- report ----------------------------------------------------------------------------------
def _summary(tally: Tally) -> dict:
    return {**tally.counts(), "rejection_reasons": dict(Counter(tally.rejections.values()).most_common()),
            "rejections": tally.rejections, "failures": tally.failures}


def _describe(name: str, tally: Tally) -> str:
    """Counts, then rejections and failures grouped by message: a bug usually breaks many cases alike."""
    lines = [f"ONNX node suite through canonicalize ({name}): {json.dumps(tally.counts())}"]
    for kind, by_case in (("rejected", tally.rejections), ("FAILED", tally.failures)):
        groups: dict[str, list[str]] = {}
        for case, why in by_case.items():
            groups.setdefault(why, []).append(case)
        for why, cases in sorted(groups.items(), key=lambda g: -len(g[1])):
            more = f" and {len(cases) - 3} more" if len(cases) > 3 else ""
            lines.append(f"  {kind} x{len(cases)}: {why}\n      e.g. {', '.join(cases[:3])}{more}")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def results():
    """Collects each variant's tally; written to RESULTS once the module's tests have run."""
    collected: dict[str, dict] = {}
    yield collected
    if collected:  # whole-suite runs only (-m slow): the sampled one would overwrite them
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(collected, indent=1) + "\n")


# The whole suite takes two minutes per variant on 2 cores: slow. By default, every 4th case of
# the suite as given (the cases are sorted by name, so each op's cases are sampled alike).
SAMPLED = 4


@pytest.mark.parametrize("variant, every", [
    pytest.param(VARIANTS[0], SAMPLED, id=f"{VARIANTS[0].name}-every-{SAMPLED}th"),
    *(pytest.param(v, 1, id=v.name, marks=pytest.mark.slow) for v in VARIANTS)])
def test_canonicalize_keeps_node_suite_passing(variant: Variant, every: int, results: dict) -> None:
    tally = run_suite(variant, every)
    if every == 1:
        results[variant.name] = _summary(tally)
    description = _describe(variant.name, tally)
    print("\n" + description)
    failed = tally.failed  # a local keeps pytest from repeating the whole tally under the message
    assert failed == 0, description
    assert tally.passed >= MIN_PASSED // every, f"too few cases ran: {tally.counts()}"
