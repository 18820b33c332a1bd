"""Input data: .npz, a folder of .npy, a single .npy, random feeds; errors are DataError."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from graphopt.ir.data import InputSpec, batches, input_specs, load_feeds, random_feeds
from graphopt.ir.errors import DataError

SPEC = InputSpec("input", np.dtype(np.float32), (None, 3))


def test_npz_by_name_and_by_x(tmp_path):
    np.savez(tmp_path / "a.npz", input=np.ones((5, 3)))
    np.savez(tmp_path / "b.npz", x=np.ones((5, 3)))
    for name in ("a.npz", "b.npz"):
        feeds = load_feeds(tmp_path / name, [SPEC], limit=2)
        assert feeds["input"].shape == (2, 3) and feeds["input"].dtype == np.float32


def test_folder_of_npy(tmp_path):
    np.save(tmp_path / "input.npy", np.zeros((4, 3), np.float64))
    assert load_feeds(tmp_path, [SPEC])["input"].dtype == np.float32


def test_single_npy_file_is_x(tmp_path):
    np.save(tmp_path / "images.npy", np.zeros((4, 3)))
    assert load_feeds(tmp_path / "images.npy", [SPEC])["input"].shape == (4, 3)


def test_scalar_input_with_limit(tmp_path):
    np.savez(tmp_path / "s.npz", x=np.float32(2))
    feeds = load_feeds(tmp_path / "s.npz", [InputSpec("k", np.dtype(np.float32), ())], limit=8)
    assert feeds["k"].shape == ()


@pytest.mark.parametrize("content,fragment", [
    (b"PK\x03\x04garbage", "cannot read input data"), (b"", "cannot read input data"),
    (b"hello", "cannot read input data")])
def test_unreadable_file(tmp_path, content, fragment):
    (tmp_path / "d.npz").write_bytes(content)
    with pytest.raises(DataError, match=fragment) as info:
        load_feeds(tmp_path / "d.npz", [SPEC])
    assert "d.npz" in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="absent.npz"):
        load_feeds(tmp_path / "absent.npz", [SPEC])


def test_missing_input_and_wrong_rank(tmp_path):
    np.savez(tmp_path / "d.npz", other=np.ones((2, 3)), input=np.ones(3))
    with pytest.raises(DataError, match="no array for model input 'z'"):
        load_feeds(tmp_path / "d.npz", [InputSpec("z", np.dtype(np.float32), (1,))])
    with pytest.raises(DataError, match="input 'input' needs rank 2"):
        load_feeds(tmp_path / "d.npz", [SPEC])


def test_uncastable_array(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.array([["a", "b", "c"]]))
    with pytest.raises(DataError, match="cannot be cast to float32 for input 'input'"):
        load_feeds(tmp_path / "d.npz", [SPEC])


def test_input_specs_and_random_feeds_for_types_numpy_lacks():
    graph = gs.import_onnx(helper.make_model(helper.make_graph(
        [helper.make_node("Cast", ["b"], ["y"], to=TensorProto.FLOAT), helper.make_node("Cast", ["i"], ["z"], to=1)],
        "g", [helper.make_tensor_value_info("b", TensorProto.BFLOAT16, ["n", 2]),
              helper.make_tensor_value_info("i", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])))
    specs = input_specs(graph)
    assert [(s.name, s.dtype.name, s.shape) for s in specs] == [("b", "bfloat16", ("n", 2)), ("i", "int64", (3,))]
    feeds = random_feeds(specs, seed=1, batch=4)
    assert feeds["b"].shape == (4, 2) and feeds["i"].dtype == np.int64


def test_batches():
    feeds = {"a": np.arange(5), "b": np.arange(10)}
    assert [len(b["a"]) for b in batches(feeds, 2)] == [2, 2, 1]
    assert list(batches({}, 2)) == []
