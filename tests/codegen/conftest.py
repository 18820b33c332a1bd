"""Fixtures shared by the codegen tests."""
from pathlib import Path

import onnx
import pytest

MODELS = Path(__file__).resolve().parents[2] / "models"


@pytest.fixture(scope="module")
def digits_lowered(tmp_path_factory) -> Path:
    """The digits CNN through graphopt's own int8 pipeline, as `graphopt optimize` runs it."""
    import graphopt

    result = graphopt.optimize(str(MODELS / "digits_cnn.onnx"), "canonicalize,quantize,lower-int8",
                               data=str(MODELS / "digits_calib.npz"), latency=False)
    path = tmp_path_factory.mktemp("lowered") / "digits_lowered.onnx"
    graphopt.save(result.graph, path)
    assert {"QLinearConv", "MatMulInteger"} <= {n.op_type for n in onnx.load(path).graph.node}
    return path
