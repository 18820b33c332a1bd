"""Kernels TOPI writes by hand as one opaque block of loops (ScatterElements, ScatterND, TopK)
compile with graphopt's default CPU schedules, which leave them as written, and agree with
onnxruntime: every reduction mode, negative axes, negative and repeated indices, and the message
passing of a PaiNN graph network (Gather -> Mul -> ScatterElements(add) into zeros)."""
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import codegen
from graphopt.ir import ort

REDUCTIONS = ["none", "add", "mul", "max", "min"]


def model_of(nodes, feeds: dict[str, np.ndarray], outputs: list[str], inits=(), opset: int = 18) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in feeds.items()]
    graph = helper.make_graph(nodes, "scatter", inputs,
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def assert_agrees(model: onnx.ModelProto, feeds: dict[str, np.ndarray], tmp_path, **shapes) -> None:
    library = codegen.load(codegen.compile(model, "x86", tmp_path, shapes=shapes or None).library)
    got, expected = library.run(feeds), ort.run(model, feeds)
    assert set(got) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-5, err_msg=name)


def scatter_indices(rng, shape: tuple[int, ...], axis: int, size: int, repeated: bool) -> np.ndarray:
    """Indices along `axis` into `size` positions, half of them negative; without repeats (the
    only case ONNX defines for reduction "none") each line along `axis` is a permutation."""
    if repeated:
        indices = rng.integers(0, size, shape)
    else:
        lines = np.moveaxis(np.zeros(shape, np.int64), axis, -1)
        indices = np.moveaxis(np.apply_along_axis(lambda _: rng.permutation(size)[:shape[axis]], -1, lines), -1, axis)
    return (indices - size * (rng.random(shape) < 0.5)).astype(np.int64)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_scatter_elements_agrees_with_onnxruntime_along_every_axis(reduction, tmp_path):
    rng = np.random.default_rng(REDUCTIONS.index(reduction))
    repeated = reduction != "none"
    data = rng.standard_normal((5, 4)).astype(np.float32)
    feeds = {"data": data,
             "i0": scatter_indices(rng, (3 if not repeated else 7, 4), 0, 5, repeated),
             "i1": scatter_indices(rng, (5, 3 if not repeated else 6), 1, 4, repeated)}
    feeds["u0"] = rng.standard_normal(feeds["i0"].shape).astype(np.float32)
    feeds["u1"] = rng.standard_normal(feeds["i1"].shape).astype(np.float32)
    attrs = {} if reduction == "none" else {"reduction": reduction}
    nodes = [helper.make_node("ScatterElements", ["data", "i0", "u0"], ["y0"], axis=0, **attrs),
             helper.make_node("ScatterElements", ["data", "i1", "u1"], ["y1"], axis=1, **attrs),
             helper.make_node("ScatterElements", ["data", "i1", "u1"], ["y_last"], axis=-1, **attrs)]
    assert_agrees(model_of(nodes, feeds, ["y0", "y1", "y_last"]), feeds, tmp_path)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_scatter_nd_agrees_with_onnxruntime_for_slices_and_elements(reduction, tmp_path):
    rng = np.random.default_rng(10 + REDUCTIONS.index(reduction))
    repeated = reduction != "none"
    rows = [[1], [3], [-1]] + ([[1]] if repeated else [])
    cells = [[0, 1], [2, -1]] + ([[0, 1]] if repeated else [])
    feeds = {"data": rng.standard_normal((5, 4, 3)).astype(np.float32),
             "rows": np.array(rows, np.int64), "row_updates": rng.standard_normal((len(rows), 4, 3)).astype(np.float32),
             "cells": np.array(cells, np.int64), "cell_updates": rng.standard_normal((len(cells), 3)).astype(np.float32)}
    attrs = {} if reduction == "none" else {"reduction": reduction}
    nodes = [helper.make_node("ScatterND", ["data", "rows", "row_updates"], ["by_rows"], **attrs),
             helper.make_node("ScatterND", ["data", "cells", "cell_updates"], ["by_cells"], **attrs)]
    assert_agrees(model_of(nodes, feeds, ["by_rows", "by_cells"]), feeds, tmp_path)


