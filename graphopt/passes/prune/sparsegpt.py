"""The data-aware pruning math: Wanda and SparseGPT on a layer's weight matrix and input Hessian.

A layer is seen as in `graphopt.passes.activations`: per group g its weight matrix W_g [rows, K]
and H_g = E[xᵀx] [K, K] of the rows its weight multiplies. Both methods zero a given number of
weights (unstructured) or all but N of every M consecutive columns in each row (N:M), along a
column `order` the caller chooses (the N:M runs are consecutive in that order).

- Wanda (Sun et al. 2023): the score of W_ij is |W_ij| · ||x_j||₂ (sqrt of H_jj, the input
  column's RMS); the lowest scores of each output row are zeroed. The weights kept are unchanged.
- SparseGPT (Frantar & Alistarh 2023): with H damped by `damping` · mean(diag H) on the diagonal
  (more where H comes from few rows: see `shrinkage`) and U the upper Cholesky factor of H⁻¹
  (UᵀU = H⁻¹), the columns are visited in blocks of
  `block_size`. Each block's mask is chosen when the block is reached (adaptive mask selection) by
  the OBS saliency w² / U_jj² over the whole block (per run of M columns in each row for N:M);
  each pruned column's error e = (w - q) / U_jj is then spread over the columns not yet visited,
  W[:, j:] -= e ⊗ U[j, j:] (the Optimal Brain Surgeon update). What the layer outputs on the
  calibration rows changes as little as this greedy order allows.

Guarantees: exactly `count` zeros (unstructured; zeros already there score 0 and are chosen
first, so a second run at the same count changes nothing) or at most N non-zeros in every run of
M; float64 arithmetic throughout (the factor of H⁻¹ is where float32 loses the small pivots).
Verified by: tests/passes/prune/test_sparsegpt.py (against direct least-squares solutions and
output errors computed from the rows).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from graphopt.ir.errors import PipelineError

METHODS = ("wanda", "sparsegpt")
# Cholesky of H + λI can still fail on an ill-conditioned H in float64; λ grows by this factor
# until it succeeds, at most RETRIES times.
GROWTH, RETRIES = 10.0, 6


def split_count(count: int, sizes: list[int] | np.ndarray) -> np.ndarray:
    """Integer shares of `count` in proportion to `sizes` that add up to `count` exactly (each
    share is the rounded cumulative target minus the one before, so the split is deterministic)."""
    sizes = np.asarray(sizes, np.int64)
    total = int(sizes.sum())
    if total == 0:
        return np.zeros(len(sizes), np.int64)
    cumulative = np.rint(np.cumsum(sizes) * (count / total)).astype(np.int64)
    return np.diff(np.concatenate([[0], np.minimum(cumulative, np.cumsum(sizes))]))


def smallest_mask(scores: np.ndarray, count: int) -> np.ndarray:
    """A boolean mask of the `count` smallest entries of `scores` (any shape)."""
    flat = scores.ravel()
    mask = np.zeros(flat.size, bool)
    if count >= flat.size:
        mask[:] = True
    elif count > 0:
        mask[np.argpartition(flat, count - 1)[:count]] = True
    return mask.reshape(scores.shape)


def n_m_mask(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """Per row and run of `m` consecutive columns, True at the m - n lowest scores."""
    rows, k = scores.shape
    runs = scores.reshape(rows, k // m, m)
    drop = np.argpartition(runs, m - n - 1, axis=2)[:, :, :m - n]
    mask = np.zeros(runs.shape, bool)
    np.put_along_axis(mask, drop, True, axis=2)
    return mask.reshape(rows, k)


def shrinkage(hessian: np.ndarray, rows: int) -> float:
    """The Oracle Approximating Shrinkage intensity s (Chen et al. 2010) of a second moment
    estimated from `rows` rows: (1 - s) H + s · mean(diag H) · I is the better estimate.

    Why: a layer that saw fewer rows than K (a recurrent cell's Gemm sees one row per sample) has a
    singular H, and SparseGPT's updates then fit the calibration rows and hurt every other input;
    s → 1 there, and SparseGPT degrades gracefully to magnitude pruning (H ∝ I: no updates). With
    many rows s ≈ 0 and the method is the paper's. Needs only H and the row count.
    """
    k = len(hessian)
    mu = float(np.trace(hessian)) / k
    alpha = float(np.mean(hessian ** 2))
    den = (rows + 1) * (alpha - mu ** 2 / k)
    return 1.0 if den <= 0 else min((alpha + mu ** 2) / den, 1.0)


def inverse_factor(hessian: np.ndarray, damping: float, rows: int | None = None) -> np.ndarray:
    """U, upper triangular, with UᵀU = (H + λI)⁻¹ and λ = damping · mean(diag H), H first shrunk
    toward mean(diag H) · I by `shrinkage` when the number of `rows` it was estimated from is given.

    An input column that is always zero (H_jj = 0) gets λ alone on its diagonal: it is then
    independent of the others, and its weights score low (they cost nothing on this data).
    """
    h = np.array(hessian, np.float64)
    diag = np.diag(h).copy()
    mean = float(diag.mean()) if diag.size else 0.0
    scale = mean if mean > 0 else 1.0
    dead = diag <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    if rows is not None:
        s = shrinkage(h, rows)
        h = (1 - s) * h + s * scale * np.eye(len(h))
    lam = damping * scale
    # With J the reversal, J H J = L Lᵀ gives H = R Rᵀ, R = J L J upper; so H⁻¹ = (R⁻¹)ᵀ R⁻¹ and
    # U = R⁻¹ = J L⁻¹ J: one Cholesky and one inverse, not the two of each that H⁻¹ first takes.
    reverse = slice(None, None, -1)
    for _ in range(RETRIES):
        try:
            lower = np.linalg.cholesky((h + np.eye(len(h)) * max(lam, 1e-12 * scale))[reverse, reverse])
            break
        except np.linalg.LinAlgError:
            lam = max(lam, 1e-6 * scale) * GROWTH
    else:
        raise PipelineError(f"the input Hessian is not positive definite even with damping {lam / scale:g}: "
                            "give more calibration samples or a larger damping")
    return np.triu(np.linalg.inv(lower)[reverse, reverse])


@dataclass
class LayerHessian:
    """One layer's H [groups, K, K] (from `activations.statistics`), ready to prune its weight
    matrix [groups, rows, K] by Wanda or SparseGPT. `order`: the order the columns are visited and
    N:M runs are counted in (a permutation of range(K); None for the natural order). `rows`: how
    many rows H was estimated from, for `shrinkage` (None: H as it is). The Cholesky factors are
    computed once, on the first SparseGPT call, and reused for every sparsity."""
    hessian: np.ndarray
    damping: float = 0.01
    block_size: int = 128
    order: np.ndarray | None = None
    rows: int | None = None
    _factors: list[np.ndarray] | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.order is not None:
            self.hessian = self.hessian[:, self.order][:, :, self.order]

    def prune(self, weight: np.ndarray, method: str, count: int | None = None,
              n_m: tuple[int, int] | None = None) -> np.ndarray:
        """`weight` [groups, rows, K] with `count` weights zeroed over the whole matrix, or with
        N:M runs along K; float64, in the original column order."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r} (methods: {', '.join(METHODS)})")
        if (count is None) == (n_m is None):
            raise ValueError("give either count or n_m")
        if n_m is not None and (self.block_size % n_m[1] or weight.shape[-1] % n_m[1]):
            raise ValueError(f"N:M runs of {n_m[1]} need K ({weight.shape[-1]}) and block_size "
                             f"({self.block_size}) to be multiples of {n_m[1]}")
        w = np.array(weight, np.float64)
        if self.order is not None:
            w = w[:, :, self.order]
        shares = split_count(count, [w[g].size for g in range(len(w))]) if count is not None else [None] * len(w)
        out = np.stack([self._prune_group(g, w[g], method, share, n_m) for g, share in enumerate(shares)])
        if self.order is not None:
            out = out[:, :, np.argsort(self.order)]
        return out

    def _prune_group(self, g: int, w: np.ndarray, method: str, count: int | None,
                     n_m: tuple[int, int] | None) -> np.ndarray:
        if method == "wanda":
            return wanda(w, np.diag(self.hessian[g]), count, n_m)
        if self._factors is None:
            self._factors = [inverse_factor(h, self.damping, self.rows) for h in self.hessian]
        return sparsegpt(w, self._factors[g], self.block_size, count, n_m)


