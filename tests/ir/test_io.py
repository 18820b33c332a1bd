"""io.load refuses untrusted model files with one ModelError naming the file, the node or tensor
and what is wrong; io.save writes atomically, with external data past the protobuf limit."""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from graphopt.ir import io
from graphopt.ir.errors import ModelError


def load_error(path, *fragments: str) -> ModelError:
    """Load `path`, expect a ModelError whose message names the file and holds every fragment."""
    with pytest.raises(ModelError) as info:
        io.load(path)
    message = str(info.value)
    assert path.name in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return info.value


def test_valid_model_loads(model, write):
    graph = io.load(write(model))
    assert [n.op for n in graph.nodes] == ["MatMul", "Add", "Relu"]
    np.testing.assert_array_equal(graph.tensors()["W"].values, np.arange(12, dtype=np.float32).reshape(3, 4))


# --- files that are not ONNX models -------------------------------------------------------------

def test_missing_file(tmp_path):
    load_error(tmp_path / "absent.onnx", "no such file")


def test_directory(tmp_path):
    (tmp_path / "dir.onnx").mkdir()
    load_error(tmp_path / "dir.onnx", "not a file")


def test_empty_file(tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    load_error(tmp_path / "empty.onnx", "empty")


def test_random_bytes(tmp_path):
    (tmp_path / "random.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    load_error(tmp_path / "random.onnx", "not an ONNX model")


@pytest.mark.parametrize("name", ["notes.onnx", "notes.txt", "notes.json", "notes.onnxtxt"])
def test_text_file(tmp_path, name):
    # Whatever the extension, the file is read as binary protobuf, not as text or JSON.
    (tmp_path / name).write_text("this is a text file\nnot a model\n")
    load_error(tmp_path / name, "not an ONNX model")


def test_json_object_is_not_parsed_as_json(tmp_path):
    (tmp_path / "m.json").write_text("{}")
    load_error(tmp_path / "m.json", "not an ONNX model")


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.99])
def test_truncated_file(model, write, fraction):
    path = write(model)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * fraction)])
    load_error(path)


def test_protobuf_without_graph(write):
    load_error(write(onnx.ModelProto(ir_version=8)), "no graph")


# --- tensors whose declared size does not match their data --------------------------------------

def test_raw_data_too_short(model, write):
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:-4]
    load_error(write(model), "initializer 'W'", "[3, 4]", "48 bytes", "holds 44 bytes")


def test_raw_data_too_long(model, write):
    model.graph.initializer[1].raw_data += b"\0" * 8
    load_error(write(model), "initializer 'B'", "16 bytes", "holds 24 bytes")


def test_typed_data_wrong_length(model, write):
    b = helper.make_tensor("B", TensorProto.FLOAT, [4], [1.0, 2.0, 3.0, 4.0])
    del b.float_data[-1]
    model.graph.initializer[1].CopyFrom(b)
    load_error(write(model), "initializer 'B'", "4 elements", "holds 3 values")


def test_int64_data_wrong_length(model, write):
    s = helper.make_tensor("S", TensorProto.INT64, [2, 2], [1, 2, 3, 4])
    s.int64_data.append(5)
    model.graph.initializer.append(s)
    load_error(write(model), "initializer 'S'", "4 elements", "holds 5 values")


def test_string_data_wrong_length(model, write):
    s = helper.make_tensor("S", TensorProto.STRING, [3], [b"a", b"b", b"c"])
    del s.string_data[-1]
    model.graph.initializer.append(s)
    load_error(write(model), "initializer 'S'", "3 strings", "holds 2")


def test_negative_dims(model, write):
    model.graph.initializer[1].dims[0] = -4
    load_error(write(model), "initializer 'B'", "negative dims")


def test_invalid_data_type(model, write):
    model.graph.initializer[1].data_type = 999
    load_error(write(model), "initializer 'B'", "invalid data type 999")


def test_huge_declared_size_is_refused_before_allocating(model, write):
    model.graph.initializer[1].dims[:] = [1 << 40, 1 << 10]
    load_error(write(model), "initializer 'B'", "over the")


def test_constant_attribute_wrong_size_names_the_node(model, write):
    value = numpy_helper.from_array(np.ones(4, dtype=np.float32))
    value.raw_data = value.raw_data[:8]
    model.graph.node.insert(0, helper.make_node("Constant", [], ["B"], name="const_b", value=value))
    del model.graph.initializer[1]
    error = load_error(write(model), "node 'const_b'", "Constant attribute tensor", "holds 8 bytes")
    assert error.node == "const_b"


