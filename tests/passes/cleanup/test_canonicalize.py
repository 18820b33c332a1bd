from pathlib import Path

import numpy as np
import pytest

from graphopt.ir import io, ort
from graphopt.passes.cleanup.canonicalize import Canonicalize
from graphopt.testing import builders
from graphopt.testing.check import check_pass, ops

MODELS = Path(__file__).resolve().parents[3] / "models"

BUILDERS = {
    "resnet": lambda: builders.resnet(blocks=(1, 1)),
    "resnet-bottleneck": lambda: builders.resnet(blocks=(1, 1), bottleneck=True),
    "mobilenet": builders.mobilenet,
    "mlp": builders.mlp,
    "transformer": lambda: builders.transformer(layers=1),
}


@pytest.mark.parametrize("name", BUILDERS)
def test_builders_stay_exact(name):
    graph, result, worst = check_pass(BUILDERS[name](), Canonicalize(), expect_modified=name != "transformer")
    assert "BatchNormalization" not in ops(graph)
    assert all(cos > 0.999999 for cos in worst.values()), worst


def test_digits_cnn_accuracy_unchanged():
    data = np.load(MODELS / "digits_test.npz")
    graph = io.load(MODELS / "digits_cnn.onnx")
    before = ort.run(graph, {"x": data["x"]})["logits"]
    graph, result, _ = check_pass(graph, Canonicalize(), inputs=[{"x": data["x"]}])
    after = ort.run(graph, {"x": data["x"]})["logits"]
    assert ops(graph).count("BatchNormalization") == 0 and "Dropout" not in ops(graph)
    assert np.array_equal(before.argmax(1), after.argmax(1))
    assert (after.argmax(1) == data["y"]).mean() >= 0.97
    folded = result.stats["passes"]["fold-batchnorm"]["applied"]["fold-batchnorm"]
    assert folded == 3