def wanda(w: np.ndarray, hessian_diagonal: np.ndarray, count: int | None = None,
          n_m: tuple[int, int] | None = None) -> np.ndarray:
    """`w` [rows, K] with the lowest |W_ij| · sqrt(H_jj) zeroed: `count` of them spread evenly
    over the rows (per-output comparison groups, as the paper finds best), or N:M per row."""
    scores = np.abs(w) * np.sqrt(np.maximum(hessian_diagonal, 0))[None, :]
    if n_m is not None:
        mask = n_m_mask(scores, *n_m)
    else:
        per_row = split_count(count, [w.shape[1]] * w.shape[0])
        mask = np.stack([smallest_mask(s, c) for s, c in zip(scores, per_row)])
    return np.where(mask, 0.0, w)


def sparsegpt(w: np.ndarray, factor: np.ndarray, block_size: int, count: int | None = None,
              n_m: tuple[int, int] | None = None) -> np.ndarray:
    """`w` [rows, K] pruned by SparseGPT with `factor` = U (UᵀU = H⁻¹ damped): `count` zeros
    shared among the blocks of columns in proportion to their size, or N:M along K."""
    w = np.array(w, np.float64)
    rows, k = w.shape
    starts = list(range(0, k, block_size))
    budget = split_count(count, [min(block_size, k - s) * rows for s in starts]) if count is not None else None
    for b, i1 in enumerate(starts):
        i2 = min(i1 + block_size, k)
        u = factor[i1:i2, i1:i2]
        block, errors = _prune_block(w[:, i1:i2], u, None if budget is None else int(budget[b]), n_m)
        w[:, i1:i2] = block
        # The block's errors move the columns after it, as the column loop moved those inside it.
        w[:, i2:] -= errors @ factor[i1:i2, i2:]
    return w


def _prune_block(w: np.ndarray, u: np.ndarray, count: int | None,
                 n_m: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    """One block: its pruned columns and the scaled errors e = (w - q) / U_jj per column."""
    w = w.copy()
    d = np.diag(u)
    errors = np.zeros_like(w)
    mask = smallest_mask(w ** 2 / d[None, :] ** 2, count) if count is not None else np.zeros(w.shape, bool)
    for i in range(w.shape[1]):
        if n_m is not None and i % n_m[1] == 0:
            # The run's mask is chosen when it is reached, from the weights as updated so far.
            run = slice(i, i + n_m[1])
            mask[:, run] = n_m_mask(w[:, run] ** 2 / d[None, run] ** 2, *n_m)
        column = w[:, i]
        kept = np.where(mask[:, i], 0.0, column)
        errors[:, i] = (column - kept) / d[i]
        w[:, i:] -= np.outer(errors[:, i], u[i, i:])
        w[:, i] = kept  # the update leaves w - e·U_jj = kept up to rounding; store the exact zeros
    return w, errors
