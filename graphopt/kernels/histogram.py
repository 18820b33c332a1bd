"""Histograms of |x| and the clipping-threshold searches calibration runs over them.

A histogram covers [0, top) in `bins` equal bins. When a batch holds a value past `top`, the range
grows and the old counts are re-binned (each old bin's count lands in the new bin holding its
centre), so statistics accumulate batch by batch without keeping activations, as onnxruntime's
and TensorRT's histogram calibrators do. The searches (`kl_threshold`, `mse_threshold`) are numba
loops over bins, never over elements.
"""
from __future__ import annotations

import numba
import numpy as np

BINS = 2048


@numba.njit(cache=True, nogil=True)
def _count_abs(values: np.ndarray, top: float, hist: np.ndarray) -> None:
    bins = hist.shape[0]
    scale = bins / top
    for v in values:
        a = abs(v)
        if a != a:  # NaN carries no range information
            continue
        i = int(a * scale)
        hist[min(i, bins - 1)] += 1


def rebin(hist: np.ndarray, top: float, new_top: float) -> np.ndarray:
    """`hist` over [0, top) re-expressed over [0, new_top), new_top >= top."""
    bins = hist.shape[0]
    centres = (np.arange(bins) + 0.5) * (top / bins)
    target = np.minimum((centres * (bins / new_top)).astype(np.int64), bins - 1)
    return np.bincount(target, weights=hist, minlength=bins)


def accumulate(hist: np.ndarray | None, top: float, values: np.ndarray, bins: int = BINS
               ) -> tuple[np.ndarray, float]:
    """Add |values| to `hist` (None starts one); returns the histogram and its (maybe grown) top."""
    flat = np.ascontiguousarray(values, dtype=np.float32).ravel()
    amax = float(np.nanmax(np.abs(flat))) if flat.size else 0.0
    if hist is None:
        hist, top = np.zeros(bins, np.float64), max(amax, 1e-12)
    elif amax > top:
        # Grow by at least 10% so a slowly rising maximum does not re-bin on every batch.
        new_top = max(amax, top * 1.1)
        hist, top = rebin(hist, top, new_top), new_top
    _count_abs(flat, np.float32(top), hist)
    return hist, top


def percentile_threshold(hist: np.ndarray, top: float, percentile: float) -> float:
    """The upper edge of the bin where the cumulative share of |x| reaches `percentile` (0-100)."""
    total = hist.sum()
    if total == 0:
        return 0.0
    cdf = np.cumsum(hist) / total
    i = int(np.searchsorted(cdf, percentile / 100.0))
    return (min(i, len(hist) - 1) + 1) * top / len(hist)


@numba.njit(cache=True, nogil=True)
def _kl(p: np.ndarray, q: np.ndarray) -> float:
    ps, qs = p.sum(), q.sum()
    d = 0.0
    for i in range(p.shape[0]):
        if p[i] > 0:
            if q[i] == 0:
                return np.inf
            d += (p[i] / ps) * np.log((p[i] / ps) / (q[i] / qs))
    return d


@numba.njit(cache=True, nogil=True)
def kl_index(hist: np.ndarray, levels: int) -> int:
    """TensorRT's entropy calibration: the bin count i (levels <= i <= bins) whose clipped
    distribution P (outliers folded into the last bin) is closest in KL divergence to Q, P
    quantized to `levels` levels and expanded back over P's non-empty bins."""
    bins = hist.shape[0]
    best, best_i = np.inf, bins
    for i in range(levels, bins + 1):
        p = hist[:i].copy()
        p[i - 1] += hist[i:].sum()
        q = np.zeros(i)
        for j in range(levels):
            lo = j * i // levels
            hi = (j + 1) * i // levels
            total, nonzero = 0.0, 0
            for k in range(lo, hi):
                total += hist[k]
                if hist[k] > 0:
                    nonzero += 1
            if nonzero:
                for k in range(lo, hi):
                    if hist[k] > 0:
                        q[k] = total / nonzero
        d = _kl(p, q)
        if d < best:
            best, best_i = d, i
    return best_i


def kl_threshold(hist: np.ndarray, top: float, levels: int = 128) -> float:
    """The entropy-calibrated clipping threshold of |x|; `levels` is the quantized half-range."""
    if hist.sum() == 0:
        return 0.0
    if np.count_nonzero(hist) <= levels:
        # Discrete data (pixels in 1/16 steps, say) leaves most bins empty and the divergence
        # search ill-posed; fewer distinct bins than levels lose nothing to the full range.
        return float(top * (np.flatnonzero(hist)[-1] + 1) / len(hist))
    # Relu outputs pile up in bin 0; that spike would dominate the divergence and pull the
    # threshold in (pytorch-quantization flattens it the same way).
    hist = hist.copy()
    hist[0] = hist[1]
    return kl_index(hist, levels) * top / len(hist)


@numba.njit(cache=True, nogil=True)
def mse_index(hist: np.ndarray, top: float, levels: int, stride: int) -> int:
    """The bin edge T minimising the expected squared error of clipping |x| at T and rounding to
    `levels` steps: bin centres below T pay their rounding error, those above pay (c - T)^2."""
    bins = hist.shape[0]
    width = top / bins
    best, best_i = np.inf, bins
    for i in range(stride, bins + 1, stride):
        t = i * width
        step = t / levels
        err = 0.0
        for k in range(bins):
            if hist[k] == 0:
                continue
            c = (k + 0.5) * width
            if c >= t:
                err += hist[k] * (c - t) ** 2
            else:
                r = c - np.round(c / step) * step
                # Values spread over the bin: their rounding error averages step^2 / 12 when the
                # bin is wider than a step; the centre's own error when it is much narrower.
                err += hist[k] * (step * step / 12.0 if width >= step else r * r)
        if err < best:
            best, best_i = err, i
    return best_i


def mse_threshold(hist: np.ndarray, top: float, levels: int = 127, stride: int = 8) -> float:
    """The MSE-optimal clipping threshold of |x|, searched every `stride` bins."""
    if hist.sum() == 0:
        return 0.0
    return mse_index(hist, top, levels, stride) * top / len(hist)