@pytest.mark.parametrize("dtype,count,nbytes", [
    (TensorProto.INT4, 5, 3), (TensorProto.INT2, 5, 2), (TensorProto.FLOAT6E2M3, 5, 4)])
def test_packed_types_load_and_are_size_checked(model, write, dtype, count, nbytes):
    tensor = helper.make_tensor("Q", dtype, [count], np.zeros(count), raw=False)
    raw = numpy_helper.from_array(numpy_helper.to_array(tensor), "Q")
    assert len(raw.raw_data) == nbytes
    model.graph.initializer.append(raw)
    model.graph.node.append(helper.make_node("Cast", ["Q"], ["q"], name="cast", to=TensorProto.FLOAT))
    model.graph.output.append(helper.make_tensor_value_info("q", TensorProto.FLOAT, [count]))
    model.opset_import[0].version, model.ir_version = 25, 13
    io.load(write(model))
    model.graph.initializer[-1].raw_data = raw.raw_data[:-1]
    load_error(write(model), "initializer 'Q'", f"{nbytes} bytes", f"holds {nbytes - 1} bytes")


# --- external data ------------------------------------------------------------------------------

def external(model: onnx.ModelProto, location: str, **fields: int | str) -> onnx.ModelProto:
    """Point initializer W at `location` (with offset/length fields as given) instead of raw_data."""
    w = model.graph.initializer[0]
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    w.external_data.add(key="location", value=location)
    for key, value in fields.items():
        w.external_data.add(key=key, value=str(value))
    return model


W_BYTES = np.arange(12, dtype=np.float32).tobytes()


def test_valid_external_data_loads(model, tmp_path):
    path = tmp_path / "m.onnx"
    big = np.arange(1024, dtype=np.float32).reshape(256, 4)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(big, "W"))
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 256]))
    onnx.save_model(model, str(path), save_as_external_data=True, location="m.data", size_threshold=0)
    assert (tmp_path / "m.data").exists()
    np.testing.assert_array_equal(io.load(path).tensors()["W"].values, big)


def test_valid_external_data_in_constant_node_loads(model, tmp_path):
    path = tmp_path / "m.onnx"
    weights = np.arange(12, dtype=np.float32).reshape(3, 4) * 2
    del model.graph.initializer[0]
    model.graph.node.insert(0, helper.make_node("Constant", [], ["W"], name="const_w",
                                                value=numpy_helper.from_array(weights)))
    onnx.save_model(model, str(path), save_as_external_data=True, location="m.data", size_threshold=0,
                    convert_attribute=True)
    np.testing.assert_array_equal(io.load(path).tensors()["W"].values, weights)


def test_hand_written_external_data_loads(model, write, tmp_path):
    (tmp_path / "w.bin").write_bytes(b"\0" * 16 + W_BYTES)
    graph = io.load(write(external(model, "w.bin", offset=16, length=48)))
    np.testing.assert_array_equal(graph.tensors()["W"].values.ravel(), np.arange(12, dtype=np.float32))


def test_external_data_in_parent_folder(model, write, tmp_path):
    (tmp_path / "secret.bin").write_bytes(W_BYTES)
    load_error(write(external(model, "../secret.bin"), "sub/m.onnx"),
               "initializer 'W'", "'../secret.bin'", "outside the model's folder")


def test_external_data_absolute_path(model, write, tmp_path):
    (tmp_path / "secret.bin").write_bytes(W_BYTES)
    location = str(tmp_path / "secret.bin")
    load_error(write(external(model, location), "sub/m.onnx"), "initializer 'W'", "outside the model's folder")


def test_external_data_absolute_path_inside_folder_is_refused(model, write, tmp_path):
    (tmp_path / "w.bin").write_bytes(W_BYTES)
    load_error(write(external(model, str(tmp_path / "w.bin"))), "outside the model's folder")


def test_external_data_symlink_pointing_outside(model, write, tmp_path):
    (tmp_path / "secret.bin").write_bytes(W_BYTES)
    (tmp_path / "sub").mkdir()
    os.symlink(tmp_path / "secret.bin", tmp_path / "sub" / "w.bin")
    load_error(write(external(model, "w.bin"), "sub/m.onnx"), "'w.bin'", "outside the model's folder")


