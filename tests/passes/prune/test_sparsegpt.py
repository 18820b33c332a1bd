"""The Wanda and SparseGPT math against direct solutions: the factor is that of the damped inverse
Hessian, one pruned weight gets the least-squares update of the columns after it, counts and N:M
runs are exact, and the output error on the calibration rows falls below magnitude pruning's."""
from __future__ import annotations

import numpy as np
import pytest

from graphopt.passes.prune.sparsegpt import (LayerHessian, inverse_factor, n_m_mask, shrinkage, smallest_mask,
                                             sparsegpt, split_count, wanda)

RNG = np.random.default_rng(0)


def correlated_rows(n: int = 2000, k: int = 48, seed: int = 0) -> np.ndarray:
    """Inputs with correlated columns of very different scales: where magnitude pruning is blind."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
    return rng.standard_normal((n, k)) @ mix * rng.uniform(0.1, 3.0, k)


def hessian(x: np.ndarray) -> np.ndarray:
    return x.T @ x / len(x)


def output_error(x: np.ndarray, w: np.ndarray, pruned: np.ndarray) -> float:
    return float(np.linalg.norm(x @ (pruned - w).T) / np.linalg.norm(x @ w.T))


def magnitude(w: np.ndarray, count: int) -> np.ndarray:
    return np.where(smallest_mask(np.abs(w), count), 0.0, w)


def test_split_count_is_exact_and_proportional():
    assert split_count(10, [5, 5, 10]).tolist() == [2, 3, 5]
    shares = split_count(37, [128 * 4, 128 * 4, 64 * 4])
    assert shares.sum() == 37 and abs(shares[0] - 14.8) < 1 and abs(shares[2] - 7.4) < 1
    assert split_count(0, [3, 4]).tolist() == [0, 0]
    assert split_count(7, [3, 4]).tolist() == [3, 4]


def test_inverse_factor_is_the_damped_inverse_cholesky():
    h = hessian(correlated_rows(k=12))
    u = inverse_factor(h, 0.01)
    assert np.allclose(u, np.triu(u))
    damped = h + 0.01 * np.mean(np.diag(h)) * np.eye(12)
    np.testing.assert_allclose(u.T @ u, np.linalg.inv(damped), rtol=1e-8, atol=1e-10)


def test_a_dead_input_column_is_independent_and_does_not_break_the_factor():
    x = correlated_rows(k=10)
    x[:, 3] = 0
    u = inverse_factor(hessian(x), 0.01)
    assert np.all(np.isfinite(u))
    assert np.allclose(u[3, np.arange(10) != 3], 0) and np.allclose(u[np.arange(10) != 3, 3], 0)


def test_one_pruned_weight_gets_the_least_squares_update_of_the_later_columns():
    # Removing w_q with the earlier columns fixed and the later ones free is a least-squares
    # problem; SparseGPT's single OBS step must solve it exactly (damped H, as the method uses).
    x = correlated_rows(k=10)
    h = hessian(x)
    damped = h + 0.01 * np.mean(np.diag(h)) * np.eye(10)
    w = RNG.standard_normal((1, 10))
    q = 4
    factor = inverse_factor(h, 0.01)
    scores = w[0] ** 2 / np.diag(factor) ** 2
    w[0, q] = 0.05 * np.sqrt(scores.min()) * np.abs(np.diag(factor)[q])  # make q the one chosen
    pruned = sparsegpt(w, factor, block_size=4, count=1)
    assert np.flatnonzero(pruned[0] == 0).tolist() == [q]
    later = np.arange(q + 1, 10)
    # minimize (d)ᵀ H (d) with d = w' - w, d_j = 0 for j < q, d_q = -w_q, d_later free
    delta = -np.linalg.solve(damped[np.ix_(later, later)], damped[later, q] * -w[0, q])
    expected = w[0].copy()
    expected[q] = 0
    expected[later] += delta
    np.testing.assert_allclose(pruned[0], expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("block_size", [7, 16, 128])
def test_sparsegpt_count_is_exact_and_output_error_beats_magnitude_and_wanda(block_size):
    x = correlated_rows()
    w = RNG.standard_normal((24, 48))
    count = 24 * 48 // 2
    layer = LayerHessian(hessian(x)[None], 0.01, block_size)
    by_obs = layer.prune(w[None], "sparsegpt", count=count)[0]
    by_wanda = layer.prune(w[None], "wanda", count=count)[0]
    assert np.count_nonzero(by_obs == 0) == count and np.count_nonzero(by_wanda == 0) == count
    errors = {name: output_error(x, w, p) for name, p in
              (("magnitude", magnitude(w, count)), ("wanda", by_wanda), ("sparsegpt", by_obs))}
    assert errors["sparsegpt"] < 0.7 * errors["magnitude"], errors
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors
    # a second run at the same count finds its zeros already there and changes nothing
    np.testing.assert_array_equal(layer.prune(by_obs[None], "sparsegpt", count=count)[0], by_obs)


def test_shrinkage_keeps_few_calibration_rows_from_overfitting():
    # 24 rows for K = 48: H is singular, and SparseGPT fitted to it alone hurts other inputs of the
    # same distribution; shrunk by the rows it came from, it beats magnitude pruning on them too.
    x = correlated_rows(n=4000)
    calibration, held = x[:24], x[24:]
    h = hessian(calibration)
    assert shrinkage(h, 24) > 0.3 and shrinkage(hessian(x), len(x)) < 0.02
    w = RNG.standard_normal((24, 48))
    count = w.size // 2
    fitted = LayerHessian(h[None], 0.01, 128).prune(w[None], "sparsegpt", count=count)[0]
    shrunk = LayerHessian(h[None], 0.01, 128, rows=24).prune(w[None], "sparsegpt", count=count)[0]
    errors = {name: output_error(held, w, p) for name, p in
              (("fitted", fitted), ("shrunk", shrunk), ("magnitude", magnitude(w, count)))}
    assert errors["shrunk"] < errors["magnitude"] < errors["fitted"], errors


def test_wanda_scores_magnitude_times_input_norm_per_output_row():
    w = np.array([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    diag = np.array([16.0, 4.0, 1.0, 1.0])  # input RMS 4, 2, 1, 1: scores row 0 = 4, 4, 3, 4
    pruned = wanda(w, diag, count=2)
    assert pruned.tolist() == [[1.0, 2.0, 0.0, 4.0], [4.0, 3.0, 2.0, 0.0]]
    assert wanda(w, np.ones(4), count=4).tolist() == magnitude(w, 4).tolist()  # equal norms: magnitude per row


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_n_m_runs_hold_n_and_sparsegpt_beats_magnitude(method, n, m):
    x = correlated_rows()
    w = RNG.standard_normal((16, 48))
    pruned = LayerHessian(hessian(x)[None], 0.01, 16).prune(w[None], method, n_m=(n, m))[0]
    assert (np.count_nonzero(pruned.reshape(16, -1, m), axis=2) == n).all()
    if method == "sparsegpt":
        by_magnitude = np.where(n_m_mask(np.abs(w), n, m), 0.0, w)
        assert output_error(x, w, pruned) < 0.8 * output_error(x, w, by_magnitude)


def test_the_order_sets_which_columns_form_the_runs_and_the_result_is_in_place():
    x = correlated_rows(k=8)
    w = RNG.standard_normal((3, 8))
    order = np.array([0, 2, 4, 6, 1, 3, 5, 7])  # runs (0, 2, 4, 6) and (1, 3, 5, 7)
    pruned = LayerHessian(hessian(x)[None], 0.01, 8, order=order).prune(w[None], "sparsegpt", n_m=(2, 4))[0]
    assert (np.count_nonzero(pruned[:, 0::2], axis=1) == 2).all()
    assert (np.count_nonzero(pruned[:, 1::2], axis=1) == 2).all()
    direct = LayerHessian(hessian(x[:, order])[None], 0.01, 8).prune(w[None, :, order], "sparsegpt", n_m=(2, 4))[0]
    np.testing.assert_allclose(pruned[:, order], direct)


def test_groups_share_the_count_and_use_their_own_hessian():
    xs = [correlated_rows(k=12, seed=s) for s in (1, 2)]
    h = np.stack([hessian(x) for x in xs])
    w = RNG.standard_normal((2, 5, 12))
    pruned = LayerHessian(h, 0.01, 128).prune(w, "sparsegpt", count=61)
    assert [int(np.count_nonzero(p == 0)) for p in pruned] in ([30, 31], [31, 30])
    alone = LayerHessian(h[1:], 0.01, 128).prune(w[1:], "sparsegpt", count=int(np.count_nonzero(pruned[1] == 0)))
    np.testing.assert_allclose(pruned[1], alone[0])


def test_bad_calls_say_what_is_wrong():
    layer = LayerHessian(np.eye(4)[None])
    with pytest.raises(ValueError, match="unknown method"):
        layer.prune(np.ones((1, 2, 4)), "obs", count=1)
    with pytest.raises(ValueError, match="either count or n_m"):
        layer.prune(np.ones((1, 2, 4)), "wanda")
    with pytest.raises(ValueError, match="multiples of 4"):
        LayerHessian(np.eye(4)[None], block_size=6).prune(np.ones((1, 2, 4)), "sparsegpt", n_m=(2, 4))
