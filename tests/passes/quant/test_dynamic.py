"""quantize(mode=dynamic): the form onnxruntime's quantize_dynamic writes, built by graphopt."""
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from graphopt.ir import ort
from graphopt.ir.data import input_specs, random_feeds
from graphopt.ir.errors import PipelineError
from graphopt.ir.graph import export
from graphopt.optimize import optimize
from graphopt.passes.base import PassContext
from graphopt.passes.quant.insert_qdq import Quantize
from graphopt.passes.quant.lower_int8 import LowerInt8
from graphopt.testing import builders
from graphopt.testing.check import check_pass, ops, refusals, rng_array
from graphopt.testing.tiny import model, node

ROOT = Path(__file__).resolve().parents[3]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
DIGITS_TEST = ROOT / "models" / "digits_test.npz"
DIGITS_CALIB = ROOT / "models" / "digits_calib.npz"
BOUND = Quantize.info.semantics.bound
BUILDERS = {"resnet": builders.resnet, "mobilenet": builders.mobilenet, "mlp": builders.mlp,
            "transformer": builders.transformer}
LAYERS = {"Conv", "Gemm", "MatMul"}


@pytest.mark.parametrize("build", BUILDERS)
def test_builders_within_bound(build):
    graph, result, worst = check_pass(BUILDERS[build](), Quantize(mode="dynamic"))
    assert min(worst.values()) >= BOUND, worst
    kinds = Counter(ops(graph))
    assert kinds["DynamicQuantizeLinear"] and kinds["MatMulInteger"] + kinds["ConvInteger"] == len(result.decisions)
    # Every layer with a constant weight is integer; what stays MatMul multiplies two activations.
    assert not [n for n in graph.nodes if n.op in LAYERS and any(isinstance(t, gs.Constant) for t in n.inputs[:2])]
    assert all(d["output_sqnr_db"] > 25 and d["form"].startswith("DynamicQuantizeLinear")
               for d in result.decisions.values()), result.decisions


def test_reduce_range_auto_follows_whether_onnxruntime_saturates_here():
    """reduce_range=auto puts the weights on 7 bits exactly where this host's onnxruntime sums
    u8 x s8 pairs in 16 bits with saturation (and says so); there the 8-bit weights lose precision
    that the 7-bit ones keep (MLP builder, output SQNR measured in onnxruntime)."""
    from graphopt.passes.quant.shift_uint8 import u8s8_inexact

    _, auto, _ = check_pass(builders.mlp(), Quantize(mode="dynamic"))
    bits = {d["weight_bits"] for d in auto.decisions.values()}
    assert bits == ({7} if u8s8_inexact() else {8})
    assert ("reduce_range" in auto.stats) == bool(u8s8_inexact())
    _, full, _ = check_pass(builders.mlp(), Quantize(mode="dynamic", reduce_range=False))
    worst = {name: (min(d["output_sqnr_db"] for d in r.decisions.values())) for name, r in (("auto", auto), ("8", full))}
    print(worst)
    if u8s8_inexact():
        assert worst["auto"] > worst["8"]


