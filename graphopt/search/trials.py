"""One candidate of the search, measured: its pipeline run on the model, its quality on the
held-aside data, its cost on the target. And the folder that keeps every measured candidate, so
that a search run again (after an interruption, or with a larger budget) measures nothing twice.

Quality: top-1 accuracy against the labels in the data (or agreement with the original's
predictions) and the lowest output cosine, both on the half of the data no pass calibrated on
(`graphopt.optimize` splits it). The user's gate (`max_drop`, `min_cosine`) is enforced after
every pass as in `graphopt optimize`: a candidate that crosses it is infeasible, with the reason.
Cost: latency in ms on the target (the TVM library compiled for it where it runs here, else
onnxruntime on this machine), and size in bytes (serialized, then zlib: what sparsity saves shows).
Latencies are cached by the SHA-256 of the candidate's ONNX: two pipelines that write the same
model are timed once.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from graphopt.ir.errors import GraphoptError

TRIALS_FILE = "trials.jsonl"
LATENCY_FILE = "latency.json"


@dataclass
class Trial:
    """A measured candidate. `feasible` is False when the gate refused it (`reason` says why)."""

    spec: str
    what: str                       # the knob levels, in words
    feasible: bool
    reason: str = ""
    accuracy: float | None = None   # percent, on the held-aside samples
    cosine: float | None = None     # the lowest output cosine against the original there
    latency_ms: float | None = None
    size_bytes: int | None = None
    compressed_bytes: int | None = None
    macs: int | None = None
    seconds: float = 0.0            # what measuring it took
    extra: dict = field(default_factory=dict)

    def cost(self, objective: str) -> float | None:
        if objective == "size":
            return self.compressed_bytes if self.compressed_bytes is not None else self.size_bytes
        return self.latency_ms

    def quality(self) -> float | None:
        return self.accuracy if self.accuracy is not None else self.cosine


class Store:
    """The search folder: trials.jsonl (one measured candidate a line, appended as it is measured)
    and latency.json (ms by model SHA-256)."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.trials: dict[str, Trial] = {}
        path = folder / TRIALS_FILE
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                trial = Trial(**json.loads(line))
            except (ValueError, TypeError):  # a line cut short by a killed run
                continue
            self.trials[trial.spec] = trial
        latency = folder / LATENCY_FILE
        self.latency: dict[str, float] = json.loads(latency.read_text()) if latency.exists() else {}

    def add(self, trial: Trial) -> None:
        self.trials[trial.spec] = trial
        with open(self.folder / TRIALS_FILE, "a") as f:
            f.write(json.dumps(asdict(trial)) + "\n")

    def remember_latency(self, digest: str, ms: float) -> None:
        self.latency[digest] = ms
        tmp = self.folder / (LATENCY_FILE + ".tmp")
        tmp.write_text(json.dumps(self.latency))
        os.replace(tmp, self.folder / LATENCY_FILE)


Timer = Callable[[onnx.ModelProto, dict[str, np.ndarray]], float]


def measure(model: str, spec: str, what: str, data, gate: dict, timer: Timer, store: Store, seed: int) -> Trial:
    """Run `spec` on `model` with `data` under the user's `gate` ({max_drop, min_cosine}) and
    measure the result; a refused candidate is a Trial with feasible=False."""
    from graphopt.ir.graph import export
    from graphopt.optimize import one_sample, optimize

    start = time.perf_counter()
    try:
        result = optimize(model, spec, data=data, seed=seed, latency=False, **gate)
    except GraphoptError as e:
        return Trial(spec, what, feasible=False, reason=str(e), seconds=round(time.perf_counter() - start, 2))
    report = result.report
    proto = export(result.graph)
    digest = hashlib.sha256(proto.SerializeToString()).hexdigest()
    latency = store.latency.get(digest)
    if latency is None:
        latency = timer(proto, one_sample(result.graph, result.feeds))
        store.remember_latency(digest, latency)
    cosines = [o.get("cosine") for o in report["fidelity"]["outputs"].values() if o.get("cosine") is not None]
    return Trial(spec, what, feasible=True, accuracy=report.get("accuracy", {}).get("after"),
                 cosine=round(min(cosines), 6) if cosines else None, latency_ms=round(latency, 5),
                 size_bytes=report["after"]["size_bytes"], compressed_bytes=report["after"].get("compressed_bytes"),
                 macs=report["after"].get("macs"), seconds=round(time.perf_counter() - start, 2))
