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
# Equal up to float rounding (passes' EXACT): the absolute part is scaled by the output's magnitude.
EXACT_RTOL, EXACT_ATOL = 1e-4, 1e-5


def bound_violation(reference: np.ndarray, candidate: np.ndarray, rtol: float, atol: float,
                    scaled: bool, bound: str) -> str | None:
    """Why `candidate` is not within `atol` (x max(1, max|reference|) when `scaled`) + `rtol` x
    |reference| of `reference` everywhere, with the same non-finite values (`bound` names that
    bound in the message); None when it is."""
    ref, out = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    if ref.shape != out.shape:
        return f"shape {out.shape} != {ref.shape}"
    # Rounding error of reassociated float sums scales with the output's magnitude.
    scale = max(1.0, float(np.max(np.abs(ref)))) if ref.size else 1.0
    atol = atol * scale if scaled else atol
    floor = _precision_floor(np.asarray(candidate).dtype)
    if floor:  # float16 sums round at 1e-3: a bound made for float32 would fail any reordering
        atol, rtol = max(atol, floor * scale), max(rtol, floor)
    err = np.abs(out - ref)
    if np.all(err <= atol + rtol * np.abs(ref)) and np.all(np.isfinite(out) == np.isfinite(ref)):
        return None
    return f"max abs error {float(np.nanmax(err)):.3g} exceeds {bound}"


def _precision_floor(dtype: np.dtype) -> float:
    """The least tolerance that outputs of a low-precision float type can be held to: 16 units in
    the last place (float16's sums of a few hundred terms reassociated); 0 for float32 and wider."""
    if dtype == np.float16:
        return 16 * float(np.finfo(np.float16).eps)
    return 0.0


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


def first_non_finite(outputs: dict[str, np.ndarray]) -> str | None:
    """The first floating-point output holding NaN or Inf, or None."""
    for name, value in outputs.items():
        a = np.asarray(value)
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            return name
    return None


def turned_non_finite(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> str | None:
    """The first output that is finite in `reference` and holds NaN or Inf in `candidate`, or None."""
    for name, ref in reference.items():
        if name in candidate and first_non_finite({name: ref}) is None and first_non_finite({name: candidate[name]}):
            return name
    return None


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> dict[str, Fidelity]:
    """Per-output metrics; outputs are matched by name."""
    missing = set(reference) - set(candidate)
    if missing:
        raise ValueError(f"candidate lacks outputs {sorted(missing)}")
    return {name: measure(reference[name], candidate[name]) for name in reference}
