"""MetaSchedule tuning into a database folder that `compile(..., database=)` applies.

    result = tune("model.onnx", "x86", "tuned", trials=200, seconds=600)
    compile("model.onnx", "x86", "out", database=result.database)

Budget: `trials` is how many measurements the model's kernels should have in the database in all.
Records already there count (from an earlier run, an interrupted one, or another model sharing a
kernel), so a run resumes where the last one stopped and measures nothing once the budget is met.
Each batch of measurements is written to the database as it completes; the last batch may pass
`trials` by less than a batch, as in MetaSchedule. `seconds` bounds the whole call; it is checked
before each batch, so a run ends at most one batch late. Ctrl-C also ends the run after the batch
in hand, then raises KeyboardInterrupt.

A kernel's first measurement is graphopt's default schedule (`cpu_schedules`), recorded like any
trial, so that a tuned build is never slower than an untuned one where tuning found nothing
better. Then each batch goes to the kernel whose weighted latency MetaSchedule's gradient rule
expects to drop most. MetaSchedule's log goes to `<database>/logs/tune.log`, never to stdout.
Tuning measures on this machine, so the target must be a CPU of this machine's architecture;
with `remote=rpc.Remote(...)` it measures on the devices registered with a TVM RPC tracker instead
(`graphopt.codegen.rpc`), as many at once as there are, and builds here: for another
architecture (`--target arm`), each kernel is linked by the cross linker into a library the
device loads as it is. Several models tune as one set of kernels (a kernel they share is tuned
once), so that one run keeps every device busy.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from graphopt.codegen import backends, build, cpu_schedules, host_encoders, rpc, tune_db
from graphopt.codegen.targets import Target, fcompile, host_arch, resolve, tvm_error_summary
from graphopt.ir import io
from graphopt.ir.errors import CodegenError
from graphopt.ir.graph import export

EXHAUSTED = tune_db.EXHAUSTED
# Import name -> pip requirement, for what MetaSchedule needs besides TVM.
_REQUIRED = {"xgboost": "xgboost-cpu", "psutil": "psutil", "cloudpickle": "cloudpickle", "tornado": "tornado"}
LOG = Path("logs") / "tune.log"
_WINDOW, _ALPHA = 3, 0.2  # MetaSchedule's gradient rule: rounds looked back, weight of recent gains
_MAX_BATCH = 64  # MetaSchedule's default trials per batch
_LOGGER = "tvm.s_tir.meta_schedule"


@dataclass(frozen=True)
class TuneResult:
    database: Path
    tasks: int  # kernels of the model that tuning schedules
    trials: int  # measured by this call
    trials_total: int  # in the database for this model's kernels, this call's included
    seconds: float


Model = onnx.ModelProto | gs.Graph | str | os.PathLike


def tune(model: Model | Sequence[Model], target: Target | str,
         database: str | os.PathLike, *, trials: int = 64, seconds: float | None = None,
         shapes: Mapping[str, Sequence[int]] | None = None,
         progress: Callable[[int, int, float | None], None] | None = None, seed: int = 0,
         remote: rpc.Remote | None = None) -> TuneResult:
    """Tune `model`'s kernels (or those of every model in a list) for `target` until the database
    folder `database` (created if missing) holds `trials` measurements of them, or `seconds` have
    passed. With `remote`, the
    kernels are measured on the servers registered with its tracker under its key (checked first:
    `rpc.RpcError` if there are none).

    `progress(done, trials, estimate_ms)` is called after each batch, first with what the database
    already held; `estimate_ms` is the model's kernel time with the best schedules found so far
    (each kernel's best run time times its calls, as MetaSchedule weighs them), None until every
    kernel has run once. `shapes` overrides input shapes by name, as in `compile`: pass the same to both.
    """
    start = time.monotonic()
    if trials < 1:
        raise CodegenError(f"trials must be at least 1, not {trials}")
    if seconds is not None and seconds <= 0:
        raise CodegenError(f"the time budget must be positive, not {seconds} s")
    _check_requirements()
    target = resolve(target) if isinstance(target, str) else target
    tuning_target = _tuning_target(target, remote)
    devices = None if remote is None else rpc.check(remote)  # before any work: no tracker, no run
    folder = Path(database)
    if folder.exists() and not folder.is_dir():
        raise CodegenError(f"{folder} is a file; the tuning database is a folder")
    (folder / LOG).parent.mkdir(parents=True, exist_ok=True)
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    tasks = _merged([t for m in models for t in _extract_tasks(_read(m), shapes, target, tuning_target)])
    with _logging_to(folder / LOG):
        db = tune_db.open_database(folder)
        held = tune_db.measured(db, tasks, tuning_target)
        before = sum(count for count, _ in held)
        if progress is not None:
            progress(min(before, trials), trials, estimate_ms([t.weight for t in tasks], [b for _, b in held]))
        skipped = tune_db.exhausted(folder)
        todo = [t for t in tasks if tune_db.key(t) not in skipped]
        if before < trials and todo:
            session = _Session(before, trials, None if seconds is None else start + seconds, progress,
                               [t.weight for t in todo])
            _run(todo, db, folder, tuning_target, session, seed, remote, devices, _export_function(target))
        after = sum(count for count, _ in tune_db.measured(db, tasks, tuning_target))
    return TuneResult(folder, len(tasks), after - before, after, time.monotonic() - start)


def estimate_ms(weights: Sequence[float], best_seconds: Sequence[float]) -> float | None:
    """Kernel time of one model run in ms: each kernel's best time times its calls; None while
    some kernel has no time."""
    if not best_seconds or any(math.isinf(b) for b in best_seconds):
        return None
    return 1000 * sum(w * b for w, b in zip(weights, best_seconds))


def _check_requirements() -> None:
    missing = [pip for name, pip in _REQUIRED.items() if importlib.util.find_spec(name) is None]
    if missing:
        raise CodegenError(f"tuning needs {', '.join(missing)}: `pip install {' '.join(missing)}`")


def _tuning_target(target: Target, remote: rpc.Remote | None = None):
    """`target` with the core count MetaSchedule's search requires."""
    import psutil
    import tvm

    if remote is None and not backends.of(target).can_time_here(target):
        raise CodegenError(f"tuning measures kernels on this machine ({host_arch()} CPU), so it cannot "
                           f"tune for {target.name}; tune on that device, or compile untuned")
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return tvm.target.Target({**target.tvm, "num-cores": cores})


def _read(model) -> onnx.ModelProto:
    if isinstance(model, gs.Graph):
        return export(model)
    return model if isinstance(model, onnx.ModelProto) else io.load_model(model)


def _extract_tasks(proto: onnx.ModelProto, shapes, target: Target, tuning_target) -> list:
    """The model's kernels as MetaSchedule tasks, lowered as `compile` lowers them when it applies
    a database, so that the workload keys are the ones it looks up."""
    from tvm.s_tir import meta_schedule as ms

    # The library compile builds takes string lookups' numbers: tune that same library.
    hosted = host_encoders.split(proto)
    build.check_supported(hosted.model)
    lowered = build.lower_for_tuning(build.to_relax(hosted.model, hosted.library_shapes(shapes), target), target)
    return list(ms.relax_integration.extract_tasks(lowered, tuning_target))


@dataclass
class _Session:
    """The state of one run, shared by the scheduler, the measure callback and `_run`."""

    before: int
    trials: int
    deadline: float | None
    progress: Callable[[int, int, float | None], None] | None
    weights: list[float]
    measured: list[int] = field(init=False)
    history: list[list[float]] = field(init=False)  # each kernel's best run time (s) after each batch
    ended_early: set[int] = field(default_factory=set)  # tasks MetaSchedule ended during the run
    interrupted: bool = False
    # Why the devices measured on are gone, once they are (remote runs).
    gone: Callable[[], str | None] | None = None
    # What `progress` raised: MetaSchedule's C++ loop would hand it on as a bare RuntimeError.
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.measured = [0] * len(self.weights)
        self.history = [[] for _ in self.weights]

    @property
    def budget(self) -> int:
        return self.trials - self.before - sum(self.measured)

    def record(self, task_id: int, run_times: list[float]) -> None:
        self.measured[task_id] += len(run_times)
        self.history[task_id].append(min([*self.history[task_id][-1:], *run_times], default=math.inf))
        self.report()

    def report(self) -> None:
        try:
            if self.progress is not None:
                bests = [h[-1] if h else math.inf for h in self.history]
                self.progress(min(self.trials - self.budget, self.trials), self.trials,
                              estimate_ms(self.weights, bests))
        except BaseException as e:
            self.error = e
            raise

    def should_stop(self) -> bool:
        return (self.interrupted or (self.deadline is not None and time.monotonic() >= self.deadline)
                or (self.gone is not None and self.gone() is not None))

    def pick(self, alive: list[int]) -> int:
        fresh = [i for i in alive if not self.history[i]]
        return fresh[0] if fresh else max(alive, key=self._gradient)

    def _gradient(self, i: int) -> float:
        """MetaSchedule's estimate of how much one more batch of kernel `i` saves."""
        history = self.history[i]
        best = history[-1]
        if math.isinf(best):  # nothing ran: no schedule to improve on
            return -math.inf
        recent = (history[-1 - _WINDOW] - best) / _WINDOW if len(history) > _WINDOW else 0.0
        return self.weights[i] * (_ALPHA * recent + (1 - _ALPHA) * best / len(history))


def _run(tasks: list, db, folder: Path, tuning_target, session: _Session, seed: int,
         remote: rpc.Remote | None, devices: int | None, export: Callable | None) -> None:
    from tvm.s_tir import meta_schedule as ms

    cores = tuning_target.export()["num-cores"]
    builder = ms.builder.LocalBuilder(max_workers=cores, f_build=_build_function(), f_export=export)
    runner = ms.runner.LocalRunner() if remote is None else rpc.runner(remote, devices)
    if remote is not None:
        session.gone = lambda: runner.gone
    try:
        with _stop_on_interrupt(session):
            _seed_defaults(tasks, db, tuning_target, builder, runner, session)
            if session.budget > 0 and not session.should_stop():
                _search(tasks, db, folder, tuning_target, session, seed, builder, runner)
    except Exception as e:  # noqa: BLE001 - TVM raises many unrelated types
        if session.error is not None:
            raise session.error from None
        raise CodegenError(f"tuning failed: {tvm_error_summary(e)} (log: {folder / LOG}); what was "
                           "measured is kept, and the next run resumes from it") from e
    finally:
        if remote is not None:
            runner.close()
    if session.interrupted:
        raise KeyboardInterrupt
    if session.gone is not None and session.gone():
        raise CodegenError(f"tuning stopped: {session.gone()}; what was measured is kept, and the next run "
                           "resumes from it")


def _search(tasks: list, db, folder: Path, tuning_target, session: _Session, seed: int,
            builder, runner) -> None:
    """MetaSchedule's evolutionary search over the remaining budget, in batches our scheduler
    hands out."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.utils import fork_seed

    scheduler, recorder = _tvm_classes()
    _import_tensor_intrinsics(tuning_target.kind.name)
    cores = tuning_target.export()["num-cores"]
    budget = session.budget
    batch = max(4, min(_MAX_BATCH, budget // 8))  # about eight batches, for the scheduler to spread
    # MetaSchedule's ratio of 8 candidates evolved per one measured, but no fewer than 128: its
    # default of 512 makes each small batch cost tens of seconds of search on a small machine.
    population = min(512, max(128, 8 * batch))
    logger = logging.getLogger(f"{_LOGGER}.graphopt")
    evolutionary = functools.partial(ms.search_strategy.EvolutionarySearch, population_size=population)
    contexts = [ms.TuneContext(mod=task.dispatched[0], target=tuning_target, task_name=task.task_name,
                               space_generator="post-order-apply", search_strategy=evolutionary(),
                               logger=logger, rand_state=rand, num_threads=cores)
                for task, rand in zip(tasks, fork_seed(seed, len(tasks)))]
    ms.tune_tasks(tasks=contexts, task_weights=session.weights, work_dir=str(folder), database=db,
                  max_trials_global=budget, num_trials_per_iter=batch, builder=builder, runner=runner,
                  cost_model=ms.cost_model.XGBModel(num_tuning_cores=cores),
                  measure_callbacks=[*(ms.MeasureCallback.create("default") if session.gone is None
                                       else rpc.measure_callbacks()), recorder(session)],
                  task_scheduler=scheduler(session))
    # A task's cap is the whole budget; one that ended below it ran out of candidates.
    exhausted = {tune_db.key(tasks[i]) for i in session.ended_early if session.measured[i] < budget}
    if exhausted:
        tune_db.mark_exhausted(folder, exhausted)


def _import_tensor_intrinsics(kind: str) -> None:
    """The tensor intrinsics MetaSchedule's default rules name for a `kind` target, registered
    before TuneContext imports `tvm.s_tir.tensor_intrin`: that package builds every target's
    intrinsics on import, CUDA's hundreds among them, each TVMScript parse walking
    `inspect.stack()` (85 s on an AMD EPYC Zen 5, over 90% of a small model's tuning run; the CPU
    ones take 5 s). The package is entered without running its __init__, then only the submodules
    a CPU target needs (x86, arm_cpu) are imported, and cuda's for a CUDA target."""
    import sys
    import types

    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        spec = importlib.util.find_spec(name)
        package = types.ModuleType(name)
        package.__spec__, package.__path__ = spec, list(spec.submodule_search_locations)
        sys.modules[name] = package
    for sub in ("x86", "arm_cpu", *(("cuda",) if kind == "cuda" else ())):
        importlib.import_module(f"{name}.{sub}")


def _seed_defaults(tasks: list, db, tuning_target, builder, runner, session: _Session) -> None:
    """Measure and record graphopt's default schedule of each kernel the database has no record
    of; start every kernel's history from its best record."""
    from tvm.s_tir import meta_schedule as ms

    simd = cpu_schedules.simd_of(tuning_target)
    new = [(i, sch) for i, (count, _) in enumerate(tune_db.measured(db, tasks, tuning_target)) if count == 0
           for sch in [cpu_schedules.schedule(tasks[i].dispatched[0]["main"], simd)] if sch is not None]
    built = builder.build([ms.builder.BuilderInput(sch.mod, tuning_target) for _, sch in new]) if new else []
    args = [ms.arg_info.ArgInfo.from_prim_func(tasks[i].dispatched[0]["main"]) for i, _ in new]
    # All at once: a remote runner measures them in parallel.
    runs = iter(runner.run([ms.runner.RunnerInput(result.artifact_path, "cpu", a)
                            for result, a in zip(built, args) if result.error_msg is None]) if new else [])
    for (i, sch), result, arg_info in zip(new, built, args):
        workload = tasks[i].dispatched[0]
        run_secs = [tune_db.FAILED]
        if result.error_msg is None:
            measured = next(runs).result()
            run_secs = list(measured.run_secs) if measured.error_msg is None else run_secs
            shutil.rmtree(Path(result.artifact_path).parent, ignore_errors=True)
            if rpc.lost(measured.error_msg):  # not measured: its device vanished
                continue
        db.commit_tuning_record(ms.database.TuningRecord(sch.trace, db.commit_workload(workload), run_secs,
                                                         tuning_target, arg_info))
        session.measured[i] += 1
    session.history = [[best] if best < math.inf else [] for _, best in tune_db.measured(db, tasks, tuning_target)]
    if new:
        session.report()


@contextmanager
def _stop_on_interrupt(session: _Session) -> Iterator[None]:
    """Ctrl-C asks the run to stop after the batch in hand. Left alone, the KeyboardInterrupt
    would mostly be raised inside a log call of MetaSchedule's C++ loop, which swallows it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def stop(signum, frame) -> None:
        session.interrupted = True
        signal.signal(signal.SIGINT, previous)  # a second Ctrl-C acts at once

    signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _build_function() -> Callable:
    """MetaSchedule's default build minus its `import tvm.s_tir.tensor_intrin` (about 14 s), which
    every batch's fresh builder processes would pay again: a scheduled kernel has its intrinsics
    inlined. Nested, so that cloudpickle sends it by value and builders need not import graphopt."""

    def build_kernel(mod, target, _params):
        from tvm.driver import build as tvm_build
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

        return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)

    return build_kernel


def _export_function(target: Target) -> Callable | None:
    """For a target of another architecture, each built kernel linked into a shared library by the
    cross linker (MetaSchedule's default exports a tar, which the device would link with a
    compiler of its own); None (the default) for this machine's."""
    if target.cross is None:
        return None
    linker = fcompile(target)

    def export(mod) -> str:
        import os
        import tempfile

        path = os.path.join(tempfile.mkdtemp(), "tvm_tmp_mod.so")
        mod.export_library(path, fcompile=linker)
        return path

    return export


def _merged(tasks: list) -> list:
    """Tasks of several models, a kernel they share once, with the calls of all of them."""
    from tvm.s_tir import meta_schedule as ms

    merged: dict = {}
    for task in tasks:
        first = merged.setdefault(tune_db.key(task), task)
        if first is not task:
            merged[tune_db.key(task)] = ms.ExtractedTask(first.task_name, first.mod, first.target,
                                                         list(first.dispatched), int(first.weight) + int(task.weight))
    return list(merged.values())


@functools.cache
def _tvm_classes() -> tuple[type, type]:
    """The task scheduler and the measure callback, defined on first use: defining them imports TVM."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class Scheduler(ms.task_scheduler.PyTaskScheduler):
        def __init__(self, session: _Session):
            super().__init__()
            self.session = session

        def next_task_id(self) -> int:
            scheduler = self._outer()
            records = scheduler.tasks_
            for i in range(len(records)):
                # Joins a finished batch: its records are committed and the callbacks have run.
                scheduler.touch_task(i)
            self.session.ended_early.update(i for i, r in enumerate(records) if r.is_terminated)
            alive = [i for i, r in enumerate(records) if not r.is_terminated]
            if not alive or self.session.should_stop():
                return -1
            chosen = self.session.pick(alive)
            if records[chosen].runner_futures is not None:
                # MetaSchedule sends a task no batch while its last one runs (a check in its loop):
                # wait for it, as its own gradient scheduler does.
                scheduler.join_running_task(chosen)
                if self.session.should_stop():
                    return -1
            return chosen

    @derived_object
    class Recorder(ms.measure_callback.PyMeasureCallback):
        def __init__(self, session: _Session):
            super().__init__()
            self.session = session

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
            # A measurement whose device vanished is not recorded (`rpc.measure_callbacks`), so not counted.
            self.session.record(task_id, [tune_db.seconds(r.run_secs) if r.error_msg is None else math.inf
                                          for r in runner_results if not rpc.lost(r.error_msg)])

    return Scheduler, Recorder


@contextmanager
def _logging_to(path: Path) -> Iterator[None]:
    """Send MetaSchedule's loggers to `path` only, for the duration."""
    logger = logging.getLogger(_LOGGER)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
