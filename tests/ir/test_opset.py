"""opset.upgrade: exporters' opset 9-12 models reach 13 and newer through onnx's version converter,
verified in onnxruntime; what the converter cannot take is one ModelError naming the op and node."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.ir import io, opset, ort
from graphopt.ir.errors import ModelError
from graphopt.ir.graph import SKELETON_MAX_ELEMENTS, ModelGraph, export
from graphopt.ir.graph import opset as opset_of

X = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)


def _c(name: str, values) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values), name)


def _resize_clip_slice(version: int) -> tuple[list, list]:
    """Resize (Upsample before 10), Clip and Slice as each opset spells them: attributes became inputs."""
    if version < 10:
        nodes = [helper.make_node("Upsample", ["p", "sc"], ["u"], mode="nearest", name="up")]
    elif version == 10:
        nodes = [helper.make_node("Resize", ["p", "sc"], ["u"], mode="nearest", name="up")]
    else:
        nodes = [helper.make_node("Resize", ["p", "roi", "sc"], ["u"], mode="nearest", name="up")]
    inits = [_c("sc", np.array([1, 1, 2, 2], np.float32)), _c("roi", np.array([], np.float32))]
    if version < 11:
        nodes.append(helper.make_node("Clip", ["u"], ["cl"], min=0.0, max=6.0, name="clip"))
    else:
        nodes.append(helper.make_node("Clip", ["u", "lo", "hi"], ["cl"], name="clip"))
        inits += [_c("lo", np.float32(0)), _c("hi", np.float32(6))]
    if version < 10:
        nodes.append(helper.make_node("Slice", ["d"], ["sl"], starts=[0], ends=[1], axes=[2], name="slice"))
    else:
        nodes.append(helper.make_node("Slice", ["d", "st", "en", "ax"], ["sl"], name="slice"))
        inits += [_c("st", np.array([0])), _c("en", np.array([1])), _c("ax", np.array([2]))]
    return nodes, inits


def exporter_model(version: int) -> onnx.ModelProto:
    """Conv/BN/Relu/MaxPool/Resize/Clip/Dropout/Slice/Squeeze/Unsqueeze/Reshape/Gemm/Softmax at
    `version`, with the metadata a Paddle model carries."""
    rng = np.random.default_rng(0)
    middle, inits = _resize_clip_slice(version)
    inits += [_c("cw", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)), _c("cb", np.zeros(4, np.float32)),
              _c("s", np.ones(4, np.float32)), _c("b", np.full(4, 0.1, np.float32)), _c("m", np.zeros(4, np.float32)),
              _c("v", np.ones(4, np.float32)), _c("gw", rng.standard_normal((10, 32)).astype(np.float32)),
              _c("gb", np.zeros(10, np.float32)), _c("shp", np.array([1, 32]))]
    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["bn"], name="bn"),
             helper.make_node("Relu", ["bn"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
             *middle[:2], helper.make_node("Dropout", ["cl"], ["d"], name="drop"), middle[2],
             helper.make_node("Squeeze", ["sl"], ["sq"], axes=[2], name="squeeze"),
             helper.make_node("Unsqueeze", ["sq"], ["us"], axes=[2], name="unsqueeze"),
             helper.make_node("Reshape", ["us", "shp"], ["f"], name="reshape"),
             helper.make_node("Gemm", ["f", "gw", "gb"], ["g"], transB=1, name="gemm"),
             helper.make_node("Softmax", ["g"], ["y"], axis=1, name="softmax")]
    graph = helper.make_graph(nodes, "exported", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", version)], producer_name="paddle2onnx")
    model.ir_version = {9: 4, 10: 5, 11: 6, 12: 7}[version]
    model.metadata_props.add(key="character", value="0123456789abc")
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("version", [9, 10, 11, 12])
@pytest.mark.parametrize("target", [13, 17])
def test_exporters_opsets_upgrade_and_compute_the_same(version, target, write):
    graph = io.load(write(exporter_model(version)))
    upgraded = opset.upgrade(graph, target, {"x": X})
    assert opset_of(upgraded) == target and opset_of(graph) == version  # the input graph is left as it was
    model = export(upgraded)
    onnx.checker.check_model(model)
    assert model.ir_version >= 7 and model.producer_name == "paddle2onnx"
    assert [(p.key, p.value) for p in model.metadata_props] == [("character", "0123456789abc")]
    np.testing.assert_allclose(ort.run(model, {"x": X})["y"], ort.run(graph, {"x": X})["y"], rtol=1e-6, atol=1e-7)


def test_same_version_is_the_same_graph_and_lowering_is_refused(write):
    graph = io.load(write(exporter_model(11)))
    assert opset.upgrade(graph, 11) is graph
    with pytest.raises(ModelError, match="cannot lower opset 11 to 9"):
        opset.upgrade(graph, 9)


def test_large_weights_are_the_same_arrays_after_the_upgrade(write):
    model = exporter_model(11)
    big = np.random.default_rng(2).standard_normal((32, 6400)).astype(np.float32)
    assert big.size > SKELETON_MAX_ELEMENTS  # converted as a typed input, attached again after
    model.graph.initializer.append(_c("big", big))
    model.graph.node.append(helper.make_node("MatMul", ["f", "big"], ["z"], name="wide"))
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 6400]))
    graph = io.load(write(model))
    upgraded = opset.upgrade(graph, 13, {"x": X})
    assert upgraded.tensors()["big"].values is graph.tensors()["big"].values
    assert [t.name for t in upgraded.inputs] == ["x"] and [t.name for t in upgraded.outputs] == ["y", "z"]


def test_converter_failure_names_the_op_and_node():
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], to="INT64", name="to_int")], "old",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [2])]), opset_imports=[helper.make_opsetid("", 5)])
    with pytest.raises(ModelError, match="no adapter for op Cast from opset 5") as info:
        opset.upgrade(gs.import_onnx(model), 13)
    assert info.value.node == "to_int" and len(str(info.value).splitlines()) == 1


def test_a_conversion_that_changes_the_outputs_is_refused(write):
    graph = io.load(write(exporter_model(11)))
    with pytest.raises(ModelError, match="computes something else: output 'y'") as info:
        opset.upgrade(graph, 13, {"x": X}, check=lambda ref, out: "differs")
    assert str(info.value).startswith(str(graph.props.source))


def test_model_local_functions_are_converted_and_kept(tmp_path):
    body = [helper.make_node("Unsqueeze", ["a"], ["t"], axes=[0]), helper.make_node("Relu", ["t"], ["b"])]
    function = helper.make_function("local", "lift", ["a"], ["b"], body, [helper.make_opsetid("", 11)])
    model = helper.make_model(helper.make_graph(
        [helper.make_node("lift", ["x"], ["y"], domain="local", name="call")], "f",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3])]),
        opset_imports=[helper.make_opsetid("", 11), helper.make_opsetid("local", 1)], functions=[function])
    model.ir_version = 8
    onnx.save(model, tmp_path / "f.onnx")
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    upgraded = export(opset.upgrade(io.load(tmp_path / "f.onnx"), 13, {"x": x}))
    assert [f.name for f in upgraded.functions] == ["lift"]
    assert [(o.domain, o.version) for o in upgraded.functions[0].opset_import] == [("", 13)]
    assert [n.op_type for n in upgraded.functions[0].node] == ["Constant", "Unsqueeze", "Relu"]
    np.testing.assert_array_equal(ort.run(upgraded, {"x": x})["y"], np.maximum(x, 0)[None])


def test_upgrade_in_place_keeps_the_object_and_its_model_data(write):
    graph = io.load(write(exporter_model(9)))
    opset.upgrade_in_place(graph, 13, {"x": X})
    assert isinstance(graph, ModelGraph) and opset_of(graph) == 13
    assert graph.props.metadata == (("character", "0123456789abc"),)
    assert ort.run(graph, {"x": X})["y"].shape == (1, 10)
