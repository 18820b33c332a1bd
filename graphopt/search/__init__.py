"""Search the compression space for the cheapest model within an accuracy budget, every
candidate measured: its quality on held-aside data, its cost on the deployment target.

    graphopt optimize model.onnx --data d.npz --max-drop 1% --target x86 --search-budget 20m

The space (`space.knobs`): channel pruning at three ratios (each with per-layer ratios allocated
by measured sensitivity, as AMC allocates a budget over layers), low rank for matmuls, sparsity
(for size), Winograd for 3x3 convolutions, int8 (with the two layers int8 hurts most kept in
float, then all of them; for size also int4 weights). Candidates are measured, not predicted
(HAQ's hardware in the loop): latency of the library TVM compiles for the target where it runs
here (else onnxruntime), size in compressed bytes.

The strategy is a greedy walk with backtracking, ranked by sensitivity, which can be explained
candidate by candidate:
1. measure the baseline (canonicalize only);
2. probe each knob alone at its first level; rank the knobs that stay within the budget by cost
   saved per point of quality lost (the cheapest, least harmful first);
3. in that order, raise one knob a level at a time on top of everything kept so far, up to the
   first level outside the gate (there the walk steps back); keep the knob's cheapest level if
   it saves at least `MIN_GAIN` of the cost, and go on with the next knob; repeat the round
   while a round keeps something and time is left.
Chosen: the cheapest candidate within the budget among all measured (probes included). The
budget bounds when a new candidate may start; the one measuring when it runs out finishes.
Every measured candidate is kept in the search folder (`trials.Store`): a search run again
replays them without measuring and goes on where it stopped.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from graphopt.ir.errors import GateError
from graphopt.search import space as spaces
from graphopt.search.trials import Store, Timer, Trial, measure

# A step must save this share of the cost to be kept: smaller differences are within what
# timing the same library twice can differ by.
MIN_GAIN = 0.03


@dataclass
class SearchResult:
    spec: str       # the chosen pipeline, as --passes
    section: dict   # the report's "search" section


@dataclass
class _Walk:
    """What the walk needs at every candidate."""

    model: str
    data: object
    gate: dict
    timer: Timer
    store: Store
    space: list
    objective: str
    deadline: float
    seed: int
    progress: Callable[[Trial, Trial | None, float], None]
    best: Trial | None = None

    def measure(self, setting: spaces.Setting) -> Trial | None:
        """The candidate's trial (from the store when it was measured before); None when the
        budget has run out before it could start."""
        spec = spaces.spec(self.space, setting)
        trial = self.store.trials.get(spec)
        fresh = trial is None
        if fresh:
            if time.monotonic() >= self.deadline:
                return None
            trial = measure(self.model, spec, spaces.describe(self.space, setting), self.data, self.gate,
                            self.timer, self.store, self.seed)
            self.store.add(trial)
        if trial.feasible and (self.best is None or trial.cost(self.objective) < self.best.cost(self.objective)):
            self.best = trial
        if fresh:
            self.progress(trial, self.best, max(0.0, self.deadline - time.monotonic()))
        return trial


def search(model: str, data, *, timer: Timer, timed_on: str, folder: Path, max_drop: float | None = None,
           min_cosine: float | None = None, objective: str = "latency", budget_s: float = 1200.0,
           int8_lowering: bool = False, seed: int = 0,
           progress: Callable[[Trial, Trial | None, float], None] | None = None) -> SearchResult:
    """Search for the cheapest pipeline on `model` whose result stays within `max_drop` points of
    top-1 (or above `min_cosine`) on the held-aside part of `data`. `timer` times a candidate
    (`timed_on` says where, for the report); `folder` keeps the measured candidates."""
    from graphopt.ir import io

    if objective not in ("latency", "size"):
        raise ValueError(f"objective {objective!r}: latency or size")
    space = spaces.knobs(io.load(model), objective, int8_lowering)
    gate = {"max_drop": max_drop, "min_cosine": min_cosine}
    start = time.monotonic()
    walk = _Walk(model, data, gate, timer, Store(folder), space, objective, start + budget_s, seed,
                 progress or (lambda trial, best, left: None))
    baseline = walk.measure((0,) * len(space))
    if baseline is None or not baseline.feasible:
        raise GateError(f"{model}: the search's baseline (canonicalize) is already outside the budget: "
                        f"{baseline.reason if baseline else 'no time to measure it'}")
    ranked = _rank(walk, baseline)
    _greedy(walk, ranked, baseline)
    trials = list(walk.store.trials.values())
    section = _section(walk, baseline, trials, timed_on, budget_s, time.monotonic() - start)
    return SearchResult(walk.best.spec, section)


def _rank(walk: _Walk, baseline: Trial) -> list[int]:
    """Knob indices whose first level alone stays within the budget, the most cost saved per
    point of quality lost first."""
    scores = {}
    for i in range(len(walk.space)):
        setting = tuple(1 if j == i else 0 for j in range(len(walk.space)))
        trial = walk.measure(setting)
        if trial is None:
            break
        if trial.feasible:
            saved = 1 - trial.cost(walk.objective) / baseline.cost(walk.objective)
            lost = max(0.0, (baseline.quality() or 0) - (trial.quality() or 0))
            scores[i] = saved / (lost + 0.05)
    return sorted(scores, key=scores.get, reverse=True)


def _greedy(walk: _Walk, ranked: list[int], baseline: Trial) -> None:
    """Raise the ranked knobs one level at a time on top of what is kept, up to the first level
    outside the gate (the walk backs off there), and keep the knob's cheapest level if it saves
    MIN_GAIN of the cost. Every level up to the gate is measured, not only while each saves:
    on a small model one level can time the same as the last and the next save much more."""
    current = [0] * len(walk.space)
    kept = baseline
    changed = True
    while changed:
        changed = False
        for i in ranked:
            best_level, best = current[i], kept
            for level in range(current[i] + 1, len(walk.space[i].levels) + 1):
                trial = walk.measure(tuple(current[:i] + [level] + current[i + 1:]))
                if trial is None:
                    return
                if not trial.feasible:
                    break
                if trial.cost(walk.objective) < best.cost(walk.objective):
                    best_level, best = level, trial
            if best_level != current[i] and best.cost(walk.objective) < (1 - MIN_GAIN) * kept.cost(walk.objective):
                current[i], kept, changed = best_level, best, True


def _section(walk: _Walk, baseline: Trial, trials: list[Trial], timed_on: str, budget_s: float,
             elapsed: float) -> dict:
    from graphopt.report_html import pareto_front

    cost = "latency_ms" if walk.objective == "latency" else "compressed_bytes"
    quality = "accuracy" if baseline.accuracy is not None else "cosine"
    rows = [asdict(t) for t in trials]
    feasible = [r for r in rows if r["feasible"] and r[cost] is not None and r[quality] is not None]
    return {"objective": walk.objective, "cost": cost, "quality": quality, "timed_on": timed_on,
            "gate": {k: v for k, v in walk.gate.items() if v is not None},
            "budget_s": budget_s, "elapsed_s": round(elapsed, 1),
            "knobs": {k.name: list(k.levels) for k in walk.space},
            "strategy": "greedy with backtracking, knobs ranked by cost saved per quality point lost alone",
            "baseline": asdict(baseline), "chosen": asdict(walk.best),
            "speedup" if walk.objective == "latency" else "compression":
                round(baseline.cost(walk.objective) / walk.best.cost(walk.objective), 3),
            "candidates": rows, "pareto": pareto_front(feasible, cost, quality)}
