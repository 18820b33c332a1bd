"""The search to a budget (graphopt.search): its space, its walk, its folder, and the CLI around it,
on the bundled digits CNN with its labelled test set, candidates timed by onnxruntime."""
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from graphopt.cli import main
from graphopt.ir import io
from graphopt.ir import ort as gort
from graphopt.passes.pipeline import Pipeline
from graphopt.search import search, space
from graphopt.search.trials import TRIALS_FILE

MODELS = Path(__file__).resolve().parents[1] / "models"
DIGITS, TEST = MODELS / "digits_cnn.onnx", MODELS / "digits_test.npz"


class CountingTimer:
    """onnxruntime's median latency, counting the models it timed."""

    def __init__(self):
        self.calls = 0

    def __call__(self, model, feeds) -> float:
        self.calls += 1
        return gort.measure_latency(model, feeds, repeat=10).median_ms


def _accuracy(path: Path, spec: str | None = None) -> float:
    data = np.load(TEST)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: data["x"]})[0]
    return 100.0 * float((logits.argmax(1) == data["y"]).mean())


def test_space_follows_the_model_and_the_objective():
    graph = io.load(DIGITS)
    latency = {k.name for k in space.knobs(graph, "latency", int8_lowering=True)}
    size = {k.name for k in space.knobs(graph, "size", int8_lowering=False)}
    assert {"channels", "int8", "rank"} <= latency and "sparsity" not in latency
    assert "sparsity" in size and "winograd" not in size
    knobs = space.knobs(graph, "latency", int8_lowering=True)
    everything = tuple(len(k.levels) for k in knobs)
    spec = space.spec(knobs, everything)
    Pipeline.parse(spec)  # every setting is a spec that parses
    assert spec.startswith("canonicalize,prune-channels") and spec.endswith("lower-int8")
    assert "winograd" not in spec  # Winograd rewrites float convolutions; int8 is on
    assert space.spec(knobs, (0,) * len(knobs)) == "canonicalize"


def test_large_models_leave_out_what_cannot_pay_and_int8_is_probed_first():
    """ResNet-scale convolutions (over SENSITIVITY_MAX_WEIGHTS weights) get no Tucker knob, and a
    classifier that does a sliver of the MACs gets no low-rank knob."""
    import onnx_graphsurgeon as gs

    from graphopt.testing import builders

    graph = gs.import_onnx(builders.resnet(blocks=(2, 2), width=128, image=56))
    knobs = space.knobs(graph, "latency", int8_lowering=True)
    assert knobs[0].name == "int8" and "conv-rank" not in {k.name for k in knobs}
    assert space._mac_share(graph, {"Gemm", "MatMul"}) < space.MIN_SHARE and "rank" not in {k.name for k in knobs}
    small = {k.name for k in space.knobs(io.load(DIGITS), "latency", int8_lowering=True)}
    assert {"conv-rank", "rank"} <= small


def test_search_keeps_the_gate_finds_a_cheaper_model_and_resumes_from_its_folder(tmp_path):
    timer = CountingTimer()
    found = search(str(DIGITS), str(TEST), timer=timer, timed_on="onnxruntime", folder=tmp_path / "s",
                   max_drop=1.0, objective="latency", budget_s=120)
    section = found.section
    chosen, baseline = section["chosen"], section["baseline"]
    assert chosen["feasible"] and baseline["accuracy"] - chosen["accuracy"] <= 1.0
    assert chosen["latency_ms"] <= baseline["latency_ms"]
    assert chosen["spec"] == found.spec and Pipeline.parse(found.spec)
    assert len(section["candidates"]) >= 4  # the baseline and a probe of each knob at least
    front = section["pareto"]
    assert front and all(p["feasible"] for p in front)
    assert [p["latency_ms"] for p in front] == sorted(p["latency_ms"] for p in front)
    assert [p["accuracy"] for p in front] == sorted(p["accuracy"] for p in front)
    lines = (tmp_path / "s" / TRIALS_FILE).read_text().splitlines()
    assert len(lines) == len(section["candidates"])
    # Run again: every candidate comes from the folder, nothing is compiled or timed twice.
    again = CountingTimer()
    repeat = search(str(DIGITS), str(TEST), timer=again, timed_on="onnxruntime", folder=tmp_path / "s",
                    max_drop=1.0, objective="latency", budget_s=120)
    assert again.calls == 0 and repeat.spec == found.spec


def test_a_candidate_outside_the_gate_is_measured_refused_and_never_chosen(tmp_path):
    found = search(str(DIGITS), str(TEST), timer=CountingTimer(), timed_on="onnxruntime", folder=tmp_path / "s",
                   max_drop=0.0, objective="latency", budget_s=60)
    refused = [c for c in found.section["candidates"] if not c["feasible"]]
    assert refused and all("drops" in c["reason"] for c in refused)
    assert found.section["chosen"]["accuracy"] >= found.section["baseline"]["accuracy"]


def test_search_for_size_shrinks_the_compressed_model(tmp_path):
    found = search(str(DIGITS), str(TEST), timer=CountingTimer(), timed_on="onnxruntime", folder=tmp_path / "s",
                   max_drop=1.0, objective="size", budget_s=90)
    section = found.section
    assert section["cost"] == "compressed_bytes"
    assert section["chosen"]["compressed_bytes"] < 0.5 * section["baseline"]["compressed_bytes"]


def test_cli_search_writes_the_chosen_model_its_pareto_front_and_a_reproducing_spec(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["optimize", str(DIGITS), "--data", str(TEST), "--max-drop", "1%", "--search-budget", "40s",
                 "-o", str(out)]) == 0
    assert "search [1] baseline" in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["pipeline"] == report["search"]["chosen"]["spec"]
    assert len(report["search"]["pareto"]) >= 1
    assert _accuracy(out / "model.opt.onnx") >= _accuracy(DIGITS) - 1.5  # held-aside gate, whole test set
    # The spec reproduces the model.
    again = tmp_path / "again"
    assert main(["optimize", str(DIGITS), "--data", str(TEST), "--passes", report["pipeline"], "-o", str(again),
                 "-q"]) == 0
    assert (again / "model.opt.onnx").read_bytes() == (out / "model.opt.onnx").read_bytes()
    assert "Search" in (out / "report.html").read_text()


def test_cli_search_without_data_is_a_usage_error(tmp_path, capsys):
    assert main(["optimize", str(DIGITS), "--max-drop", "1%", "-o", str(tmp_path / "o")]) == 2
    assert "--data" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("20m", 1200), ("1h", 3600), ("45", 45)])
def test_search_budget_takes_units(tmp_path, text, seconds):
    from graphopt.cli import build_parser

    args = build_parser().parse_args(["optimize", str(DIGITS), "--search-budget", text, "-o", str(tmp_path)])
    assert args.search_budget == seconds
