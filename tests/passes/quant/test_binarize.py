"""binarize against onnxruntime. Measured on digits (fp32 98.89%): first and last layer kept
76.85% (output cosine 0.82); keep=none 46.48% (0.58). XNOR-Net retrains; this pass does not."""
import numpy as np
import pytest

from graphopt.optimize import optimize
from graphopt.passes.quant.binarize import Binarize, binary
from graphopt.passes.quant.codebook import output_axis
from graphopt.testing import builders
from graphopt.testing.check import check_pass, rng_array
from graphopt.testing.tiny import model, node
from test_cluster_weights import DIGITS, DIGITS_CALIB, accuracy, decoded_weights


def test_sign_times_mean_abs_per_output_channel():
    w = rng_array((4, 3, 3, 3))
    book = binary(w, 0)
    alpha = np.abs(w).reshape(4, -1).mean(1)
    np.testing.assert_allclose(book.decoded(), np.where(w >= 0, 1, -1) * alpha[:, None, None, None], rtol=1e-6)
    assert binary(np.zeros((2, 2), np.float32), 1).decoded().tolist() == [[0, 0], [0, 0]]


@pytest.mark.parametrize("build", ["resnet", "mobilenet", "mlp", "transformer"])
@pytest.mark.parametrize("keep", ["first|last", None])
def test_builders_within_the_declared_bound(build, keep):
    pass_ = Binarize(keep=keep)
    graph, result, worst = check_pass(getattr(builders, build)(), pass_)
    assert min(worst.values()) >= pass_.info.semantics.bound, worst
    nodes = {n.name: n for n in graph.nodes}
    for name, w in decoded_weights(graph).items():
        axis = output_axis(nodes[name], 1, w.ndim)
        channels = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1) if axis is not None else w.reshape(1, -1)
        assert all(len(np.unique(np.abs(c))) == 1 for c in channels), name  # one alpha per channel
        assert result.decisions[name]["index_bits"] == 4


@pytest.mark.parametrize("trans_b, axis", [(0, 1), (1, 0)])
def test_gemm_scale_follows_transB(trans_b, axis):
    shape = (5, 6) if trans_b else (6, 5)
    m = model([node("Gemm", ["x", "w"], ["a"], name="fc", transB=trans_b), node("Relu", ["a"], ["y"])],
              {"x": (2, 6)}, {"y": (2, 5)}, {"w": rng_array(shape)})
    graph, _, _ = check_pass(m, Binarize(keep=None))
    w = decoded_weights(graph)["fc"]
    assert np.moveaxis(np.abs(w), axis, 0).std(axis=1).max() < 1e-6


def test_digits_first_and_last_kept():
    fp32 = accuracy(DIGITS)
    acc = accuracy(optimize(DIGITS, "canonicalize,binarize", data=DIGITS_CALIB, latency=False).graph)
    every = accuracy(optimize(DIGITS, "canonicalize,binarize(keep=none)", data=DIGITS_CALIB, latency=False,
                              min_cosine=0.0).graph)
    print(f"digits fp32 {fp32:.4f} binarize {acc:.4f} keep=none {every:.4f}")
    assert acc >= 0.7 and every < acc