def test_external_data_symlink_inside_folder(model, write, tmp_path):
    (tmp_path / "w.bin").write_bytes(W_BYTES)
    os.symlink("w.bin", tmp_path / "link.bin")
    load_error(write(external(model, "link.bin")), "'link.bin'", "symbolic link")


def test_external_data_missing_file(model, write):
    load_error(write(external(model, "nowhere.bin")), "initializer 'W'", "'nowhere.bin'", "does not exist")


def test_external_data_location_is_a_folder(model, write, tmp_path):
    (tmp_path / "data").mkdir()
    load_error(write(external(model, "data")), "'data'", "not a file")


def test_external_data_without_location(model, write):
    load_error(write(external(model, "")), "initializer 'W'", "no location")


def test_external_data_location_with_nul_byte(model, write):
    load_error(write(external(model, "w\0.bin")), "initializer 'W'", "invalid external data location")


@pytest.mark.parametrize("key,value", [("offset", "abc"), ("offset", "-1"), ("length", "4x")])
def test_external_data_bad_offset_or_length(model, write, tmp_path, key, value):
    (tmp_path / "w.bin").write_bytes(W_BYTES)
    load_error(write(external(model, "w.bin", **{key: value})), "initializer 'W'", f"invalid external data {key}")


def test_external_data_length_mismatch(model, write, tmp_path):
    (tmp_path / "w.bin").write_bytes(W_BYTES)
    load_error(write(external(model, "w.bin", offset=0, length=40)),
               "initializer 'W'", "declares 48 bytes", "'w.bin' is 40 bytes")


def test_external_data_file_too_short_without_length(model, write, tmp_path):
    (tmp_path / "w.bin").write_bytes(W_BYTES[:40])
    load_error(write(external(model, "w.bin")), "initializer 'W'", "declares 48 bytes", "is 40 bytes")


def test_external_data_file_too_long_without_length(model, write, tmp_path):
    # With no length onnx reads to the end of the file, which would give W 52 bytes.
    (tmp_path / "w.bin").write_bytes(W_BYTES + b"\0" * 4)
    load_error(write(external(model, "w.bin")), "initializer 'W'", "declares 48 bytes", "is 52 bytes")


def test_external_data_reads_past_end_of_file(model, write, tmp_path):
    (tmp_path / "w.bin").write_bytes(W_BYTES)
    load_error(write(external(model, "w.bin", offset=8, length=48)),
               "initializer 'W'", "reads bytes 8..56 of 'w.bin'", "past its end at 48")


def test_external_data_offset_past_end_of_file(model, write, tmp_path):
    (tmp_path / "w.bin").write_bytes(W_BYTES)
    load_error(write(external(model, "w.bin", offset=4096, length=48)), "initializer 'W'", "past its end")


def test_external_string_tensor_is_refused_before_reading(model, write, tmp_path):
    (tmp_path / "secret.bin").write_bytes(b"secret")
    strings = helper.make_tensor("S", TensorProto.STRING, [0], [])
    strings.data_location = TensorProto.EXTERNAL
    strings.external_data.add(key="location", value="../secret.bin")
    model.graph.initializer.append(strings)
    load_error(write(model, "sub/m.onnx"), "initializer 'S'", "external data")


# --- graph structure and opsets -----------------------------------------------------------------

def test_cyclic_graph(model, write):
    # add now also consumes relu's output, which consumes add's: add -> relu -> add.
    model.graph.node[1].input[1] = "y"
    error = load_error(write(model), "cycle", "add -> relu -> add")
    assert error.node == "add"


def test_node_feeding_itself(model, write):
    model.graph.node[2].input[0] = "y"
    load_error(write(model), "node 'relu'", "cycle", "relu -> relu")


def test_cycle_inside_subgraph(model, write):
    body = helper.make_graph(
        [helper.make_node("Neg", ["b"], ["a"], name="neg"), helper.make_node("Abs", ["a"], ["b"], name="abs")],
        "then", [], [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 4])])
    other = helper.make_graph([helper.make_node("Identity", ["y"], ["c"], name="id")], "else", [],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2, 4])])
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    model.graph.node.append(helper.make_node("If", ["cond"], ["z"], name="if", then_branch=body, else_branch=other))
    model.graph.output[0].name = "z"
    load_error(write(model), "graph 'then'", "cycle", "neg -> abs -> neg")


