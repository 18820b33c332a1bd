import numpy as np
import pytest

from graphopt.kernels import histogram


def slow_kl_index(hist: np.ndarray, levels: int) -> int:
    """TensorRT's search written plainly, with numpy per candidate."""
    best, best_i = np.inf, len(hist)
    for i in range(levels, len(hist) + 1):
        p = hist[:i].astype(np.float64).copy()
        p[i - 1] += hist[i:].sum()
        q = np.zeros(i)
        for j in range(levels):
            lo, hi = j * i // levels, (j + 1) * i // levels
            chunk = hist[lo:hi]
            nz = chunk > 0
            if nz.any():
                q[lo:hi][nz] = chunk.sum() / nz.sum()
        pn, qn = p / p.sum(), q / q.sum()
        mask = pn > 0
        d = np.inf if np.any(qn[mask] == 0) else float(np.sum(pn[mask] * np.log(pn[mask] / qn[mask])))
        if d < best:
            best, best_i = d, i
    return best_i


def slow_mse(hist, top, levels, stride):
    width = top / len(hist)
    c = (np.arange(len(hist)) + 0.5) * width
    errs = {}
    for i in range(stride, len(hist) + 1, stride):
        t, step = i * width, i * width / levels
        inside = np.where(width >= step, step * step / 12, (c - np.round(c / step) * step) ** 2)
        errs[i] = float(np.sum(hist * np.where(c >= t, (c - t) ** 2, inside)))
    return min(errs, key=errs.get)


def test_accumulate_matches_one_histogram_and_grows_range():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(5000), 3 * rng.standard_normal(5000)
    hist, top = histogram.accumulate(None, 0.0, a, bins=256)
    hist, top = histogram.accumulate(hist, top, b, bins=256)
    assert hist.sum() == 10000
    assert top >= np.abs(np.concatenate([a, b])).max()
    # Counts of the second batch are exact; re-binned first-batch counts move by at most one bin.
    ref = np.histogram(np.abs(np.concatenate([a, b])), bins=256, range=(0, top))[0]
    assert np.abs(np.cumsum(hist) - np.cumsum(ref)).max() <= np.abs(a).size * 0.02


def test_kl_index_matches_slow_reference():
    rng = np.random.default_rng(1)
    values = np.abs(np.concatenate([rng.standard_normal(20000), 8 * rng.standard_normal(50)]))
    hist = np.histogram(values, bins=512, range=(0, values.max()))[0].astype(np.float64)
    assert histogram.kl_index(hist, 64) == slow_kl_index(hist, 64)


def test_kl_threshold_clips_outliers_and_keeps_discrete_data():
    rng = np.random.default_rng(2)
    values = np.abs(np.concatenate([rng.standard_normal(100000), [50.0]]))
    hist, top = histogram.accumulate(None, 0.0, values)
    assert 2.0 < histogram.kl_threshold(hist, top) < 10.0
    pixels = np.arange(17) / 16.0
    hist, top = histogram.accumulate(None, 0.0, np.repeat(pixels, 100))
    assert histogram.kl_threshold(hist, top) == pytest.approx(1.0, rel=1e-3)


def test_mse_matches_slow_reference_and_percentile():
    rng = np.random.default_rng(3)
    values = np.abs(rng.laplace(size=50000))
    hist, top = histogram.accumulate(None, 0.0, values, bins=512)
    assert histogram.mse_index(hist, top, 127, 4) == slow_mse(hist, top, 127, 4)
    t = histogram.percentile_threshold(hist, top, 99.0)
    assert t == pytest.approx(np.percentile(values, 99.0), abs=2 * top / 512)
