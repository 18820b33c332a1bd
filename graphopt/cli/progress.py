"""Progress shown on stderr: a bar for long loops (calibration, tuning), a line per pass."""
from __future__ import annotations

import sys
import time

from graphopt.passes.manager import Instrument


class ProgressBar:
    """A progress callback (done, total[, best_ms]) drawn on stderr: redrawn in place on a
    terminal, a line per tenth otherwise (logs stay short). Tuning passes `best_ms`, the model's
    kernel time with the best schedules so far."""

    def __init__(self, label: str):
        self.label, self.start, self.shown = label, time.perf_counter(), -1

    def __call__(self, done: int, total: int, best_ms: float | None = None) -> None:
        total = max(total, 1)
        elapsed = time.perf_counter() - self.start
        best = f", best {best_ms:.4g} ms" if best_ms is not None else ""
        if sys.stderr.isatty():
            filled = int(30 * min(done, total) / total)
            print(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} {elapsed:.0f}s{best}  ",
                  end="", file=sys.stderr, flush=True)
        elif 10 * done // total > self.shown:
            self.shown = 10 * done // total
            print(f"{self.label}: {done}/{total} ({elapsed:.0f}s{best})", file=sys.stderr, flush=True)

    def close(self) -> None:
        if sys.stderr.isatty():
            print(file=sys.stderr)


class Progress(Instrument):
    """One line per pass on stderr: what is running, then how long it took."""

    def __init__(self):
        self._open = False

    def before_pass(self, pass_, graph, index, total):
        print(f"[{index + 1}/{total}] {pass_!r} ...", end="", file=sys.stderr, flush=True)
        self._start, self._open = time.perf_counter(), True

    def after_pass(self, pass_, graph, record):
        state = "modified" if record.modified else "unchanged"
        print(f" {state} in {time.perf_counter() - self._start:.2f}s", file=sys.stderr, flush=True)
        self._open = False

    def end_line(self) -> None:
        """End a pass's line that an error cut short, so the error stands on a line of its own."""
        if self._open:
            print(" failed", file=sys.stderr, flush=True)
            self._open = False


def search_progress(objective: str):
    """The search's progress callback: a line on stderr per candidate, with its cost and quality,
    the best cost within the gate so far and the time left to start new candidates."""
    count = [0]

    def cost(trial) -> str:
        value = trial.cost(objective)
        if value is None:
            return "-"
        return f"{value:.4g} ms" if objective == "latency" else f"{value:,} bytes"

    def show(trial, best, left_s: float) -> None:
        count[0] += 1
        quality = "" if trial.quality() is None else f", {trial.quality():.4g}"
        verdict = f"{cost(trial)}{quality}" if trial.feasible else f"outside the gate: {trial.reason[:100]}"
        best_text = cost(best) if best is not None else "-"
        print(f"search [{count[0]}] {trial.what}: {verdict} | best {best_text}, {left_s / 60:.1f} min left",
              file=sys.stderr, flush=True)

    return show


def phase(line: str) -> None:
    """A `progress` callback of graphopt.deploy's build (compiling, checking, timing the library):
    one line on stderr per long phase that prints nothing else."""
    print(f"{line} ...", file=sys.stderr, flush=True)
