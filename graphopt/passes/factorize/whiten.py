"""The linear algebra of data-aware low-rank factorization: truncations that minimise a layer's
OUTPUT error on calibration activations rather than its weight error, and least-squares refits.

A layer computes y = W x with W [outputs, K] and inputs x whose second moment is H = E[x xᵀ]
(graphopt.passes.activations). Its mean squared output error under a replacement Ŵ is
tr((W - Ŵ) H (W - Ŵ)ᵀ) = ‖(W - Ŵ) L‖²_F for any L with L Lᵀ = H. So the best rank-r Ŵ for the
output is the truncated SVD of W L mapped back, Ŵ = U_r S_r V_rᵀ L⁻¹ (SVD-LLM, Wang et al. 2024;
"data-aware low-rank" as in Zhang et al. 2015's GSVD), and the tail of W L's squared singular
values is that rank's squared output error.

H from a few hundred samples is often singular (more features than rows, or inputs a ReLU never
lets through), so L is the Cholesky factor of H + λI with λ = damping x mean(diag H): the damped
objective adds λ‖W - Ŵ‖², which keeps directions the calibration never excited close to the
original weight instead of leaving them free. The refits then solve the undamped problem for the
factor that is not whitened, which can only lower the calibration output error (the truncated
factor is one feasible point of that least-squares problem).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphopt.passes.activations import LayerStats

# Cholesky is retried with this much more damping each time H + λI is numerically not positive
# definite (a nearly rank-deficient H in float64), at most _RETRIES times.
_GROWTH, _RETRIES = 10.0, 6
# Relative ridge of the refits' normal equations: only there to keep a singular system solvable.
_RIDGE = 1e-9


@dataclass(frozen=True)
class Moments:
    """A layer's input statistics over the calibration data: `second` = E[x xᵀ] [K, K] and
    `mean` = E[x] [K] (float64), over `rows` rows."""
    second: np.ndarray
    mean: np.ndarray
    rows: int

    @staticmethod
    def of(stats: LayerStats) -> Moments:
        """Group 0 of a layer's statistics (the factorization passes take ungrouped layers only)."""
        return Moments(stats.hessian[0], stats.mean[0], stats.rows_seen)

    def estimate(self, centered: bool) -> np.ndarray:
        """E[x xᵀ], or with `centered` E[(x - mean)(x - mean)ᵀ] (the part a bias cannot absorb),
        shrunk towards a multiple of the identity as far as the number of rows warrants."""
        moment = self.second - np.outer(self.mean, self.mean) if centered else self.second
        return shrunk(moment, self.rows)


def shrunk(s: np.ndarray, rows: int) -> np.ndarray:
    """The oracle approximating shrinkage estimate (Chen et al. 2010, as scikit-learn's OAS) of a
    second moment `s` measured on `rows` rows: (1 - ρ) s + ρ mean(diag s) I. With fewer rows than
    inputs s is singular, and a truncation fitted to it alone fits those rows exactly and fails on
    new ones (measured: romanizer-decoder's 256-input Gemms from 64 rows); ρ says how far to trust it."""
    p = s.shape[0]
    mu = float(np.trace(s)) / p
    alpha = float(np.mean(s**2))
    den = (rows + 1) * (alpha - mu**2 / p)
    rho = 1.0 if den <= 0 else min((alpha + mu**2) / den, 1.0)
    out = (1.0 - rho) * s
    out.flat[::p + 1] += rho * mu
    return out


def damped_cholesky(h: np.ndarray, damping: float) -> np.ndarray:
    """Lower-triangular L with L Lᵀ = H + λI, λ = damping x mean(diag H) (float64)."""
    h = np.asarray(h, np.float64)
    lam = _damping(h, damping)
    eye = np.eye(h.shape[0])
    for _ in range(_RETRIES):
        try:
            return np.linalg.cholesky(h + lam * eye)
        except np.linalg.LinAlgError:
            lam *= _GROWTH
    return np.linalg.cholesky(h + lam * eye)  # raises with numpy's own message if still failing


def _damping(h: np.ndarray, damping: float) -> float:
    scale = float(np.mean(np.diag(h))) if h.size else 0.0
    scale = scale if scale > 0 else 1.0  # inputs always zero: any λ > 0 whitens nothing
    return max(damping, np.finfo(np.float64).eps) * scale