@pytest.mark.parametrize("reduce_range", [False, True])
def test_same_model_as_onnxruntime_quantize_dynamic(tmp_path, reduce_range):
    """Without data (nearest rounding) the rewrite is onnxruntime's own: same operators, same outputs,
    with and without reduce_range (weights on [-64, 64], so that u8 x s8 pair sums fit 16 bits)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    m = builders.transformer()
    onnx.save(m, tmp_path / "float.onnx")
    quantize_dynamic(str(tmp_path / "float.onnx"), str(tmp_path / "ort.onnx"), weight_type=QuantType.QInt8,
                     per_channel=True, reduce_range=reduce_range)
    theirs = onnx.load(tmp_path / "ort.onnx")
    graph = gs.import_onnx(m)
    result = Quantize(mode="dynamic", reduce_range=reduce_range).run(graph, PassContext())
    assert all(d["weight_bits"] == (7 if reduce_range else 8) for d in result.decisions.values())
    assert Counter(ops(graph)) == Counter(n.op_type for n in theirs.graph.node)
    for seed in (0, 1):
        feeds = random_feeds(input_specs(graph), seed=seed, batch=1)
        np.testing.assert_array_equal(ort.run(export(graph), feeds)["output"], ort.run(theirs, feeds)["output"])


def gemm_conv_model() -> onnx.ModelProto:
    """A depthwise Conv with bias, then Gemms with transB, alpha and beta, and without them."""
    return model([node("Conv", ["x", "w", "b"], ["c"], name="dw", group=3, kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
                  node("Flatten", ["c"], ["f"]),
                  node("Gemm", ["f", "g", "gb"], ["h"], name="fc", transB=1, alpha=0.5, beta=2.0),
                  node("Gemm", ["h", "g2"], ["y"], name="fc2")],
                 {"x": (2, 3, 4, 4)}, {"y": (2, 4)},
                 {"w": rng_array((3, 1, 3, 3)), "b": rng_array((3,), 1), "g": rng_array((5, 48), 2),
                  "gb": rng_array((5,), 3), "g2": rng_array((5, 4), 4)})


@pytest.mark.parametrize("per_channel", [True, False])
def test_gemm_and_depthwise_conv(per_channel):
    graph, result, worst = check_pass(gemm_conv_model(), Quantize(mode="dynamic", per_channel=per_channel))
    assert min(worst.values()) >= BOUND, worst
    assert set(result.decisions) == {"dw", "fc", "fc2"}
    assert result.decisions["dw"]["form"] == "DynamicQuantizeLinear+ConvInteger+Cast+Mul+Add"
    assert result.decisions["fc"]["form"] == "DynamicQuantizeLinear+MatMulInteger+Cast+Mul+Add"
    assert result.decisions["fc2"]["form"] == "DynamicQuantizeLinear+MatMulInteger+Cast+Mul"
    conv = next(n for n in graph.nodes if n.op == "ConvInteger")
    assert conv.attrs["group"] == 3 and conv.inputs[3].values.shape == ()  # onnxruntime takes a scalar only


def test_refusals_and_second_run():
    m = model([node("Gemm", ["x", "w"], ["y"], name="ta", transA=1)], {"x": (6, 2)}, {"y": (2, 4)},
              {"w": rng_array((6, 4))})
    _, result, _ = check_pass(m, Quantize(mode="dynamic"), expect_modified=False)
    assert [(r.node, r.reason) for r in result.refused] == [("ta", "Gemm with transA (MatMulInteger takes A as it is)")]
    graph = gs.import_onnx(builders.mlp())
    Quantize(mode="dynamic", exclude=("MatMul_0",)).run(graph, PassContext())
    again = Quantize(mode="dynamic").run(graph, PassContext())
    assert not again.modified and all("already has" in r for r in refusals(again))


@pytest.mark.parametrize("options, name", [("weight_bits=4", "weight_bits"), ("group_size=32", "group_size"),
                                           ("keep_float=1", "keep_float"), ("bias_correction=true", "bias_correction")])
def test_options_dynamic_cannot_honour_are_errors(options, name):
    with pytest.raises(PipelineError, match=f"{name}=.*mode=dynamic"):
        optimize(gs.import_onnx(builders.mlp()), f"quantize(mode=dynamic,{options})", latency=False)


def test_lower_int8_recognises_dynamic_layers():
    """lower-int8 on a dynamically quantized model: nothing to lower, said per layer, outputs unchanged."""
    graph = gs.import_onnx(builders.transformer())
    Quantize(mode="dynamic").run(graph, PassContext())
    graph.cleanup().toposort()
    lowered, result, _ = check_pass(graph, LowerInt8(), expect_modified=False)
    integer = [n.name for n in lowered.nodes if n.op == "MatMulInteger"]
    assert sorted(r.node for r in result.refused) == sorted(integer)
    assert all(r.rule == "dynamic" and "already integer" in r.reason for r in result.refused)


def accuracy(m, data) -> float:
    out = ort.run(m, {"x": data["x"].astype(np.float32)})["logits"]
    return float((out.argmax(1) == data["y"]).mean())


def test_digits_accuracy_and_gptq_rounding():
    test = np.load(DIGITS_TEST)
    result = optimize(DIGITS, "canonicalize,quantize(mode=dynamic)", data=DIGITS_CALIB, latency=False)
    stats = next(p for p in result.report["passes"] if p["name"].startswith("quantize"))["stats"]
    assert stats["rounding"] == "gptq"  # with --data, as static mode
    assert accuracy(export(result.graph), test) >= accuracy(onnx.load(DIGITS), test) - 0.005


def test_auto_is_dynamic_on_transformers_with_data_only():
    transformer = gs.import_onnx(builders.transformer(batch=4))
    feeds = random_feeds(input_specs(transformer), seed=0, batch=4)
    with_data = optimize(transformer, "quantize", data=feeds, latency=False).graph
    assert "DynamicQuantizeLinear" in ops(with_data) and "QuantizeLinear" not in ops(with_data)
    without = optimize(transformer, "quantize", latency=False).graph
    assert "QuantizeLinear" in ops(without) and "DynamicQuantizeLinear" not in ops(without)
    cnn = optimize(DIGITS, "canonicalize,quantize", data=DIGITS_CALIB, latency=False).graph
    assert "QuantizeLinear" in ops(cnn) and "DynamicQuantizeLinear" not in ops(cnn)
