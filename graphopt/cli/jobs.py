"""The jobs that write outputs: optimize, compile and tune.

OUTDIR gets all of a job's outputs or none of them. Everything that can be checked cheaply is
checked before any work (the target, -o, that no output lands on the input). The outputs are
written to a hidden staging folder beside OUTDIR (`.OUTDIR.XXXXXXXX`), made first so that an
unwritable place fails at once, and moved in at the end with signals held off: a new OUTDIR is one
rename; into an existing one each output replaces its namesake (the old ones are put back if a
move fails) and every other file there is kept: other targets' libraries, tuning-db, the user's
own. SIGINT or SIGTERM (see graphopt.cli.main) before that leaves OUTDIR as it was and the
staging folder removed.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from graphopt.cli import interrupted_by
from graphopt.cli.console import print_report
from graphopt.cli.progress import Progress, ProgressBar, phase, search_progress
from graphopt.ir import io
from graphopt.ir.errors import GraphoptError
from graphopt.ir.shapes import parse_input_shapes, specialize
from graphopt.optimize import optimize
from graphopt.passes.pipeline import Pipeline
from graphopt.report import write_json
from graphopt.report_html import write_html

MODEL_NAME = "model.opt.onnx"
MANIFEST_NAME = "manifest.json"
REPORT_NAMES = ("report.json", "report.html")
TUNING_NOTE = " (the tuning database keeps its measured trials: re-run to resume)"


class UsageError(GraphoptError):
    """Arguments that cannot work together or with the file system as it is: exit code 2."""

    exit_code = 2


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, with what became of the outputs."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def cmd_tune(args) -> int:
    """`graphopt tune`: one model or several (their kernels together); with --rpc, measured on the
    tracker's servers under --rpc-key."""
    from graphopt import deploy

    target = _target(args)
    graphs = [io.load(m) for m in args.model]
    remote = _remote(args)
    where = f" on {remote.key}@{remote.address}" if remote else ""
    bar = None if args.quiet else ProgressBar(f"tuning {len(graphs)} models{where}" if len(graphs) > 1
                                              else f"tuning{where}")
    try:
        result = deploy.tune_for_target(graphs if len(graphs) > 1 else graphs[0], target, Path(args.db),
                                        args.trials, args.time_budget, bar, remote=remote)
    except KeyboardInterrupt:
        raise Interrupted("interrupted" + TUNING_NOTE) from None
    if bar:
        bar.close()
    print(json.dumps(result, indent=2))
    return 0


def cmd_optimize(args) -> int:
    if args.pipeline:
        return _job(args, Pipeline.load(args.pipeline), write_model=True)
    if args.passes is not None or (args.max_drop is None and args.min_cosine is None):
        return _job(args, Pipeline.parse(args.passes or "canonicalize"), write_model=True)
    if args.data is None:
        raise UsageError("the search (--max-drop or --min-cosine without --passes) measures candidates on data "
                         "held aside from calibration: give --data, or a pipeline with --passes")
    return _job(args, None, write_model=True)


def cmd_compile(args) -> int:
    return _job(args, Pipeline([]), write_model=False)


def _job(args, pipeline: Pipeline | None, write_model: bool) -> int:
    """Passes (with None, those the search chooses), then (with --target) tuning and compilation;
    all outputs appear together or not at all."""
    out_dir = Path(args.output)
    target = _target(args)
    _check_output_dir(Path(args.model), out_dir, output_names(write_model, target))
    shapes = parse_input_shapes(args.input_shape)
    staging = _Staging(out_dir)
    found = None
    progress = None if args.quiet or pipeline == [] else Progress()
    try:
        with staging:
            if pipeline is None:
                found = _search(args, target, out_dir)
                pipeline = Pipeline.parse(found.spec)
            try:
                result = optimize(args.model, pipeline, data=args.data, verify=not args.no_verify,
                                  instruments=(progress,) if progress else (), seed=args.seed,
                                  target_timer=_timer(target, pipeline), input_shapes=shapes or None,
                                  static=getattr(args, "static", False), opset=getattr(args, "opset", None),
                                  max_drop=getattr(args, "max_drop", None),
                                  min_cosine=getattr(args, "min_cosine", None),
                                  phase=None if args.quiet else phase)
            finally:
                if progress:
                    progress.end_line()
            if found is not None:
                result.report["search"] = found.section
            try:
                _write_outputs(result, staging, out_dir, args, target, write_model, shapes)
                if interrupted_by() is not None:  # a library swallowed the KeyboardInterrupt
                    raise KeyboardInterrupt
                staging.commit()
            except OSError as e:  # the disk is full, a quota, an I/O error: no traceback, OUTDIR as it was
                raise GraphoptError(f"{out_dir}: writing the outputs failed ({_os_reason(e)}); "
                                    f"{out_dir} is unchanged") from None
    except BaseException as e:
        # TVM and onnxruntime may turn the KeyboardInterrupt into an error of their own.
        if not isinstance(e, KeyboardInterrupt) and interrupted_by() is None:
            raise
        if staging.committed:  # the signal came during the move, which finished first
            raise Interrupted(f"interrupted after writing {out_dir}") from None
        raise Interrupted(f"interrupted; {out_dir} unchanged{TUNING_NOTE if args.tune else ''}") from None
    try:
        if not args.quiet:
            print_report(result.report, out_dir)
        if getattr(args, "explain", False):
            for line in _refusals(result.report["passes"]):
                print(line)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted after writing {out_dir}") from None
    return 0


