import importlib.util
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest

from graphopt import codegen
from graphopt.codegen import build, targets, tune
from graphopt.ir import ort
from graphopt.ir.errors import CodegenError
from graphopt.testing.check import rng_array
from graphopt.testing.tiny import model, node

TRIALS = 8
INTERRUPT_AT = 7  # default-schedule seeds of the 3 kernels (NHWC transposes in and out, the conv) and a batch of four


def conv():
    nodes = [node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]), node("Relu", ["y"], ["z"])]
    return model(nodes, {"x": (1, 8, 16, 16)}, {"z": (1, 16, 16, 16)}, {"w": rng_array((16, 8, 3, 3), 1)})


@contextmanager
def stdout_to(path):
    """Redirect file descriptor 1, which TVM's C++ side and its worker processes write to."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(path, "w") as f:
        os.dup2(f.fileno(), 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@dataclass
class Runs:
    db: object
    progress: list
    resumed: tune.TuneResult
    again: tune.TuneResult
    stdout: str


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tune until interrupted, resume to the budget, then tune once more: the tuning is the slow
    part, so every test below shares it."""
    folder = tmp_path_factory.mktemp("tune")
    db, calls = folder / "db", []

    def interrupt(done, total, best_ms):
        calls.append((done, total, best_ms))
        if done >= INTERRUPT_AT:
            raise KeyboardInterrupt

    with stdout_to(folder / "stdout"):
        with pytest.raises(KeyboardInterrupt):
            tune.tune(conv(), "x86", db, trials=TRIALS, progress=interrupt)
        resumed = tune.tune(conv(), "x86", db, trials=TRIALS, progress=lambda *p: calls.append(p))
        again = tune.tune(conv(), "x86", db, trials=TRIALS)
    return Runs(db, calls, resumed, again, (folder / "stdout").read_text())


@pytest.mark.slow  # shares `runs`: three MetaSchedule runs, 100 s on 2 cores
def test_interrupted_run_keeps_its_trials_and_the_next_resumes(runs):
    cut = [p[0] for p in runs.progress].index(INTERRUPT_AT) + 1
    runs_calls = ((runs.progress[:cut], 0, INTERRUPT_AT), (runs.progress[cut:], INTERRUPT_AT, TRIALS))
    for calls, first, last in runs_calls:
        done = [d for d, total, _ in calls if total == TRIALS]
        assert len(done) == len(calls) and done[0] == first and done[-1] == last and done == sorted(done)
    assert runs.resumed.trials == TRIALS - INTERRUPT_AT and runs.resumed.trials_total == TRIALS
    assert runs.resumed.tasks == 3 and runs.resumed.database == runs.db


@pytest.mark.slow  # shares `runs`: three MetaSchedule runs, 100 s on 2 cores
def test_progress_reports_the_best_kernel_time_found_so_far(runs):
    # None until each kernel ran once (its default schedule); never worse after that.
    best = [b for *_, b in runs.progress]
    assert best[0] is None and best[-1] is not None and best[-1] > 0
    resumed = [b for *_, b in runs.progress[[p[0] for p in runs.progress].index(INTERRUPT_AT) + 1:]]
    assert resumed[0] is not None and all(a >= b for a, b in zip(resumed, resumed[1:]))


@pytest.mark.slow  # shares `runs`: three MetaSchedule runs, 100 s on 2 cores
def test_a_met_budget_measures_nothing(runs):
    assert runs.again.trials == 0 and runs.again.trials_total == TRIALS
    assert runs.again.seconds < 10  # no MetaSchedule start-up: nothing to tune


@pytest.mark.slow  # shares `runs`: three MetaSchedule runs, 100 s on 2 cores
def test_metaschedule_logs_to_the_database_folder_not_stdout(runs):
    assert runs.stdout == ""
    log = (runs.db / tune.LOG).read_text()
    assert "fused_conv2d_relu" in log and "Trial #" in log


