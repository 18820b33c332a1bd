"""Rank selection for the low-rank factorization passes.

The singular values are those of the weight (method="weights": the error is the weight's) or of
the whitened weight W L (method="whitened": the error is the layer's output error on the
calibration inputs; graphopt.passes.factorize.whiten).

A rank comes from one criterion: an explicit `rank`, the `energy` (fraction of the squared
singular values kept), `max_error` (the relative error those left out make: sqrt of their share of
the squares), a fraction of parameters kept (`keep`, from the `ratio` option or from a sensitivity
allocation), or `vbmf`: the rank that empirical variational Bayesian matrix factorization keeps
(Nakajima et al. 2013, "Global analytic solution of fully-observed variational Bayesian matrix
factorization", JMLR 14; as used for Tucker ranks by Kim et al. 2016).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Nakajima et al. approximate the threshold's tau-bar by 2.5129 * sqrt(alpha) (their eq. 23).
_TAU_BAR = 2.5129
# Points of each of the two grids the noise variance is searched on (a coarse one, then one
# between the coarse minimum's neighbours): the objective is smooth and unimodal in practice.
_GRID = 400


@dataclass(frozen=True)
class Criterion:
    """Exactly one field set: how the rank of one layer (or of each mode of it) is chosen."""
    rank: int | None = None
    energy: float | None = None
    max_error: float | None = None
    keep: float | None = None
    vbmf: bool = False

    def describe(self) -> str:
        if self.rank is not None:
            return f"rank={self.rank}"
        if self.energy is not None:
            return f"energy={self.energy:g}"
        if self.max_error is not None:
            return f"max_error={self.max_error:g}"
        if self.keep is not None:
            return f"params kept={self.keep:.4g}"
        return "vbmf"


def energy_rank(singular_values: np.ndarray, energy: float) -> int:
    """The smallest rank whose singular values hold `energy` of the sum of their squares."""
    squares = np.asarray(singular_values, np.float64) ** 2
    total = squares.sum()
    if total == 0:
        return 1
    # A relative epsilon: energy=1.0 must stop at the last non-zero value, not miss it by rounding.
    cumulative = np.cumsum(squares) / total
    return min(int(np.searchsorted(cumulative, energy - 1e-12)) + 1, squares.size)


def error_rank(singular_values: np.ndarray, max_error: float) -> int:
    """The smallest rank whose left-out singular values make a relative error of at most
    `max_error`: sqrt(sum of the left-out squares / sum of all squares) <= max_error."""
    return energy_rank(singular_values, 1.0 - max_error**2)


def energy_kept(singular_values: np.ndarray, rank: int) -> float:
    squares = np.asarray(singular_values, np.float64) ** 2
    total = squares.sum()
    return float(squares[:rank].sum() / total) if total > 0 else 1.0


def svd_keep_rank(m: int, n: int, keep: float) -> int:
    """The largest rank r with r * (m + n) <= keep * m * n, at least 1."""
    return max(1, math.floor(keep * m * n / (m + n) + 1e-9))


def tucker_keep_ranks(c_out: int, c_in: int, kernel: int, keep: float) -> tuple[int, int]:
    """Ranks (out, in) in proportion to the channels whose Tucker-2 factors hold at most `keep` of
    the c_out * c_in * kernel weights: a * (c_in^2 + c_out^2) + a^2 * c_in * c_out * kernel
    = keep * c_in * c_out * kernel, solved for the fraction a."""
    b = c_in**2 + c_out**2
    c = c_in * c_out * kernel
    a = (-b + math.sqrt(b * b + 4 * c * keep * c)) / (2 * c)
    return max(1, math.floor(a * c_out + 1e-9)), max(1, math.floor(a * c_in + 1e-9))


def evbmf_rank(singular_values: np.ndarray, shape: tuple[int, int]) -> int:
    """How many components EVBMF keeps of a matrix of `shape` with these singular values (all of
    them), the noise variance estimated too.

    A component survives when its singular value exceeds sqrt(M * sigma2 * (1 + tau)(1 + alpha/tau))
    for the L x M orientation with L <= M, alpha = L / M, tau = 2.5129 sqrt(alpha).
    """
    rows, cols = sorted(shape)
    s = np.asarray(singular_values, np.float64)
    alpha = rows / cols
    tau = _TAU_BAR * math.sqrt(alpha)
    x_bar = (1 + tau) * (1 + alpha / tau)
    sigma2 = _noise_variance(s, rows, cols, x_bar)
    return int(np.count_nonzero(s > math.sqrt(cols * sigma2 * x_bar)))


def _noise_variance(s: np.ndarray, rows: int, cols: int, x_bar: float) -> float:
    """The sigma^2 minimising the EVBMF free energy, searched between Nakajima et al.'s bounds."""
    squares = s**2
    upper = squares.sum() / (rows * cols)
    if upper == 0:
        return 0.0
    alpha = rows / cols
    # Components past this index cannot all be signal (the paper's bound on the EVBMF rank).
    tail = min(math.ceil(rows / (1 + alpha)) - 1, s.size - 1)
    lower = max(squares[tail] / (cols * x_bar), squares[tail:].mean() / cols, upper * 1e-12)
    if lower >= upper:
        return upper
    grid = np.geomspace(lower, upper, _GRID)
    best = int(np.argmin(_free_energy(grid, squares, cols, alpha, x_bar)))
    fine = np.geomspace(grid[max(best - 1, 0)], grid[min(best + 1, _GRID - 1)], _GRID)
    return float(fine[np.argmin(_free_energy(fine, squares, cols, alpha, x_bar))])


def _free_energy(sigma2: np.ndarray, squares: np.ndarray, cols: int, alpha: float, x_bar: float) -> np.ndarray:
    """The EVBMF objective at each candidate sigma^2 (one row of the grid per candidate)."""
    x = np.maximum(squares[None, :] / (cols * sigma2[:, None]), np.finfo(np.float64).tiny)
    shifted = x - (1 + alpha)
    # Positive wherever x > x_bar, the only place it counts; clipped elsewhere to keep logs finite.
    tau = np.maximum(0.5 * (shifted + np.sqrt(np.maximum(shifted**2 - 4 * alpha, 0.0))), 0.0)
    signal = np.log(tau + 1) + alpha * np.log(tau / alpha + 1) - tau
    return np.sum(x - np.log(x) + np.where(x > x_bar, signal, 0.0), axis=1)
