"""GPTQ (Frantar et al. 2022): round a layer's weights onto a given integer grid so that what the
layer outputs on the calibration rows changes as little as a greedy column order allows.

A layer is seen as in `graphopt.passes.activations`: its weight matrix W [rows, K] and the second
moment H = E[xᵀx] [K, K] of the rows it multiplies; the output error of a rounded W' is
tr((W - W') H (W - W')ᵀ). The grid is fixed before GPTQ runs (`weight_quant` chooses the scales:
per output channel, or per group of K), so each element has a scale s_ij and integers in
[qmin, qmax] (symmetric, zero point 0); GPTQ only chooses the integers.

With U the upper Cholesky factor of (H + λI)⁻¹ (UᵀU, λ = `damping` · mean(diag H); H shrunk toward
a multiple of I when it comes from fewer rows than K: `prune.sparsegpt.inverse_factor`), columns
are visited in order (act-order: by descending diag H, the inputs with most energy first, while
the most columns remain to absorb their error); each is rounded to nearest on its grid and its
error e = (w - q·s) / U_jj spread over the columns not yet visited, W[:, j:] -= e ⊗ U[j, j:] (the
Optimal Brain Surgeon update). Lazy batch updates: inside a block of `block_size` columns the
updates touch the block only; the block's errors then move the rest with one matrix product.

Guarantees: integers within [qmin, qmax] on the given grid; a weight already on the grid comes
back exactly (every error is zero, so nothing moves); float64 throughout.
Verified by: tests/passes/quant/test_gptq.py (layer output error on calibration rows against
nearest rounding, exact reconstruction, act-order and blocks against the unblocked loop).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from graphopt.passes.prune.sparsegpt import inverse_factor


def act_order(hessian: np.ndarray) -> np.ndarray:
    """The columns by descending diag(H) (stable, so equal energies keep their order)."""
    return np.argsort(-np.diag(hessian), kind="stable")


def gptq(weight: np.ndarray, scale: np.ndarray, hessian: np.ndarray, qmin: int, qmax: int,
         damping: float = 0.01, block_size: int = 128, order: np.ndarray | None = None,
         rows: int | None = None) -> np.ndarray:
    """The integers [rows, K] (float64 holding whole numbers) GPTQ chooses for `weight` [rows, K]
    on the grid `scale` [rows, K] (one positive scale per element), visiting the columns in `order`
    (a permutation of range(K); None: as they are). `rows`: how many rows H was estimated from."""
    if weight.shape != scale.shape or hessian.shape != (weight.shape[1],) * 2:
        raise ValueError(f"weight {weight.shape}, scale {scale.shape} and hessian {hessian.shape} disagree")
    s = np.array(scale, np.float64)

    def to_grid(values: np.ndarray, column: int) -> np.ndarray:
        return np.clip(np.rint(values / s[:, column]), qmin, qmax) * s[:, column]

    return np.rint(compensate(weight, hessian, to_grid, damping, block_size, order, rows) / s)


def compensate(weight: np.ndarray, hessian: np.ndarray, round_column: Callable[[np.ndarray, int], np.ndarray],
               damping: float = 0.01, block_size: int = 128, order: np.ndarray | None = None,
               rows: int | None = None) -> np.ndarray:
    """`weight` [rows, K] rounded a column at a time by `round_column(values, column)` (column: its
    index in `weight`), each column's error spread over the columns not yet visited (the OBS update
    above): GPTQ for any set of values a weight may take (an integer grid, a codebook)."""
    w = np.array(weight, np.float64)
    k = w.shape[1]
    order = np.arange(k) if order is None else np.asarray(order)
    w, h = w[:, order], np.asarray(hessian, np.float64)[order][:, order]
    u = inverse_factor(h, damping, rows)
    out = np.empty_like(w)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        out[:, i1:i2], errors = _round_block(w[:, i1:i2], u[i1:i2, i1:i2], round_column, order[i1:i2])
        # The block's errors move the columns after it, as the column loop moved those inside it.
        w[:, i2:] -= errors @ u[i1:i2, i2:]
    return out[:, np.argsort(order)]


def _round_block(w: np.ndarray, u: np.ndarray, round_column: Callable[[np.ndarray, int], np.ndarray],
                 columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One block: its rounded values and the scaled errors e = (w - rounded) / U_jj, column by column."""
    w = w.copy()
    out = np.empty_like(w)
    errors = np.empty_like(w)
    for i in range(w.shape[1]):
        out[:, i] = round_column(w[:, i], int(columns[i]))
        errors[:, i] = (w[:, i] - out[:, i]) / u[i, i]
        w[:, i + 1:] -= np.outer(errors[:, i], u[i, i + 1:])
    return out, errors


def output_error(weight: np.ndarray, rounded: np.ndarray, hessian: np.ndarray) -> float:
    """tr((W - W') H (W - W')ᵀ): the mean squared output error of `rounded` over the rows H is from."""
    d = np.asarray(weight, np.float64) - np.asarray(rounded, np.float64)
    return float(np.einsum("ik,kl,il->", d, np.asarray(hessian, np.float64), d))