def test_topk_agrees_with_onnxruntime(tmp_path):
    feeds = {"x": np.random.default_rng(20).standard_normal((5, 7)).astype(np.float32)}
    nodes = [helper.make_node("TopK", ["x", "k"], ["values", "indices"], axis=-1),
             helper.make_node("Cast", ["indices"], ["positions"], to=TensorProto.FLOAT)]
    model = model_of(nodes, feeds, ["values", "positions"], [numpy_helper.from_array(np.array([3], np.int64), "k")])
    assert_agrees(model, feeds, tmp_path)


def message_passing() -> onnx.ModelProto:
    """h'[dst] += h[src] * w for each edge, into zeros of h's shape, as torch exports PaiNN's
    `scatter_add`: the indices unsqueezed and expanded to the messages' computed shape."""
    ints = lambda name, value: numpy_helper.from_array(np.array(value, np.int64), name)  # noqa: E731
    nodes = [helper.make_node("Gather", ["edge_index", "zero"], ["src"], axis=0),
             helper.make_node("Gather", ["edge_index", "one"], ["dst"], axis=0),
             helper.make_node("Gather", ["h", "src"], ["h_src"], axis=0),
             helper.make_node("Unsqueeze", ["w", "last"], ["w1"]),
             helper.make_node("Mul", ["h_src", "w1"], ["messages"]),
             helper.make_node("Shape", ["messages"], ["message_shape"]),
             helper.make_node("Unsqueeze", ["dst", "last"], ["dst1"]),
             helper.make_node("Expand", ["dst1", "message_shape"], ["dst_expanded"]),
             helper.make_node("Shape", ["h"], ["h_shape"]),
             helper.make_node("ConstantOfShape", ["h_shape"], ["zeros"],
                              value=numpy_helper.from_array(np.zeros(1, np.float32))),
             helper.make_node("ScatterElements", ["zeros", "dst_expanded", "messages"], ["summed"],
                              axis=0, reduction="add"),
             helper.make_node("Add", ["h", "summed"], ["y"])]
    inputs = [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["num_atoms", 16]),
              helper.make_tensor_value_info("edge_index", TensorProto.INT64, [2, "num_edges"]),
              helper.make_tensor_value_info("w", TensorProto.FLOAT, ["num_edges"])]
    graph = helper.make_graph(nodes, "painn_message", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["num_atoms", 16])],
                              [ints("zero", 0), ints("one", 1), ints("last", [-1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_graph_message_passing_with_scatter_add_agrees_with_onnxruntime(tmp_path):
    rng = np.random.default_rng(30)
    feeds = {"h": rng.standard_normal((12, 16)).astype(np.float32),
             "edge_index": rng.integers(0, 12, (2, 40)).astype(np.int64),
             "w": rng.uniform(0, 1, 40).astype(np.float32)}
    assert_agrees(message_passing(), feeds, tmp_path, **{k: v.shape for k, v in feeds.items()})


@pytest.mark.slow  # about 45 s on 2 cores
def test_the_corpus_painn_graph_network(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "corpus"))
    import corpus_lib

    entry = corpus_lib.by_id("caustic-painn")
    try:
        path = corpus_lib.fetch(entry)
    except corpus_lib.Unavailable as e:
        pytest.skip(str(e))
    feeds = corpus_lib.samples(entry)
    model = onnx.load(str(path))
    library = codegen.load(codegen.compile(model, "x86", tmp_path, shapes={k: v.shape for k, v in feeds.items()}).library)
    got, expected = library.run(feeds), ort.run(model, feeds)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-4 * float(np.abs(value).max()), err_msg=name)
