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


CHUNK = 1 << 20


def measure(reference: np.ndarray, candidate: np.ndarray) -> Fidelity:
    """Metrics in float64; identical outputs give SQNR = inf and cosine = 1. Sums run over chunks,
    so measuring a weight of a large model holds no float64 copy of it."""
    ref_all, out_all = np.asarray(reference).reshape(-1), np.asarray(candidate).reshape(-1)
    if np.shape(reference) != np.shape(candidate):
        raise ValueError(f"output shapes differ: {np.shape(reference)} vs {np.shape(candidate)}")
    max_abs = noise = signal = power = dot = 0.0
    for start in range(0, ref_all.size, CHUNK):
        ref = ref_all[start:start + CHUNK].astype(np.float64)
        out = out_all[start:start + CHUNK].astype(np.float64)
        err = out - ref
        max_abs = max(max_abs, float(np.max(np.abs(err))))
        noise, signal, power, dot = noise + float(err @ err), signal + float(ref @ ref), power + float(out @ out), \
            dot + float(ref @ out)
    norms = np.sqrt(signal * power)
    cosine = float(dot / norms) if norms > 0 else float(noise == 0)
    sqnr = float("inf") if noise == 0 else 10 * np.log10(max(signal, 1e-300) / noise)
    return Fidelity(max_abs, cosine, sqnr)


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> dict[str, Fidelity]:
    """Per-output metrics; outputs are matched by name."""
    missing = set(reference) - set(candidate)
    if missing:
        raise ValueError(f"candidate lacks outputs {sorted(missing)}")
    return {name: measure(reference[name], candidate[name]) for name in reference}
