"""Cook-Toom matrices for Winograd's minimal filtering F(m x m, 3 x 3) (Lavin & Gray 2016).

A 1-D F(m, r) computes m outputs of a correlation with an r-tap filter from alpha = m + r - 1
inputs with alpha multiplications: y = A^T [(G g) * (B^T d)]. It is the transpose of Toom-Cook
polynomial multiplication evaluated at alpha - 1 finite points and at infinity: with V_k the
alpha x k matrix of powers of the points (the row for infinity picks the leading coefficient),
A = V_m, G = V_r and B^T = V_alpha^-T. The 2-D form nests the 1-D one over rows and columns.
The matrices are built exactly in rationals; each row of B^T is scaled to coprime integers and the
scale moved into the matching row of G, as wincnn does, so the input transform adds and subtracts
small integers and the rounding of the fractions happens once, offline, in the weight transform.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from graphopt.ir.ops import WINOGRAD_TILES

R = 3
# Small points keep the matrices' entries small, which is what bounds the float32 error. For
# F(4x4), {0, +-1, 1/2, -2} (Barabasz et al. 2018) is about 4x more accurate than the customary
# {0, +-1, +-2} in a float32 simulation at 64 channels (8e-6 against 3.6e-5 max abs error); for
# F(6x6) no 7-point set tried beat {0, +-1, +-2, +-1/2} beyond the noise.
POINTS: dict[int, tuple[Fraction, ...]] = {
    2: (Fraction(0), Fraction(1), Fraction(-1)),
    4: (Fraction(0), Fraction(1), Fraction(-1), Fraction(1, 2), Fraction(-2)),
    6: (Fraction(0), Fraction(1), Fraction(-1), Fraction(2), Fraction(-2), Fraction(1, 2), Fraction(-1, 2)),
}
# The tiles are the WinogradConv contract's (graphopt.ir.ops); POINTS has one set for each.
TILES = WINOGRAD_TILES


def variant(m: int) -> str:
    return f"F({m}x{m},3x3)"


def _powers(points: tuple[Fraction, ...], cols: int) -> list[list[Fraction]]:
    """Rows p^0..p^(cols-1) for each finite point, then the row for the point at infinity."""
    rows = [[p ** j for j in range(cols)] for p in points]
    return rows + [[Fraction(int(j == cols - 1)) for j in range(cols)]]


def _inverse(a: list[list[Fraction]]) -> list[list[Fraction]]:
    """Exact Gauss-Jordan inverse; the matrices are at most 8 x 8."""
    n = len(a)
    rows = [list(r) + [Fraction(int(i == j)) for j in range(n)] for i, r in enumerate(a)]
    for c in range(n):
        pivot = next(i for i in range(c, n) if rows[i][c] != 0)
        rows[c], rows[pivot] = rows[pivot], rows[c]
        rows[c] = [x / rows[c][c] for x in rows[c]]
        for i in range(n):
            if i != c and rows[i][c] != 0:
                rows[i] = [x - rows[i][c] * y for x, y in zip(rows[i], rows[c])]
    return [r[n:] for r in rows]


def cook_toom(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A^T [m, alpha], G [alpha, 3], B^T [alpha, alpha]) in float64 for F(m, 3)."""
    points = POINTS[m]
    alpha = m + R - 1
    a = _powers(points, m)
    g = _powers(points, R)
    inv = _inverse(_powers(points, alpha))
    bt = [[inv[j][i] for j in range(alpha)] for i in range(alpha)]  # V_alpha^-T
    for i, row in enumerate(bt):
        denominators = math.lcm(*(x.denominator for x in row))
        numerators = math.gcd(*(x.numerator * denominators // x.denominator for x in row))
        scale = Fraction(denominators, numerators)
        bt[i] = [x * scale for x in row]
        g[i] = [x / scale for x in g[i]]
    return _floats(a).T.copy(), _floats(g), _floats(bt)


def _floats(rows: list[list[Fraction]]) -> np.ndarray:
    return np.array([[float(x) for x in r] for r in rows], np.float64)


def weight_transform(w: np.ndarray, m: int) -> np.ndarray:
    """U = G g G^T for every (k, c): [K, C, 3, 3] -> [alpha^2, K, C], in float64."""
    _, g, _ = cook_toom(m)
    u = np.einsum("iu,kcuv,jv->ijkc", g, w.astype(np.float64), g)
    return u.reshape(-1, *w.shape[:2])


def input_kernel(m: int) -> np.ndarray:
    """B^T d B as a convolution: [alpha^2, 1, alpha, alpha], kernel (i, j) = outer(B^T[i], B^T[j])."""
    _, _, bt = cook_toom(m)
    alpha = bt.shape[0]
    return np.einsum("iu,jv->ijuv", bt, bt).reshape(alpha * alpha, 1, alpha, alpha)


def output_matrix(m: int) -> np.ndarray:
    """A^T M A on the flattened alpha^2 axis: [m^2, alpha^2], row (p, q) = outer(A^T[p], A^T[q])."""
    at, _, _ = cook_toom(m)
    return np.einsum("pi,qj->pqij", at, at).reshape(m * m, -1)