@pytest.mark.slow  # shares `runs`: three MetaSchedule runs, 100 s on 2 cores
def test_tuned_library_matches_onnxruntime_and_rebuilds_identically(runs, tmp_path):
    x = rng_array((1, 8, 16, 16), 2)
    reference = ort.run(conv(), {"x": x})["z"]
    outputs = []
    for out in ("a", "b"):
        result = codegen.compile(conv(), "x86", tmp_path / out, database=runs.db)
        assert result.manifest["libraries"]["model.x86.so"]["database"]["tuned"] == 3
        outputs.append(codegen.load(result.library)(x))
    np.testing.assert_allclose(outputs[0], reference, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(outputs[0], outputs[1])


@pytest.mark.slow  # shares `runs`: three MetaSchedule runs, 100 s on 2 cores
def test_workload_keys_match_what_compile_applies(runs):
    from tvm.s_tir import meta_schedule as ms

    target = targets.resolve("x86")
    lowered = build.lower_for_tuning(build.to_relax(conv()), target)
    database = ms.database.JSONDatabase(work_dir=str(runs.db))
    assert all(database.has_workload(t.dispatched[0])
               for t in ms.relax_integration.extract_tasks(lowered, target.tvm_target()))


@pytest.mark.slow  # shares `runs`: three MetaSchedule runs, 100 s on 2 cores
def test_a_database_tuned_for_another_target_is_refused(runs):
    with pytest.raises(CodegenError, match="one database folder per target"):
        tune.tune(conv(), json.dumps(targets.GENERIC_X86), runs.db, trials=1)


def test_the_time_budget_stops_the_search(tmp_path):
    start = time.monotonic()
    result = tune.tune(conv(), "x86", tmp_path, trials=100, seconds=0.5)
    # Only the default schedules (one per kernel), measured before the search: the one batch a run
    # may overrun by.
    assert result.trials == result.tasks == 3 and time.monotonic() - start < 30


def test_a_kernel_whose_search_space_runs_out_is_not_searched_again(tmp_path):
    relu = model([node("Relu", ["x"], ["y"])], {"x": (1, 4)}, {"y": (1, 4)})
    first = tune.tune(relu, "x86", tmp_path, trials=64)
    assert 0 < first.trials < 64 and (tmp_path / tune.EXHAUSTED).is_file()
    assert tune.tune(relu, "x86", tmp_path, trials=64).trials == 0


# -- errors and scheduling, without tuning -----------------------------------------------------
def test_cross_targets_cannot_be_tuned_here(tmp_path):
    with pytest.raises(CodegenError, match="cannot tune for arm"):
        tune.tune(conv(), "arm", tmp_path)


def test_missing_tuning_packages_name_the_install_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "xgboost" else real(name, *a))
    with pytest.raises(CodegenError, match="pip install xgboost-cpu"):
        tune.tune(conv(), "x86", tmp_path)


@pytest.mark.parametrize("options, message", [({"trials": 0}, "at least 1"), ({"seconds": 0}, "positive")])
def test_bad_budgets(options, message, tmp_path):
    with pytest.raises(CodegenError, match=message):
        tune.tune(conv(), "x86", tmp_path, **options)


def test_a_file_is_not_a_database(tmp_path):
    (tmp_path / "db").write_text("")
    with pytest.raises(CodegenError, match="is a file"):
        tune.tune(conv(), "x86", tmp_path / "db")


def test_scheduler_tries_unmeasured_kernels_first_then_the_largest_expected_gain():
    session = tune._Session(before=0, trials=100, deadline=None, progress=None, weights=[1, 2, 1])
    session.history = [[1e-3], [], [5e-3]]
    assert session.pick([0, 1, 2]) == 1
    session.history[1] = [2e-3]
    assert session.pick([0, 1, 2]) == 2  # 5 ms beats 2 ms x weight 2
    session.history[2] = [5e-3] * 8  # many rounds without gain
    assert session.pick([0, 1, 2]) == 1
    session.history[1] = [math.inf]  # every candidate failed
    assert session.pick([0, 1]) == 0
