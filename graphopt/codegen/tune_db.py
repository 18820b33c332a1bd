"""The bookkeeping of a tuning database folder: what MetaSchedule recorded per kernel, for which
target, and which kernels' search spaces ran out (a small JSON file beside the database)."""
from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path

from graphopt.codegen.targets import tvm_error_summary
from graphopt.ir.errors import CodegenError

# Kernels whose search space ran out before their budget did; later runs skip them.
EXHAUSTED = "graphopt-exhausted.json"
# Target fields that do not change what a schedule is for.
_BOOKKEEPING_TARGET_KEYS = frozenset({"num-cores", "keys", "tag"})
FAILED = 1e10  # the run time MetaSchedule records for a candidate that failed
_FILES = ("database_workload.json", "database_tuning_record.json")  # JSONDatabase's, one JSON line each


def open_database(folder: Path):
    from tvm.s_tir import meta_schedule as ms

    for name in _FILES:
        _drop_cut_line(folder / name)
    try:
        return ms.database.JSONDatabase(work_dir=str(folder))
    except Exception as e:  # noqa: BLE001 - TVM raises many unrelated types
        raise CodegenError(f"{folder}: cannot read the MetaSchedule database: {tvm_error_summary(e)}; "
                           "move the folder away to start a new one") from e


def _drop_cut_line(path: Path) -> None:
    """A run killed while MetaSchedule appended a line can leave it cut short or without its
    newline, and JSONDatabase then refuses the whole file: end a whole last line, or drop a cut
    one, so that every complete record stays."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return
            f.seek(0)
            data = f.read()
    except FileNotFoundError:
        return
    head, _, last = data.rpartition(b"\n")
    try:
        json.loads(last)
        data += b"\n"
    except ValueError:
        data = head + b"\n" if head else b""
    staged = path.with_name(f".{path.name}.{os.getpid()}")
    staged.write_bytes(data)
    os.replace(staged, path)


def measured(db, tasks, tuning_target) -> list[tuple[int, float]]:
    """Each task's measurement count in `db` (failed ones too, so that a kernel that never builds
    is not retried forever) and best run time in seconds (inf if none ran). A record of these
    kernels made for another target is refused: it would count and be applied, though tuned for
    another machine."""
    workloads: dict = {}
    for i, task in enumerate(tasks):
        if db.has_workload(task.dispatched[0]):
            workloads.setdefault(db.commit_workload(task.dispatched[0]), []).append(i)
    counts, best = [0] * len(tasks), [math.inf] * len(tasks)
    ours = _target_key(tuning_target)
    for record in db.get_all_tuning_records():
        for i in workloads.get(record.workload, ()):
            if _target_key(record.target) != ours:
                raise CodegenError(f"the database holds schedules tuned for {record.target.export()}, not "
                                   f"{tuning_target.export()}: use one database folder per target")
            counts[i] += 1
            best[i] = min(best[i], seconds(record.run_secs))
    return list(zip(counts, best))


def _target_key(target) -> dict:
    return {k: v for k, v in target.export().items() if k not in _BOOKKEEPING_TARGET_KEYS}


def key(task) -> str:
    import tvm_ffi

    return f"{tvm_ffi.structural_hash(task.dispatched[0]):016x}"


def exhausted(folder: Path) -> set[str]:
    path = folder / EXHAUSTED
    try:
        return set(json.loads(path.read_text())) if path.exists() else set()
    except (OSError, ValueError) as e:
        raise CodegenError(f"{path}: unreadable ({e}); delete it to search those kernels again") from None


def mark_exhausted(folder: Path, keys: set[str]) -> None:
    path = folder / EXHAUSTED
    staged = path.with_name(f".{path.name}.{os.getpid()}")
    staged.write_text(json.dumps(sorted(exhausted(folder) | keys)) + "\n")
    os.replace(staged, path)


def seconds(run_secs) -> float:
    times = [float(s) for s in run_secs or ()]
    return statistics.median(times) if times and max(times) < FAILED else math.inf