def test_node_in_unknown_opset_domain_is_refused_by_name(model, write):
    model.opset_import.append(helper.make_opsetid("com.example.nobody", 1))
    model.graph.node[2].domain = "com.example.nobody"
    error = load_error(write(model), "node 'relu'", "unknown opset domain 'com.example.nobody'")
    assert error.node == "relu"


@pytest.mark.parametrize("domain", ["ai.onnx.training", "com.example.nobody"])
def test_declared_domain_no_node_uses_is_accepted_and_kept(model, write, tmp_path, domain):
    # onnxruntime's quant_pre_process declares ai.onnx.training without using it.
    model.opset_import.append(helper.make_opsetid(domain, 1))
    graph = io.load(write(model))
    saved = onnx.load(str(io.save(graph, tmp_path / "out.onnx")))
    assert (domain, 1) in [(o.domain, o.version) for o in saved.opset_import]


def test_node_domain_not_imported(model, write):
    model.graph.node[2].domain = "com.microsoft"
    error = load_error(write(model), "node 'relu'", "domain 'com.microsoft'", "does not import")
    assert error.node == "relu"


def test_ai_onnx_spelling_of_the_default_domain(model, write):
    # onnx.checker and onnxruntime both take an "ai.onnx" opset_import for nodes in domain "".
    model.opset_import[0].domain = "ai.onnx"
    assert len(io.load(write(model)).nodes) == 3


def test_checker_failure_names_the_node(model, write):
    model.graph.node[2].attribute.append(helper.make_attribute("alpha", 0.5))
    load_error(write(model), "ONNX checker", "relu")


def test_no_opset_import(model, write):
    del model.opset_import[:]
    load_error(write(model), "no opset_import")


# --- Constant nodes become initializers ---------------------------------------------------------

def test_constant_nodes_become_initializers(model, write):
    del model.graph.initializer[:]
    weights = np.arange(12, dtype=np.float32).reshape(3, 4)
    model.graph.node.insert(0, helper.make_node("Constant", [], ["W"], name="cw", value=numpy_helper.from_array(weights)))
    model.graph.node.insert(0, helper.make_node("Constant", [], ["B"], name="cb", value_floats=[1.0, 2.0, 3.0, 4.0]))
    graph = io.load(write(model))
    assert [n.op for n in graph.nodes] == ["MatMul", "Add", "Relu"]
    tensors = graph.tensors()
    assert isinstance(tensors["W"], gs.Constant) and isinstance(tensors["B"], gs.Constant)
    np.testing.assert_array_equal(tensors["W"].values, weights)
    np.testing.assert_array_equal(tensors["B"].values, np.array([1, 2, 3, 4], dtype=np.float32))


def test_constant_graph_output_stays_a_node(model, write):
    model.graph.node.append(helper.make_node("Constant", [], ["k"], name="ck", value_int=3))
    model.graph.output.append(helper.make_tensor_value_info("k", TensorProto.INT64, []))
    graph = io.load(write(model))
    assert "Constant" in [n.op for n in graph.nodes]


# --- save ---------------------------------------------------------------------------------------

def test_save_round_trip(model, write, tmp_path):
    graph = io.load(write(model))
    out = io.save(graph, tmp_path / "out" / "m.opt.onnx")
    assert out.exists() and os.listdir(out.parent) == ["m.opt.onnx"]
    np.testing.assert_array_equal(io.load(out).tensors()["W"].values, graph.tensors()["W"].values)


def test_save_failure_leaves_existing_file_and_no_temporaries(model, tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous")

    def fail(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(io.onnx, "save_model", fail)
    with pytest.raises(OSError):
        io.save(model, path)
    assert path.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["m.onnx"]


def test_save_over_limit_writes_external_data(model, tmp_path, monkeypatch):
    monkeypatch.setattr(io, "PROTOBUF_LIMIT", 1024)
    weights = np.arange(1024, dtype=np.float32).reshape(256, 4)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(weights, "W"))
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 256]))
    before = model.SerializeToString()
    out = io.save(model, tmp_path / "m.onnx")
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]
    assert (tmp_path / "m.onnx").stat().st_size < 4096 <= (tmp_path / "m.onnx.data").stat().st_size
    np.testing.assert_array_equal(io.load(out).tensors()["W"].values, weights)
    # The caller's model keeps its weights inline.
    assert model.SerializeToString() == before