def output_names(write_model: bool, target) -> list[str]:
    """The names a job writes in OUTDIR."""
    names = [*REPORT_NAMES]
    if write_model:
        names += [MODEL_NAME, MODEL_NAME + ".data"]  # .data: the weights of a model over 2 GB (io.save)
    if target is not None:
        # As graphopt.codegen.build.compile names the library (name "model").
        names += [f"model.{target.name}.so", MANIFEST_NAME]
    return names


def _check_output_dir(model: Path, out_dir: Path, names: list[str]) -> None:
    """-o must be a folder (or not exist yet), and no output may land on the input: by name,
    through a symlink or as a hard link of it."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir}: -o names a file; give a folder for the outputs")
    for name in names:
        try:
            same = os.path.samefile(out_dir / name, model)
        except OSError:  # either does not exist (yet)
            continue
        if same:
            raise UsageError(f"{model}: -o {out_dir} would overwrite the input with {name}; choose another folder")


def _os_reason(e: OSError) -> str:
    return e.strerror or str(e)


def _search(args, target, out_dir: Path):
    """The search's result: the cheapest pipeline within the gate (graphopt.search)."""
    from graphopt import search

    timer, timed_on = _search_timer(target)
    return search.search(args.model, args.data, timer=timer, timed_on=timed_on, folder=out_dir / "search",
                         max_drop=args.max_drop, min_cosine=args.min_cosine, objective=args.objective,
                         budget_s=args.search_budget, int8_lowering=target is not None and target.device == "cpu",
                         seed=args.seed, progress=None if args.quiet else search_progress(args.objective))


def _search_timer(target):
    """What candidates are timed with, and where, in words: the target's library where it runs
    here, else onnxruntime on this machine."""
    from graphopt import deploy
    from graphopt.ir import ort

    timer = deploy.target_timer(target) if target is not None else None
    if timer is not None:
        def quiet(model, feeds):
            with deploy.quiet_tvm():
                return timer(model, feeds)

        return quiet, f"the {target.name} library compiled by TVM, on this machine"
    return (lambda model, feeds: ort.measure_latency(model, feeds).median_ms), "onnxruntime on this machine"


def _timer(target, pipeline: Pipeline):
    """The target's timer, only when a pass will measure (compiling candidates costs seconds)."""
    if target is None or not any(p.info.needs_latency for p in pipeline):
        return None
    from graphopt import deploy

    return deploy.target_timer(target)


def _remote(args):
    """The devices of --rpc/--rpc-key, or None to measure here."""
    if not getattr(args, "rpc", None):
        return None
    from graphopt.codegen import rpc

    return rpc.Remote.parse(args.rpc, args.rpc_key)


def _target(args):
    if args.target is None:
        if args.tune:
            raise UsageError("--tune needs --target")
        return None
    from graphopt import codegen

    return codegen.resolve(args.target, args.cuda_arch)


