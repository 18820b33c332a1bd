import numpy as np
import pytest

from graphopt.ir.errors import PipelineError
from graphopt.passes.factorize.rank import (
    energy_kept,
    energy_rank,
    error_rank,
    evbmf_rank,
    svd_keep_rank,
    tucker_keep_ranks,
)
from graphopt.passes.factorize.svd import FactorizeSVD
from graphopt.passes.factorize.tucker import FactorizeTucker
from graphopt.passes.pipeline import Pipeline


def planted(rows: int, cols: int, rank: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    signal = rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols))
    return signal + noise * rng.standard_normal((rows, cols))


def vbmf(y: np.ndarray) -> int:
    return evbmf_rank(np.linalg.svd(y, compute_uv=False), y.shape)


def test_energy_rank_is_the_smallest_rank_holding_the_energy():
    s = np.array([3.0, 2.0, 1.0, 0.0])  # squares 9, 4, 1: 9/14 = 0.643, 13/14 = 0.929
    assert [energy_rank(s, e) for e in (0.5, 0.64, 0.65, 0.92, 0.93, 1.0)] == [1, 1, 2, 2, 3, 3]
    assert energy_kept(s, 2) == pytest.approx(13 / 14)
    assert energy_rank(np.zeros(3), 0.9) == 1


def test_error_rank_bounds_the_relative_error_of_what_it_leaves_out():
    s = np.array([3.0, 2.0, 1.0, 0.0])  # left-out errors: r=1 sqrt(5/14) = 0.598, r=2 sqrt(1/14) = 0.267
    assert [error_rank(s, e) for e in (0.6, 0.59, 0.27, 0.26, 0.0)] == [1, 2, 2, 3, 3]
    for r in (1, 2, 3):
        assert np.sqrt(1 - energy_kept(s, r)) <= [0.6, 0.27, 0.0][r - 1] + 1e-12


def test_keep_ranks_stay_within_the_parameter_budget():
    assert svd_keep_rank(64, 64, 0.5) == 16 and svd_keep_rank(10, 64, 0.01) == 1
    for c_out, c_in, kernel, keep in ((64, 64, 9, 0.5), (32, 16, 9, 0.3), (128, 3, 49, 0.8)):
        r_out, r_in = tucker_keep_ranks(c_out, c_in, kernel, keep)
        params = c_in * r_in + r_in * r_out * kernel + r_out * c_out
        assert params <= keep * c_out * c_in * kernel
        assert r_out / c_out == pytest.approx(r_in / c_in, abs=1.5 / min(c_out, c_in))


@pytest.mark.parametrize("shape, rank, noise", [((40, 60), 5, 0.1), ((100, 80), 20, 0.3), ((32, 288), 3, 1.0)])
def test_evbmf_finds_a_planted_rank(shape, rank, noise):
    assert vbmf(planted(*shape, rank, noise, seed=rank)) == rank


def test_evbmf_keeps_nothing_of_pure_noise_and_is_scale_free():
    noise = np.random.default_rng(0).standard_normal((64, 64))
    assert vbmf(noise) == 0
    y = planted(40, 60, 5, 0.1, seed=1)
    assert vbmf(1e-3 * y) == vbmf(1e3 * y.T) == 5


@pytest.mark.parametrize("spec, message", [
    ("factorize-svd", "exactly one of rank, energy, max_error or ratio \\(got none"),
    ("factorize-svd(energy=0.9,max_error=0.1)", "got energy, max_error"),
    ("factorize-svd(max_error=1)", "max_error=1.0 must be a fraction in \\[0, 1\\)"),
    ("factorize-tucker(rank=4,energy=0.9)", "got rank, energy"),
    ("factorize-svd(energy=1.5)", "energy=1.5 must be a fraction"),
    ("factorize-svd(rank=0)", "rank=0 must be a positive integer or 'vbmf'"),
    ("factorize-svd(rank=cp)", "rank='cp' must be a positive integer or 'vbmf'"),
    ("factorize-tucker(method=vbmf,rank=4)", "method='vbmf' is now rank='vbmf'"),
    ("factorize-tucker(method=cp,rank=4)", "method='cp' must be one of auto, weights, whitened"),
    ("factorize-svd(rank=4,damping=0)", "damping=0.0 must be positive"),
    ("factorize-svd(rank=4,allocation=global)", "allocation='global' must be one of auto, uniform, sensitivity"),
    ("factorize-svd(energy=0.9,allocation=sensitivity)", "give it as ratio"),
    ("factorize-svd(ratio=0.5,allocation=sensitivity,ratios=0.5|1.5)", "ratios must be in"),
])
def test_options_say_what_is_wrong(spec, message):
    with pytest.raises(PipelineError, match=message):
        Pipeline.parse(spec)


def test_specs_round_trip():
    spec = ("factorize-svd(ratio=0.5,allocation='sensitivity'),factorize-tucker(rank='vbmf',method='whitened'),"
            "factorize-svd(max_error=0.1,method='weights',damping=0.1)")
    pipeline = Pipeline.parse(spec)
    assert [type(p) for p in pipeline] == [FactorizeSVD, FactorizeTucker, FactorizeSVD]
    assert pipeline[1].options.criterion().vbmf and pipeline[2].options.criterion().max_error == 0.1
    assert str(Pipeline.parse(str(pipeline))) == str(pipeline)
