import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.ir import ort
from graphopt.ir.errors import PipelineError
from graphopt.kernels import histogram
from graphopt.passes.base import PassContext
from graphopt.passes.manager import PassManager
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


def scalar_scaled_matmul() -> gs.Graph:
    """y = (x @ W) * s with x [N, 4] and a scalar s, as the acceptance script builds it."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Mul", ["h", "s"], ["y"])],
        "scalar", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
                   helper.make_tensor_value_info("s", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [w])
    return gs.import_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def scalar_feeds() -> dict:
    return {"x": np.random.default_rng(1).standard_normal((32, 4)).astype(np.float32), "s": np.array(2.0, np.float32)}


def test_a_scalar_input_is_held_fixed_while_samples_are_batched():
    graph, data = scalar_scaled_matmul(), scalar_feeds()
    seen = []
    stats = cal.calibrate(graph, ["h", "y"], data, batch_size=10, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(10, 32), (20, 32), (30, 32), (32, 32)]
    full = ort.run(cal.with_outputs(graph, ["h", "y"]), data)
    for name in ("h", "y"):
        assert stats[name].count == 32 * 3
        assert stats[name].range("minmax") == pytest.approx((min(full[name].min(), 0), max(full[name].max(), 0)))


def test_fixed_shape_state_goes_whole_into_every_run():
    # y = x + h: x [N, 1, 3] carries samples, h [2, 3] is state of a fixed shape (y is [N, 2, 3]).
    graph = gs.import_onnx(helper.make_model(helper.make_graph(
        [helper.make_node("Add", ["x", "h"], ["y"])], "state",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 3]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]), opset_imports=[helper.make_opsetid("", 17)]))
    data = {"x": np.ones((6, 1, 3), np.float32), "h": np.stack([np.zeros(3), np.full(3, 5.0)]).astype(np.float32)}
    stats = cal.calibrate(graph, ["y"], data, batch_size=4)
    assert stats["y"].range("minmax") == (0.0, 6.0) and stats["y"].count == 6 * 2 * 3


def test_a_scalar_input_model_is_quantized_from_data():
    from graphopt.passes.quant.insert_qdq import Quantize

    graph, data = scalar_scaled_matmul(), scalar_feeds()
    PassManager([Quantize()]).run(graph, PassContext(feeds=data))
    assert "QuantizeLinear" in [n.op for n in graph.nodes]