def test_save_over_limit_with_only_small_tensors(model, tmp_path, monkeypatch):
    # No tensor reaches onnx's external-data threshold, so no data file is written.
    monkeypatch.setattr(io, "PROTOBUF_LIMIT", 16)
    out = io.save(io.load_model(io.save(model, tmp_path / "a.onnx")), tmp_path / "b.onnx")
    assert io.load(out).tensors()["W"].values.shape == (3, 4)


def test_save_graph_over_limit(model, write, tmp_path, monkeypatch):
    graph = io.load(write(model))
    graph.tensors()["W"].values = np.ones((3, 4096), dtype=np.float32)
    graph.tensors()["y"].shape = [2, 4096]
    graph.nodes[1].inputs[1].values = np.ones(4096, dtype=np.float32)
    monkeypatch.setattr(io, "PROTOBUF_LIMIT", 1024)
    out = io.save(graph, tmp_path / "out" / "model.opt.onnx")
    assert (out.parent / "model.opt.onnx.data").exists()
    assert io.load(out).tensors()["W"].values.shape == (3, 4096)


# --- fuzz ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_bases(tmp_path_factory, make_model) -> dict:
    """The small model inline, and with a Constant node, an If subgraph and all weights in ext.data."""
    folder = tmp_path_factory.mktemp("fuzz")
    model = make_model()
    model.graph.node.insert(0, helper.make_node("Constant", [], ["K"], name="ck",
                                                value=numpy_helper.from_array(np.ones(4, np.float32))))
    model.graph.node.append(helper.make_node("Mul", ["y", "K"], ["z"], name="mul"))
    then = helper.make_graph([helper.make_node("Neg", ["z"], ["a"], name="neg")], "then", [],
                             [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 4])])
    other = helper.make_graph([helper.make_node("Abs", ["z"], ["b"], name="abs")], "else", [],
                              [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 4])])
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    model.graph.node.append(helper.make_node("If", ["cond"], ["o"], name="if", then_branch=then, else_branch=other))
    model.graph.output[0].name = "o"
    onnx.save_model(model, str(folder / "ext.onnx"), save_as_external_data=True, location="ext.data",
                    size_threshold=0, convert_attribute=True)
    io.load(folder / "ext.onnx")
    return {"folder": folder, "inline": make_model().SerializeToString(),
            "external": (folder / "ext.onnx").read_bytes()}


# onnx warns about, and ignores, the unknown external-data keys that flipped bytes make.
@pytest.mark.filterwarnings("ignore:Ignoring unknown external data key")
@settings(max_examples=1000, deadline=None)
@given(base=st.sampled_from(["inline", "external"]), cut=st.floats(0, 1),
       flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), max_size=6))
def test_fuzzed_file_loads_or_raises_model_error(fuzz_bases, base, cut, flips):
    """Flip bytes at random places and truncate at a random fraction (1.0 keeps the whole file)."""
    data = bytearray(fuzz_bases[base])
    for where, mask in flips:
        data[min(int(where * len(data)), len(data) - 1)] ^= mask
    path = fuzz_bases["folder"] / "fuzz.onnx"
    path.write_bytes(bytes(data[:int(cut * len(data))] if cut < 1 else data))
    try:
        io.load(path)
    except ModelError as e:
        assert "fuzz.onnx" in str(e)


def test_nodes_out_of_order_are_sorted_on_load(tmp_path):
    # Some exporters write producers after their readers; onnxruntime runs such a file, the ONNX
    # checker refuses it. Loading sorts an acyclic graph and keeps an already sorted one as it is.
    nodes = [helper.make_node("Relu", ["a"], ["y"], name="second"), helper.make_node("Neg", ["x"], ["a"], name="first"),
             helper.make_node("Abs", ["y"], ["z"], name="third")]
    graph = helper.make_graph(nodes, "unsorted", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [3])])
    path = tmp_path / "unsorted.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    loaded = io.load(path)
    assert [n.name for n in loaded.nodes] == ["first", "second", "third"]
    saved = onnx.load(str(io.save(loaded, tmp_path / "sorted.onnx")))
    onnx.checker.check_model(saved)
    assert [n.name for n in saved.graph.node] == ["first", "second", "third"]