@contextlib.contextmanager
def deferred_signals():
    """SIGINT and SIGTERM that arrive inside take effect when it ends, so that moves and clean-up
    run to completion: the signal is raised again then, to whatever handler was in place."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            signal.raise_signal(received[0])


class _Staging:
    """The folder a job writes its outputs to before they move into OUTDIR (see the module doc).

    Made on entry, before any work; removed on exit, with the parents of OUTDIR this job created
    unless it committed."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.real = out_dir.resolve()  # the folder itself when -o is a symlink to it, or "."
        self.path: Path | None = None
        self.made: list[Path] = []  # missing parents of OUTDIR created here, outermost first
        self.committed = False

    def __enter__(self) -> _Staging:
        try:
            with deferred_signals():
                try:
                    for parent in reversed(self.real.parents):
                        if not parent.exists():
                            parent.mkdir()
                            self.made.append(parent)
                    self.path = self._make()
                except OSError as e:
                    raise UsageError(f"{self.out_dir}: cannot write the outputs there ({_os_reason(e)})") from None
        except BaseException:  # also a signal held off above: the with statement will not call __exit__
            self._remove()
            raise
        return self

    def _make(self) -> Path:
        """Beside OUTDIR, so that a new OUTDIR is one rename; inside an existing OUTDIR when it is
        a mount point (a rename cannot cross file systems) or its parent is not writable."""
        inside = self.real.is_dir() and self.real.stat().st_dev != self.real.parent.stat().st_dev
        if not inside:
            try:
                return Path(tempfile.mkdtemp(dir=self.real.parent, prefix=f".{self.real.name}."))
            except OSError:
                if not self.real.is_dir():
                    raise
        return Path(tempfile.mkdtemp(dir=self.real, prefix=".graphopt."))

    def commit(self) -> None:
        """Move the staged outputs into OUTDIR, all of them or (on an OSError) none."""
        with deferred_signals():
            names = sorted(os.listdir(self.path))
            if self.path.parent == self.real.parent and not os.path.lexists(self.real):
                os.chmod(self.path, 0o777 & ~_umask())  # mkdtemp made it private
                try:
                    os.rename(self.path, self.real)
                    self.committed = True
                    return
                except OSError:  # someone made OUTDIR meanwhile: move the files in one by one
                    os.chmod(self.path, 0o700)
            self.real.mkdir(exist_ok=True)
            self._replace(names)
            self.committed = True

    def _replace(self, names: list[str]) -> None:
        old = self.path / ".replaced"
        old.mkdir()
        saved, moved = [], []
        try:
            for name in names:
                dest = self.real / name
                if os.path.lexists(dest):
                    os.rename(dest, old / name)
                    saved.append(name)
                os.rename(self.path / name, dest)
                moved.append(name)
        except OSError:
            for name in reversed(moved):
                os.rename(self.real / name, self.path / name)
            for name in reversed(saved):
                os.rename(old / name, self.real / name)
            raise

    def __exit__(self, kind, error, tb) -> None:
        self._remove()

    def _remove(self) -> None:
        with deferred_signals():
            if self.path is not None:
                shutil.rmtree(self.path, ignore_errors=True)
            if not self.committed:
                for parent in reversed(self.made):
                    with contextlib.suppress(OSError):  # no longer empty: someone else uses it
                        parent.rmdir()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_outputs(result, staging: _Staging, out_dir: Path, args, target, write_model: bool,
                   shapes: dict) -> None:
    """Write every output into the staging folder; `report["written"]` lists their names."""
    staged = staging.path
    report = dict(result.report, model=str(args.model))
    if write_model:
        io.save(result.graph, staged / MODEL_NAME)
        report["output"] = str(out_dir / MODEL_NAME)
        # Over 2 GB the weights are in MODEL_NAME.data beside the model.
        report["after"]["file_bytes"] = sum(p.stat().st_size for p in staged.glob(MODEL_NAME + "*"))
    if target is not None:
        report.update(_codegen(result, target, staged, out_dir, staging.real, args, shapes))
    report["written"] = sorted([*os.listdir(staged), *REPORT_NAMES])
    write_json(report, staged / "report.json")
    write_html(report, staged / "report.html")
    result.report = report


def _codegen(result, target, staged: Path, out_dir: Path, real_out: Path, args, shapes: dict) -> dict:
    """Tune and build; with --input-shape the library is built for those dims (shape-computing
    subgraphs then resolve to constants)."""
    from graphopt import deploy

    graph = specialize(result.graph, shapes) if shapes else result.graph
    sections = {}
    database = Path(args.db) if args.db else (out_dir / "tuning-db" if args.tune else None)
    if args.tune:
        bar = None if args.quiet else ProgressBar("tuning")
        sections["tuning"] = deploy.tune_for_target(graph, target, database, args.trials,
                                                    args.time_budget, bar, feeds=result.feeds, remote=_remote(args))
        if bar:
            bar.close()
    section = deploy.build_for_target(graph, target, staged, result.feeds, result.reference, database,
                                      progress=None if args.quiet else phase)
    _keep_other_libraries(staged / MANIFEST_NAME, real_out / MANIFEST_NAME)
    section["library"] = str(out_dir / Path(section["library"]).name)
    section["manifest"] = str(out_dir / MANIFEST_NAME)
    sections["codegen"] = section
    return sections


def _keep_other_libraries(staged: Path, current: Path) -> None:
    """Put OUTDIR's manifest entries for the libraries of other targets into the staged manifest.
    manifest.record keeps the entries whose library is beside the manifest, and the staging folder
    holds only this build's library; the rule is the same: the same model, the library present."""
    from graphopt.codegen import manifest

    if not current.is_file():
        return
    new, old = json.loads(staged.read_text()), json.loads(current.read_text())
    if not isinstance(old, dict) or any(old.get(k) != new.get(k) for k in manifest.MODEL_KEYS):
        return  # another model (or other input shapes): a fresh manifest, as record() would start
    kept = {name: entry for name, entry in old.get("libraries", {}).items()
            if name not in new["libraries"] and (current.parent / name).is_file()}
    if kept:
        new["libraries"] = {**kept, **new["libraries"]}
        staged.write_text(json.dumps(new, indent=2) + "\n")


def _refusals(records: list[dict]):
    for record in records:
        for kind in ("refused", "skipped"):
            for r in record.get(kind, []):
                where = f"{record['name']} ({r['rule']})" if r.get("rule") else record["name"]
                yield f"{where}: {kind} {r['node'] or '(graph)'}: {r['reason']}"
