"""How far a model's outputs are from a reference: max-abs error, cosine similarity, SQNR (dB)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Fidelity:
    max_abs: float
    cosine: float
    sqnr_db: float

    def as_dict(self) -> dict:
        return asdict(self)


def measure(reference: np.ndarray, candidate: np.ndarray) -> Fidelity:
    """Metrics in float64; identical outputs give SQNR = inf and cosine = 1."""
    ref = np.asarray(reference, dtype=np.float64).ravel()
    out = np.asarray(candidate, dtype=np.float64).ravel()
    if ref.shape != out.shape:
        raise ValueError(f"output shapes differ: {np.shape(reference)} vs {np.shape(candidate)}")
    err = out - ref
    max_abs = float(np.max(np.abs(err))) if err.size else 0.0
    noise, signal = float(err @ err), float(ref @ ref)
    norms = np.sqrt(signal * float(out @ out))
    cosine = float(ref @ out / norms) if norms > 0 else float(noise == 0)
    sqnr = float("inf") if noise == 0 else 10 * np.log10(max(signal, 1e-300) / noise)
    return Fidelity(max_abs, cosine, sqnr)


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> dict[str, Fidelity]:
    """Per-output metrics; outputs are matched by name."""
    missing = set(reference) - set(candidate)
    if missing:
        raise ValueError(f"candidate lacks outputs {sorted(missing)}")
    return {name: measure(reference[name], candidate[name]) for name in reference}