def whitened_svd(w: np.ndarray, l: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SVD of W L: (U [outputs, k], s [k], V_ᵀL⁻¹ [k, K]) with k = min(outputs, K), so that
    W = U diag(s) (VᵀL⁻¹) and the rank-r truncation keeps the first r of each."""
    u, s, vt = np.linalg.svd(w @ l, full_matrices=False)
    # Vᵀ L⁻¹ = (L⁻ᵀ V)ᵀ: a solve with Lᵀ, never an explicit inverse.
    return u, s, np.linalg.solve(l.T, vt.T).T


def whitened_rows(w: np.ndarray, l: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """whitened_svd's (s, VᵀL⁻¹) alone, from the eigenvectors of (W L)ᵀ(W L) [K, K]: for a tall W
    (a conv's weight stacked over kernel positions) far cheaper than its SVD."""
    m = w @ l
    values, vectors = np.linalg.eigh(m.T @ m)
    order = np.argsort(values)[::-1][:min(w.shape)]
    return np.sqrt(np.maximum(values[order], 0.0)), np.linalg.solve(l.T, vectors[:, order]).T


def whitened_spectrum(w: np.ndarray, h: np.ndarray, damping: float) -> np.ndarray:
    """The min(outputs, K) singular values of W L (L Lᵀ = H + λI, λ as damped_cholesky's first
    try), descending, from the eigenvalues of W (H + λI) Wᵀ: no K x K factorization."""
    values = np.linalg.eigvalsh(w @ (h + _damping(h, damping) * np.eye(h.shape[0])) @ w.T)[::-1]
    return np.sqrt(np.maximum(values[:min(w.shape)], 0.0))


def solve_psd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """X with X A = B for a symmetric positive semi-definite A, ridged so a singular A still solves.
    The ridge is relative to A's mean diagonal, and absolute when A is zero (inputs the calibration
    never excited): a ridge scaled by a zero would be denormal, and LAPACK's pivots of it inf/NaN."""
    scale = float(np.trace(a)) / max(a.shape[0], 1)
    ridge = _RIDGE * (scale if scale > 0 else 1.0)
    return np.linalg.solve(a + ridge * np.eye(a.shape[0]), b.T).T


def refit_output_factor(w: np.ndarray, first: np.ndarray, h: np.ndarray, unfit: np.ndarray) -> np.ndarray:
    """The U minimising tr((W - U A) H (W - U A)ᵀ) for a fixed first factor A [r, K]:
    U = W H Aᵀ (A H Aᵀ)⁻¹, the least-squares fit of the layer's outputs from A x. Where the
    calibration inputs never reach A's span (A H Aᵀ = 0, e.g. an input that is zero on every
    sample) any U fits them, and the truncation's own factor `unfit` is kept."""
    ha = h @ first.T
    inner = first @ ha
    if not np.trace(inner) > 0:
        return unfit
    return solve_psd(inner, w @ ha)


def output_error(w: np.ndarray, approx: np.ndarray, h: np.ndarray) -> float:
    """Relative output error sqrt(tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)) over the calibration inputs."""
    total = float(np.sum((w @ h) * w))
    delta = w - approx
    error = float(np.sum((delta @ h) * delta))
    return float(np.sqrt(max(error, 0.0) / total)) if total > 0 else 0.0


def channel_covariance(h: np.ndarray, channels: int) -> np.ndarray:
    """A Conv input's per-channel second moment [C, C] from the H of its unfolded rows
    [(C, kernel), (C, kernel)]: the diagonal blocks over kernel positions, averaged."""
    kernel = h.shape[0] // channels
    return np.einsum("apbp->ab", h.reshape(channels, kernel, channels, kernel)) / kernel


def channel_projection_cross(h: np.ndarray, project: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows x [(C, kernel)] and z = (A ⊗ I) x (A [r, C] applied per kernel position): E[x zᵀ]
    [(C, kernel), (r, kernel)] and E[z zᵀ] [(r, kernel), (r, kernel)], from H = E[x xᵀ]."""
    r, channels = project.shape
    kernel = h.shape[0] // channels
    h4 = h.reshape(channels, kernel, channels, kernel)
    cross = np.einsum("apbq,rb->aprq", h4, project, optimize=True)
    inner = np.einsum("sa,aprq->sprq", project, cross, optimize=True)
    return cross.reshape(channels * kernel, r * kernel), inner.reshape(r * kernel, r * kernel)
