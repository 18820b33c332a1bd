"""The whitening and refit math against its definitions, computed on explicit rows."""
import numpy as np
import onnx_graphsurgeon as gs
import pytest

from graphopt.passes import activations
from graphopt.passes.factorize import whiten
from graphopt.testing import tiny

RNG = np.random.default_rng(0)


def correlated_rows(n: int, k: int, seed: int = 0, mean: float = 0.0) -> np.ndarray:
    """Rows whose inputs are strongly correlated and unevenly scaled (a spectrum spanning 1e3)."""
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((k, k)) * np.geomspace(1.0, 1e-3, k)[:, None]
    return rng.standard_normal((n, k)) @ mixing + mean


def second_moment(x: np.ndarray) -> np.ndarray:
    return x.T @ x / x.shape[0]


def relative_output_error(w: np.ndarray, approx: np.ndarray, x: np.ndarray) -> float:
    return float(np.linalg.norm(x @ (w - approx).T) / np.linalg.norm(x @ w.T))


def test_damped_cholesky_factors_a_singular_second_moment():
    x = correlated_rows(10, 30)  # 10 rows of 30 inputs: H has rank 10
    h = second_moment(x)
    l = whiten.damped_cholesky(h, 0.01)
    lam = 0.01 * np.mean(np.diag(h))
    np.testing.assert_allclose(l @ l.T, h + lam * np.eye(30), atol=1e-10)
    assert np.allclose(l, np.tril(l))
    assert np.allclose(whiten.damped_cholesky(np.zeros((3, 3)), 0.01), 0.1 * np.eye(3))


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_whitened_truncation_error_is_the_tail_of_the_whitened_spectrum(rank):
    x = correlated_rows(4000, 16)
    w = RNG.standard_normal((12, 16))
    h = second_moment(x)
    l = whiten.damped_cholesky(h, 1e-9)
    u, s, rows = whiten.whitened_svd(w, l)
    np.testing.assert_allclose((u * s) @ rows, w, atol=1e-8)  # the full SVD is the weight itself
    np.testing.assert_allclose(whiten.whitened_spectrum(w, h, 1e-9), s, rtol=1e-6)
    s_rows, rows_only = whiten.whitened_rows(w, l)
    np.testing.assert_allclose(s_rows, s, rtol=1e-6)
    np.testing.assert_allclose(np.abs(rows_only[:rank]), np.abs(rows[:rank]), rtol=1e-5, atol=1e-8)  # up to sign
    approx = (u[:, :rank] * s[:rank]) @ rows[:rank]
    tail = np.sqrt(np.sum(s[rank:] ** 2) / np.sum(s**2))
    measured = relative_output_error(w, approx, x)
    assert measured == pytest.approx(tail, rel=1e-5)
    assert whiten.output_error(w, approx, h) == pytest.approx(measured, rel=1e-6)
    # The plain SVD of the weight keeps as many parameters and loses far more of the output.
    uw, sw, vtw = np.linalg.svd(w, full_matrices=False)
    assert relative_output_error(w, (uw[:, :rank] * sw[:rank]) @ vtw[:rank], x) > 1.2 * measured


def test_refit_of_the_output_factor_lowers_the_output_error_on_the_rows():
    x = correlated_rows(2000, 24, seed=3)
    w = np.random.default_rng(5).standard_normal((10, 24))
    h = second_moment(x)
    for damping in (1e-4, 0.1, 1.0, 3.0):
        u, s, rows = whiten.whitened_svd(w, whiten.damped_cholesky(h, damping))
        first = s[:4, None] * rows[:4]
        before = relative_output_error(w, u[:, :4] @ first, x)
        after = relative_output_error(w, whiten.refit_output_factor(w, first, h, u[:, :4]) @ first, x)
        assert after <= before + 1e-12
        # The more damped the truncation, the further from the data's optimum (0.1077 undamped), and
        # the more the refit wins back (measured: 0.109 -> 0.108 at 0.1, 0.198 -> 0.116 at 1, 0.277 -> 0.135 at 3).
        if damping >= 0.1:
            assert after < before - 1e-3 and after < 0.11 + 0.01 * damping, (damping, before, after)
    # The refit is the least-squares solution: no other output factor does better on the rows.
    refit = whiten.refit_output_factor(w, first, h, u[:, :4])
    best = np.linalg.lstsq(x @ first.T, x @ w.T, rcond=None)[0].T
    np.testing.assert_allclose(refit, best, rtol=1e-6, atol=1e-8)


