"""Synthetic builders give valid, runnable models; the trained digits CNN still scores."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from graphopt.testing import builders

MODELS = Path(__file__).resolve().parents[2] / "models"

BUILDERS: dict[str, Callable[[], onnx.ModelProto]] = {
    "resnet": builders.resnet,
    "resnet_bottleneck": lambda: builders.resnet(blocks=(2, 1, 1), bottleneck=True, batch=2),
    "resnet_imagenet_stem": lambda: builders.resnet(stem="imagenet", image=64),
    "mobilenet": builders.mobilenet,
    "mlp": builders.mlp,
    "transformer": builders.transformer,
}


def _session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def _param_count(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_builder_is_valid_and_runs(name: str) -> None:
    model = BUILDERS[name]()
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]

    graph = model.graph
    names = [n.name for n in graph.node]
    assert len(set(names)) == len(names)
    produced = [o for n in graph.node for o in n.output]
    tensors = produced + [i.name for i in graph.initializer] + [i.name for i in graph.input]
    assert len(set(tensors)) == len(tensors)

    sess = _session(model)
    (inp,) = sess.get_inputs()
    assert all(isinstance(d, int) for d in inp.shape)
    x = np.random.default_rng(0).standard_normal(inp.shape).astype(np.float32)
    (y,) = sess.run(None, {inp.name: x})
    expected_shape = [d.dim_value for d in graph.output[0].type.tensor_type.shape.dim]
    assert list(y.shape) == expected_shape
    assert np.isfinite(y).all()
    assert 1e-2 < float(np.abs(y).max()) < 1e3
    assert float(y.std()) > 1e-3


def test_builders_are_seeded() -> None:
    a, b, c = builders.mlp(seed=1), builders.mlp(seed=1), builders.mlp(seed=2)
    assert a.SerializeToString() == b.SerializeToString()
    assert a.SerializeToString() != c.SerializeToString()


def test_resnet_keeps_batchnorm_separate() -> None:
    ops = [n.op_type for n in builders.resnet().graph.node]
    assert ops.count("BatchNormalization") == ops.count("Conv")


def test_mlp_hidden_layers_are_matmul_add() -> None:
    ops = [n.op_type for n in builders.mlp(sizes=(8, 16, 16, 4)).graph.node]
    assert ops.count("MatMul") == 2 and ops.count("Add") == 2 and ops.count("Gemm") == 1


def test_resnet50_parameter_count() -> None:
    model = builders.resnet50()
    assert 25_000_000 <= _param_count(model) <= 26_000_000
    assert sum(n.op_type == "Conv" for n in model.graph.node) == 53


def test_digits_cnn_accuracy() -> None:
    data = np.load(MODELS / "digits_test.npz")
    sess = _session(MODELS / "digits_cnn.onnx")
    (logits,) = sess.run(["logits"], {"x": data["x"]})
    assert logits.shape == (len(data["y"]), 10)
    assert float((logits.argmax(1) == data["y"]).mean()) >= 0.95
