import numpy as np
import onnx_graphsurgeon as gs
import pytest

from graphopt.ir import ort
from graphopt.ir.errors import PipelineError
from graphopt.kernels import histogram
from graphopt.passes.quant import calibrate as cal
from graphopt.testing import builders


@pytest.fixture(scope="module")
def mlp():
    return gs.import_onnx(builders.mlp(batch=8))


def hidden(graph: gs.Graph) -> list[str]:
    return [n.outputs[0].name for n in graph.nodes if n.op in ("MatMul", "Gemm", "Relu")]


def feeds(graph: gs.Graph, n: int, seed: int = 0) -> dict:
    name = graph.inputs[0].name
    shape = [n] + list(graph.inputs[0].shape[1:])
    return {name: np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def test_minmax_over_batches_equals_whole_data(mlp):
    data = feeds(mlp, 8)
    names = hidden(mlp)
    seen = []
    stats = cal.calibrate(mlp, names, data, batch_size=8, progress=lambda d, t: seen.append((d, t)))
    full = ort.run(cal.with_outputs(mlp, names), data)
    for name in names:
        assert stats[name].range("minmax") == pytest.approx((min(full[name].min(), 0), max(full[name].max(), 0)))
    assert seen == [(8, 8)]


def test_batched_statistics_match_one_pass_and_stay_bounded():
    graph = gs.import_onnx(builders.mobilenet(width=8, blocks=2, image=16))
    graph.inputs[0].shape[0] = "N"  # run several samples per batch
    data = feeds(graph, 12, seed=1)
    names = [n.outputs[0].name for n in graph.nodes if n.op == "Conv"]
    batched = cal.calibrate(graph, names, data, batch_size=3)
    whole = cal.calibrate(graph, names, data, batch_size=12)
    for name in names:
        width = batched[name].top / histogram.BINS
        for method in ("percentile", "entropy", "mse"):
            lo, hi = batched[name].range(method)
            lo1, hi1 = whole[name].range(method)
            # Re-binning as the range grows moves a threshold by a few bins at most.
            assert abs(hi - hi1) <= 0.05 * whole[name].top + 4 * width, (name, method)
        # Per tensor, only scalars and one histogram are kept, never activations.
        assert batched[name].hist.shape == (histogram.BINS,)
        assert batched[name].count == whole[name].count


def test_percentile_reference(mlp):
    data = feeds(mlp, 8)
    name = hidden(mlp)[0]
    stats = cal.calibrate(mlp, [name], data)
    values = ort.run(cal.with_outputs(mlp, [name]), data)[name]
    lo, hi = stats[name].range("percentile", percentile=99.0)
    expected = np.percentile(np.abs(values), 99.0)
    # 512 values: neighbouring order statistics near the tail are ~1% of the range apart.
    tol = 0.02 * stats[name].top
    assert hi == pytest.approx(min(expected, values.max()), abs=tol)
    assert lo == pytest.approx(max(-expected, values.min()), abs=tol)


def test_errors_are_actionable(mlp):
    with pytest.raises(PipelineError, match="empty"):
        cal.calibrate(mlp, hidden(mlp)[:1], {mlp.inputs[0].name: np.zeros((0, 64), np.float32)})
    stats = cal.calibrate(mlp, hidden(mlp)[:1], feeds(mlp, 8))
    with pytest.raises(PipelineError, match="one of"):
        stats[hidden(mlp)[0]].range("kmeans")


def test_fixed_batch_dimension_runs_in_its_own_batches(mlp):
    seen = []
    stats = cal.calibrate(mlp, hidden(mlp)[:1], feeds(mlp, 24), batch_size=32, progress=lambda d, t: seen.append(d))
    assert seen == [8, 16, 24]
    assert stats[hidden(mlp)[0]].count == 24 * 128