def test_refit_keeps_the_truncation_where_the_calibration_never_excited_the_input():
    # An input that is zero on every sample (romanizer-encoder's bridge Gemm on the corpus data):
    # H = 0, any output factor fits, and a solve of the zero system would be inf/NaN.
    w = RNG.standard_normal((6, 8))
    u, s, rows = whiten.whitened_svd(w, whiten.damped_cholesky(np.zeros((8, 8)), 0.01))
    first = s[:3, None] * rows[:3]
    refit = whiten.refit_output_factor(w, first, np.zeros((8, 8)), u[:, :3])
    np.testing.assert_array_equal(refit, u[:, :3])
    assert np.all(np.isfinite(whiten.solve_psd(np.zeros((3, 3)), np.zeros((6, 3)))))


def test_channel_statistics_from_the_unfolded_second_moment():
    channels, kernel, n = 5, 4, 3000
    rows = RNG.standard_normal((n, channels * kernel)) @ RNG.standard_normal((channels * kernel, channels * kernel))
    h = second_moment(rows)
    per_position = rows.reshape(n, channels, kernel).transpose(0, 2, 1).reshape(-1, channels)
    np.testing.assert_allclose(whiten.channel_covariance(h, channels), second_moment(per_position), rtol=1e-10)
    project = RNG.standard_normal((2, channels))
    z = np.einsum("rc,nck->nrk", project, rows.reshape(n, channels, kernel)).reshape(n, -1)
    cross, inner = whiten.channel_projection_cross(h, project)
    np.testing.assert_allclose(cross, rows.T @ z / n, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(inner, z.T @ z / n, rtol=1e-8, atol=1e-10)


def test_shrinkage_trusts_many_rows_and_doubts_few():
    k = 64
    many, few = correlated_rows(50_000, k, seed=1), correlated_rows(16, k, seed=1)
    h_many, h_few = second_moment(many), second_moment(few)
    # Many rows: the estimate is the measured moment, nearly untouched.
    assert np.linalg.norm(whiten.shrunk(h_many, 50_000) - h_many) < 0.01 * np.linalg.norm(h_many)
    # Fewer rows than inputs: the singular moment is pulled towards the identity, and is invertible.
    estimate = whiten.shrunk(h_few, 16)
    assert np.linalg.matrix_rank(h_few) == 16 and np.linalg.eigvalsh(estimate).min() > 0
    assert np.trace(estimate) == pytest.approx(np.trace(h_few))


def test_moments_of_a_layer_are_its_inputs_mean_and_covariance():
    x = correlated_rows(3000, 8, seed=2, mean=3.0).astype(np.float32)
    m = tiny.model([tiny.node("Gemm", ["x", "w"], ["y"], name="gemm")], {"x": ("N", 8)}, {"y": None},
                   {"w": np.ones((8, 4), np.float32)})
    graph = gs.import_onnx(m)
    moments = whiten.Moments.of(activations.statistics(graph, graph.nodes, {"x": x}, batch_size=700)["gemm"])
    x64 = x.astype(np.float64)
    assert moments.rows == 3000
    np.testing.assert_allclose(moments.mean, x64.mean(axis=0), rtol=1e-9)
    # Each batch's products are summed in float32 (BLAS), the batches in float64.
    np.testing.assert_allclose(moments.second, second_moment(x64), rtol=1e-5)
    # 3000 rows of 8 inputs: the shrinkage barely moves the covariance.
    covariance = np.cov(x64.T, bias=True)
    assert np.linalg.norm(moments.estimate(centered=True) - covariance) < 0.01 * np.linalg.norm(covariance)
