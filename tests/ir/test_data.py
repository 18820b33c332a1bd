"""Input data: .npz, a folder of .npy, a single .npy, random feeds; errors are DataError."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from graphopt.ir.data import Batching, InputSpec, check_feeds, input_specs, load_feeds, random_feeds
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
    with pytest.raises(DataError, match=r"d.npz: input 'input': the data has shape \(3,\) \(rank 1\), the model "
                                        r"wants rank 2 \(\[\?, 3\]\)"):
        load_feeds(tmp_path / "d.npz", [SPEC])


def test_uncastable_array(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.array([["a", "b", "c"]]))
    with pytest.raises(DataError, match="input 'input': the data is <U1, the model wants float32$"):
        load_feeds(tmp_path / "d.npz", [SPEC])


IMAGE = InputSpec("x", np.dtype(np.float32), ("N", 1, 28, 28))


@pytest.mark.parametrize("array, message", [
    (np.zeros((4, 1, 32, 28), np.float32), "data.npz: input 'x': dim 2 is 32, the model wants 28"),
    (np.zeros((4, 1, 28), np.float32), "data.npz: input 'x': the data has shape (4, 1, 28) (rank 3), the model wants rank 4"),
    (np.zeros((4, 1, 28, 28), np.int64), None),  # ints are exact in float32 up to 2**24: cast
])
def test_every_static_dim_and_the_rank_are_checked(array, message):
    if message is None:
        assert check_feeds({"x": array}, [IMAGE], "data.npz")["x"].dtype == np.float32
        return
    with pytest.raises(DataError) as info:
        check_feeds({"x": array}, [IMAGE], "data.npz")
    assert str(info.value).startswith(message)


def test_dtype_kinds_that_would_lose_values_are_refused():
    ids = InputSpec("input_ids", np.dtype(np.int64), ("N", "T"))
    with pytest.raises(DataError, match=r"input 'input_ids': the data is float32, the model wants int64 \(the values"):
        check_feeds({"input_ids": np.full((2, 5), 1.5, np.float32)}, [ids])
    assert check_feeds({"input_ids": np.full((2, 5), 7.0)}, [ids])["input_ids"].dtype == np.int64  # whole numbers
    mask = InputSpec("mask", np.dtype(np.bool_), ("N", "T"))
    assert check_feeds({"mask": np.ones((2, 5), np.int32)}, [mask])["mask"].dtype == np.bool_
    with pytest.raises(DataError, match="input 'mask': the data is int32, the model wants bool"):
        check_feeds({"mask": np.full((2, 5), 7, np.int32)}, [mask])


def test_one_symbolic_name_on_inputs_of_different_lengths_is_no_batch():
    # Exporters reuse a dim name for unrelated dims (a text model's characters and phonemes, both
    # 'N'); onnxruntime lets them differ, so the data is taken, and neither input is sliced.
    specs = [InputSpec("chars", np.dtype(np.int64), ("N",)), InputSpec("phones", np.dtype(np.int64), ("N",))]
    feeds = check_feeds({"chars": np.zeros(3, np.int64), "phones": np.ones(6, np.int64)}, specs)
    batching = Batching.of(specs, feeds)
    assert batching.batched == frozenset() and batching.samples == 1
    assert [b["phones"].shape for b in batching.batches(feeds, 2)] == [(6,)]


def test_a_fixed_batch_takes_a_multiple_of_itself():
    spec = InputSpec("x", np.dtype(np.float32), (8, 3))
    assert check_feeds({"x": np.zeros((24, 3))}, [spec])["x"].shape == (24, 3)
    with pytest.raises(DataError, match=r"dim 0 is 20, the model wants 8 \(or a multiple of it, run 8 at a time\)"):
        check_feeds({"x": np.zeros((20, 3))}, [spec])


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


def test_random_feeds_for_token_ids_masks_token_types_and_positions():
    specs = [InputSpec(n, np.dtype(np.int64), ("N", "T")) for n in
             ("input_ids", "attention_mask", "token_type_ids", "position_ids", "sr")]
    feeds = random_feeds(specs, seed=3, shapes={n.name: (2, 64) for n in specs})
    assert feeds["input_ids"].shape == (2, 64) and 0 <= feeds["input_ids"].min() and feeds["input_ids"].max() < 100
    assert feeds["input_ids"].max() > 10  # not all the same few ids
    assert (feeds["attention_mask"] == 1).all() and (feeds["token_type_ids"] == 0).all()
    assert (feeds["position_ids"] == np.arange(64)).all()
    assert feeds["sr"].max() < 4
    scalar = random_feeds([InputSpec("s", np.dtype(np.float32), ())], shapes={"s": ()})
    assert scalar["s"].shape == ()


SPECS = [InputSpec("x", np.dtype(np.float32), ("N", 4)), InputSpec("s", np.dtype(np.float32), ()),
         InputSpec("h", np.dtype(np.float32), (2, 1, 3)), InputSpec("tokens", np.dtype(np.int64), ("N", "T"))]


def test_batching_slices_inputs_with_a_batch_axis_and_holds_the_others():
    feeds = {"x": np.zeros((5, 4)), "s": np.float32(2), "h": np.zeros((2, 1, 3)), "tokens": np.zeros((5, 7))}
    batching = Batching.of(SPECS, feeds)
    assert batching == Batching(frozenset({"x", "tokens"}), 5, None)
    runs = list(batching.batches(feeds, 2))
    assert [r["x"].shape[0] for r in runs] == [2, 2, 1] and all(r["s"].shape == () for r in runs)
    assert all(r["h"].shape == (2, 1, 3) for r in runs) and runs[2]["tokens"].shape == (1, 7)
    assert batching.first(feeds, 3)["tokens"].shape == (3, 7) and batching.first(feeds, 3)["h"].shape == (2, 1, 3)
    assert batching.sample_shapes(feeds) == {"x": (1, 4), "s": (), "h": (2, 1, 3), "tokens": (1, 7)}


def test_batching_of_a_fixed_batch_and_of_scalars_only():
    fixed = Batching.of([InputSpec("x", np.dtype(np.float32), (8, 3))], {"x": np.zeros((24, 3))})
    assert fixed == Batching(frozenset({"x"}), 24, 8)
    assert fixed.first({"x": np.zeros((24, 3))}, 1)["x"].shape == (8, 3)
    scalars = Batching.of([SPECS[1]], {"s": np.float32(1)})
    assert scalars == Batching(frozenset(), 1, None)
    assert [r["s"] for r in scalars.batches({"s": np.float32(1)}, 4)] == [1]


def test_limit_cuts_samples_only(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((10, 4)), s=np.float32(1), h=np.zeros((2, 1, 3)), tokens=np.zeros((10, 7)))
    feeds = load_feeds(tmp_path / "d.npz", SPECS, limit=4)
    assert {k: v.shape for k, v in feeds.items()} == {"x": (4, 4), "s": (), "h": (2, 1, 3), "tokens": (4, 7)}
