"""What a model carries besides its graph survives load -> passes -> save; old IR versions round-trip."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.ir import io, ort
from graphopt.ir.data import input_specs
from graphopt.ir.errors import GraphoptError
from graphopt.ir.graph import ModelGraph
from graphopt.passes.manager import PassManager
from graphopt.passes.pipeline import Pipeline

RNG = np.random.default_rng(0)
X = RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)


def conv_bn(ir_version: int, opset: int, weights_as_inputs: bool) -> onnx.ModelProto:
    """Conv -> BatchNormalization -> Relu; canonicalize folds the BN, replacing the conv's weight."""
    weights = {"cw": RNG.standard_normal((4, 3, 3, 3)), "s": RNG.standard_normal(4), "b": RNG.standard_normal(4),
               "m": RNG.standard_normal(4), "v": np.abs(RNG.standard_normal(4)) + 0.5}
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
    nodes = [helper.make_node("Conv", ["x", "cw"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["bn"], name="bn"),
             helper.make_node("Relu", ["bn"], ["y"], name="relu")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])]
    if weights_as_inputs:
        inputs += [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in inits]
    graph = helper.make_graph(nodes, "convbn", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model


def canonicalized(path, tmp_path):
    graph = io.load(path)
    PassManager(Pipeline.parse("canonicalize")).run(graph)
    return graph, io.save(graph, tmp_path / "out" / "model.opt.onnx")


def test_ir3_initializers_listed_as_inputs_round_trip_with_the_ir_version_raised(write, tmp_path):
    path = write(conv_bn(3, 8, weights_as_inputs=True))
    graph = io.load(path)
    assert [t.name for t in graph.inputs] == ["x"] and [s.name for s in input_specs(graph)] == ["x"]
    assert graph.props.notes == ("IR version 3 raised to 4: initializers are no longer also listed as graph inputs",)
    graph, out = canonicalized(path, tmp_path)
    saved = onnx.load(str(out))
    onnx.checker.check_model(saved)
    assert saved.ir_version == 4 and [i.name for i in saved.graph.input] == ["x"]
    assert "BatchNormalization" not in [n.op_type for n in saved.graph.node]
    np.testing.assert_allclose(ort.run(str(out), {"x": X})["y"], ort.run(str(path), {"x": X})["y"],
                               rtol=1e-5, atol=1e-5)


def test_initializers_listed_as_inputs_are_not_inputs_to_feed(write):
    # torch's keep_initializers_as_inputs writes IR >= 4 models that list every weight as an input.
    graph = io.load(write(conv_bn(7, 13, weights_as_inputs=True)))
    assert [t.name for t in graph.inputs] == ["x"] and graph.props.notes == ()
    assert [s.name for s in input_specs(graph)] == ["x"]


def with_model_data(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with a second input and output, a model-local function, an extra opset domain and
    everything a ModelProto can say about itself."""
    twice = helper.make_function("local.fn", "Twice", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])],
                                 [helper.make_opsetid("", 13)])
    model.functions.append(twice)
    model.opset_import.extend([helper.make_opsetid("local.fn", 1), helper.make_opsetid("ai.onnx.training", 1)])
    model.graph.input.append(helper.make_tensor_value_info("k", TensorProto.FLOAT, [1]))
    model.graph.node.append(helper.make_node("Twice", ["k"], ["k2"], domain="local.fn", name="twice"))
    model.graph.output.insert(0, helper.make_tensor_value_info("k2", TensorProto.FLOAT, [1]))
    model.metadata_props.add(key="character", value="".join(chr(0x4E00 + i) for i in range(3000)))
    model.metadata_props.add(key="dict_url", value="ppocr/keys.txt")
    model.doc_string, model.graph.doc_string = "a recognizer", "its graph"
    model.producer_name, model.producer_version = "PaddlePaddle", "2.6.0"
    model.domain, model.model_version = "org.example.ocr", 7
    return model


def model_data(model: onnx.ModelProto) -> dict:
    return {"metadata": [(p.key, p.value) for p in model.metadata_props], "doc": model.doc_string,
            "graph_doc": model.graph.doc_string, "producer": (model.producer_name, model.producer_version),
            "domain": model.domain, "version": model.model_version,
            "inputs": [i.name for i in model.graph.input], "outputs": [o.name for o in model.graph.output],
            "functions": [(f.domain, f.name) for f in model.functions],
            "opsets": sorted((o.domain, o.version) for o in model.opset_import)}


@pytest.mark.parametrize("copied", [False, True])
def test_the_models_own_data_survives_passes_and_save(write, tmp_path, copied):
    original = with_model_data(conv_bn(8, 13, weights_as_inputs=False))
    graph = io.load(write(original))
    if copied:  # graphsurgeon's own copy drops the producer
        graph = graph.copy()
        assert isinstance(graph, ModelGraph)
    PassManager(Pipeline.parse("canonicalize")).run(graph)
    saved = onnx.load(str(io.save(graph, tmp_path / "m.onnx")))
    assert model_data(saved) == model_data(original)
    assert "BatchNormalization" not in [n.op_type for n in saved.graph.node]
    outputs = ort.run(saved, {"x": X, "k": np.array([1.5], np.float32)})
    assert list(outputs) == ["k2", "y"] and outputs["k2"][0] == 3.0


def _pytorch_converted() -> list:
    """onnx's own backend cases exported from PyTorch in the IR 3 era (every weight a graph input)."""
    root = Path(onnx.__file__).parent / "backend" / "test" / "data"
    return sorted(p.parent for p in [*root.glob("pytorch-converted/*/model.onnx"), *root.glob("pytorch-operator/*/model.onnx")])


@pytest.mark.parametrize("case", _pytorch_converted(), ids=lambda p: p.name)
def test_onnx_pytorch_converted_cases_canonicalize_save_and_run(case, tmp_path):
    inputs = [numpy_helper.to_array(onnx.load_tensor(str(f))) for f in sorted(case.glob("test_data_set_0/input_*.pb"))]
    graph = io.load(case / "model.onnx")
    feeds = dict(zip([t.name for t in graph.inputs], inputs))
    try:
        reference = ort.run(str(case / "model.onnx"), feeds)
    except GraphoptError:
        pytest.skip("onnxruntime does not run the original")
    PassManager(Pipeline.parse("canonicalize")).run(graph)
    out = io.save(graph, tmp_path / "m.onnx")
    onnx.checker.check_model(str(out))
    for name, value in ort.run(str(out), feeds).items():
        np.testing.assert_allclose(value, reference[name], rtol=1e-4, atol=1e-5)
