"""The quality gate: what a pipeline may cost, measured after every pass on held-aside data.

The user's gate (`--max-drop`, `--min-cosine`) is measured against the ORIGINAL model's outputs on
samples no pass calibrated on:
- `max_drop` (percentage points): top-1 accuracy of the first output against labels `y` when the
  data has them, else top-1 agreement with the original model's predictions (a classifier's first
  output: [batch, classes]);
- `min_cosine`: the lowest cosine similarity over the outputs.
Without a user gate, each LOSSY pass is held to its own declared bound (`LOSSY(cosine >= b)`)
against the model it was given; a user gate replaces those bounds (the user has said what they
accept). A pass that crosses raises `GateError` (exit 4), before anything is written.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphopt.ir import fidelity
from graphopt.ir.errors import GateError, PipelineError


@dataclass
class Gate:
    reference: dict[str, np.ndarray]         # the original model's outputs on the held-aside samples
    labels: np.ndarray | None = None         # their labels, when the data has `y`
    max_drop: float | None = None            # percentage points
    min_cosine: float | None = None
    samples: int = 0

    def __post_init__(self):
        if self.max_drop is not None and self.max_drop < 0:
            raise PipelineError(f"--max-drop {self.max_drop}: give a non-negative number of percentage points")
        if self.min_cosine is not None and not -1 <= self.min_cosine <= 1:
            raise PipelineError(f"--min-cosine {self.min_cosine}: a cosine similarity is in [-1, 1]")
        if self.max_drop is not None and self.labels is None and _scores(self.reference) is None:
            raise PipelineError("--max-drop needs labels (an array `y` in --data) or a classifier whose first "
                                "output is [batch, classes]; for other models use --min-cosine")

    @property
    def user_set(self) -> bool:
        return self.max_drop is not None or self.min_cosine is not None

    def top1(self, outputs: dict[str, np.ndarray]) -> float | None:
        """Percent top-1 accuracy against the labels, or agreement with the original's predictions;
        None when neither can be measured."""
        predicted = _predictions(outputs)
        if predicted is None:
            return None
        truth = self.labels if self.labels is not None else _predictions(self.reference)
        if truth is None or len(truth) != len(predicted):
            return None
        return 100.0 * float(np.mean(predicted == np.asarray(truth).reshape(predicted.shape)))

    def metric(self) -> str:
        return "top-1 accuracy" if self.labels is not None else "top-1 agreement with the original"

    def check(self, pass_name: str, outputs: dict[str, np.ndarray]) -> None:
        """GateError when the model after `pass_name` crosses the user's gate."""
        where = f"on {self.samples} held-aside samples" if self.samples else "on the held-aside samples"
        if self.max_drop is not None:
            before, after = self.top1(self.reference), self.top1(outputs)
            if before is not None and after is not None and before - after > self.max_drop + 1e-9:
                raise GateError(f"pass '{pass_name}' drops {self.metric()} from {before:.2f}% to {after:.2f}% "
                                f"({before - after:.2f} points) {where}, more than --max-drop {self.max_drop:g}%; "
                                f"nothing written")
        if self.min_cosine is not None:
            name, cosine = lowest_cosine(self.reference, outputs)
            if cosine < self.min_cosine:
                raise GateError(f"pass '{pass_name}' leaves output '{name}' at cosine {cosine:.4f} against the "
                                f"original {where}, below --min-cosine {self.min_cosine:g}; nothing written")


def lossy_violation(bound: float, given: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> str | None:
    """Why a LOSSY(cosine >= bound) pass broke its bound against the model it was given, or None."""
    name, cosine = lowest_cosine(given, outputs)
    if cosine >= bound:
        return None
    return (f"output '{name}' cosine {cosine:.4f} is below the pass's declared bound {bound:g}; choose a gentler "
            f"option, or accept the loss with --min-cosine / --max-drop")


def lowest_cosine(reference: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> tuple[str, float]:
    """The output with the lowest cosine similarity to the reference, and that cosine."""
    cosines = {k: fidelity.measure(v, outputs[k]).cosine for k, v in reference.items()
               if np.issubdtype(np.asarray(v).dtype, np.number)}
    if not cosines:
        return "", 1.0
    name = min(cosines, key=cosines.get)
    return name, cosines[name]


def _scores(outputs: dict[str, np.ndarray]) -> np.ndarray | None:
    """The first output when it holds per-class scores: float [batch, classes >= 2]."""
    first = np.asarray(next(iter(outputs.values())))
    if first.ndim == 2 and first.shape[1] >= 2 and np.issubdtype(first.dtype, np.floating):
        return first
    return None


def _predictions(outputs: dict[str, np.ndarray]) -> np.ndarray | None:
    """Predicted classes: argmax of per-class scores, or the first output itself when it is
    integer labels [batch] (a scikit-learn classifier's label output)."""
    scores = _scores(outputs)
    if scores is not None:
        return np.argmax(scores, axis=1)
    first = np.asarray(next(iter(outputs.values())))
    if first.ndim == 1 and np.issubdtype(first.dtype, np.integer):
        return first
    return None
