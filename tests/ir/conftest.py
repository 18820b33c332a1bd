"""Fixtures for the IR tests: a small valid model to break, and a way to write it to tmp_path."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


def small_model() -> onnx.ModelProto:
    """y = Relu(x @ W + B), x: float[2, 3]; W, B as initializers; opset 17, IR 8."""
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), "W")
    b = numpy_helper.from_array(np.ones(4, dtype=np.float32), "B")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "B"], ["h2"], name="add"),
             helper.make_node("Relu", ["h2"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              initializer=[w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture
def model() -> onnx.ModelProto:
    return small_model()


@pytest.fixture(scope="session")
def make_model():
    """small_model itself, for fixtures with a wider scope than `model`."""
    return small_model


@pytest.fixture
def write(tmp_path):
    """write(model, name="m.onnx") -> path of the model serialized under tmp_path, unchecked."""
    def _write(m: onnx.ModelProto, name: str = "m.onnx") -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(m.SerializeToString())
        return path
    return _write
