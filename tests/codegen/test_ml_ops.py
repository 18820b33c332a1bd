"""graphopt's ai.onnx.ml converters (Scaler, Normalizer, Binarizer, TreeEnsembleClassifier,
TreeEnsembleRegressor; TVM 0.27's ONNX frontend has none): each library agrees with onnxruntime
on every output, on random forests covering every node mode, missing-value tracking, base
values, aggregate functions, post-transforms and onnxruntime's two-class rules."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphopt import codegen
from graphopt.codegen import tree_ensemble
from graphopt.ir import ort
from graphopt.ir.errors import CodegenError

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
MODES = tree_ensemble.MODES
_TYPES = {np.float32: TensorProto.FLOAT, np.float64: TensorProto.DOUBLE, np.int64: TensorProto.INT64,
          np.int32: TensorProto.INT32}


def ml_model(nodes: list[onnx.NodeProto], x: np.ndarray) -> onnx.ModelProto:
    """`nodes`, all reading the graph input "x" (of `x`'s type and shape), every output a graph output."""
    outputs = [o for n in nodes for o in n.output]
    graph = helper.make_graph(nodes, "ml", [helper.make_tensor_value_info("x", _TYPES[x.dtype.type], x.shape)],
                              [onnx.ValueInfoProto(name=o) for o in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)  # the outputs' types


def assert_matches_onnxruntime(nodes: list[onnx.NodeProto], x: np.ndarray, tmp_path) -> None:
    model = ml_model(nodes, x)
    reference = ort.run(model, {"x": x})
    outputs = codegen.load(codegen.compile(model, "x86", tmp_path).library).run({"x": x})
    assert set(outputs) == set(reference)
    for name, expected in reference.items():
        assert outputs[name].dtype == expected.dtype, name
        assert outputs[name].shape == expected.shape, name
        np.testing.assert_allclose(outputs[name], expected, **TOLERANCE, err_msg=name)


def features(rows=40, columns=4, seed=0, nans=False) -> np.ndarray:
    """Values on a grid of quarters, so that thresholds drawn from it make ties (EQ, LEQ vs LT)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 12, (rows, columns)).astype(np.float32) / 4
    if nans:
        x[rng.random(x.shape) < 0.2] = np.nan
    return x


def tree_shape(rng, depth: int) -> list[list]:
    """A random tree of at most `depth` levels below its root (a branch), in preorder: for each node
    [is_branch, true child's position, false child's position]."""
    structure: list[list] = []

    def grow(level: int) -> int:
        position = len(structure)
        structure.append([False, 0, 0])
        if level < depth and (level == 0 or rng.random() < 0.75):
            structure[position] = [True, grow(level + 1), grow(level + 1)]
        return position

    grow(0)
    return structure


def random_forest(prefix: str, outputs: int, *, trees=3, depth=4, columns=4, modes=("BRANCH_LEQ",),
                  missing=False, sparse=False, signed=True, ids=None, seed=0) -> dict:
    """The attributes of a random forest: trees of uneven depth, root listed first and the other nodes
    shuffled, node ids permuted; each leaf weighs every output of `ids` (default all), or with
    `sparse` a random non-empty subset of them."""
    rng = np.random.default_rng(seed)
    ids = list(range(outputs)) if ids is None else ids
    attrs = {k: [] for k in ("nodes_treeids", "nodes_nodeids", "nodes_featureids", "nodes_modes", "nodes_values",
                             "nodes_truenodeids", "nodes_falsenodeids", "nodes_missing_value_tracks_true",
                             f"{prefix}_treeids", f"{prefix}_nodeids", f"{prefix}_ids", f"{prefix}_weights")}
    for tree in range(trees):
        structure = tree_shape(rng, depth)
        node_ids = rng.permutation(len(structure))  # onnxruntime takes ids below the node count
        order = [0, *rng.permutation(np.arange(1, len(structure)))]
        for position in order:
            branch, true_child, false_child = structure[position]
            node_id = int(node_ids[position])
            attrs["nodes_treeids"].append(tree)
            attrs["nodes_nodeids"].append(node_id)
            attrs["nodes_featureids"].append(int(rng.integers(columns)) if branch else 0)
            attrs["nodes_modes"].append(str(rng.choice(modes)) if branch else "LEAF")
            attrs["nodes_values"].append(float(rng.integers(0, 12)) / 4 if branch else 0.0)
            attrs["nodes_truenodeids"].append(int(node_ids[true_child]) if branch else 0)
            attrs["nodes_falsenodeids"].append(int(node_ids[false_child]) if branch else 0)
            attrs["nodes_missing_value_tracks_true"].append(int(missing and rng.random() < 0.5))
            if branch:
                continue
            weighed = ([i for i in ids if rng.random() < 0.5] or [ids[int(rng.integers(len(ids)))]]) if sparse else ids
            for output in weighed:
                attrs[f"{prefix}_treeids"].append(tree)
                attrs[f"{prefix}_nodeids"].append(node_id)
                attrs[f"{prefix}_ids"].append(output)
                weight = rng.normal() if signed else rng.random()
                attrs[f"{prefix}_weights"].append(float(weight))
    return attrs


def classifier(name: str, classes: int, forest: dict, **attrs) -> onnx.NodeProto:
    return helper.make_node("TreeEnsembleClassifier", ["x"], [f"{name}_label", f"{name}_prob"], name=name,
                            domain="ai.onnx.ml", classlabels_int64s=[10 * k + 3 for k in range(classes)],
                            **forest, **attrs)


def regressor(name: str, targets: int, forest: dict, **attrs) -> onnx.NodeProto:
    return helper.make_node("TreeEnsembleRegressor", ["x"], [name], name=name, domain="ai.onnx.ml",
                            n_targets=targets, **forest, **attrs)


# -- node modes and missing values ------------------------------------------------------------------
def test_every_node_mode(tmp_path):
    nodes = [regressor(f"r_{mode.lower()}", 2, random_forest("target", 2, modes=(mode,), seed=k))
             for k, mode in enumerate(MODES)]
    assert_matches_onnxruntime(nodes, features(), tmp_path)


def test_mixed_modes_and_missing_values_tracking_true(tmp_path):
    forests = [random_forest("target", 2, modes=MODES, missing=missing, depth=6, trees=5, seed=k)
               for k, missing in enumerate([False, True, True])]
    nodes = [regressor(f"r{k}", 2, forest) for k, forest in enumerate(forests)]
    assert_matches_onnxruntime(nodes, features(nans=True), tmp_path)


# -- regressor ------------------------------------------------------------------------------------
@pytest.mark.parametrize("aggregate", ["SUM", "AVERAGE", "MIN", "MAX"])
def test_regressor_aggregates(aggregate, tmp_path):
    sparse = random_forest("target", 3, sparse=True, trees=4, seed=1)  # a target some leaves lack
    nodes = [regressor("dense", 3, random_forest("target", 3, trees=4), aggregate_function=aggregate,
                       base_values=[0.5, -1.0, 2.0]),
             regressor("sparse", 3, sparse, aggregate_function=aggregate),
             regressor("one", 1, random_forest("target", 1, trees=4, seed=2), aggregate_function=aggregate,
                       base_values=[0.25])]
    assert_matches_onnxruntime(nodes, features(), tmp_path)


def test_regressor_post_transforms(tmp_path):
    nodes = [regressor(f"r_{post.lower()}", 3, random_forest("target", 3, sparse=True, seed=k),
                       post_transform=post, base_values=[0.1, 0.0, -0.2])
             for k, post in enumerate(["NONE", "LOGISTIC", "SOFTMAX", "SOFTMAX_ZERO"])]
    # PROBIT reads scores in (0, 1); one target ignores every other transform.
    probit = random_forest("target", 2, signed=False, trees=1, seed=7)
    nodes += [regressor("r_probit", 2, probit, post_transform="PROBIT"),
              regressor("one_probit", 1, random_forest("target", 1, signed=False, trees=1), post_transform="PROBIT"),
              regressor("one_logistic", 1, random_forest("target", 1, seed=3), post_transform="LOGISTIC")]
    assert_matches_onnxruntime(nodes, features(), tmp_path)


def test_regressor_reads_the_first_weight_of_a_leaf_for_one_target(tmp_path):
    forest = random_forest("target", 1, ids=[0, 0], seed=4)  # two weights on every leaf
    assert_matches_onnxruntime([regressor("one", 1, forest)], features(), tmp_path)


@pytest.mark.parametrize("dtype", [np.float64, np.int64, np.int32])
def test_input_types(dtype, tmp_path):
    """A double input has double thresholds and sums; integers compare with the (float) thresholds
    as floats (onnxruntime has no integer TreeEnsembleRegressor)."""
    x = (features() * 4).astype(dtype)
    forest = random_forest("class", 3, modes=MODES, seed=5)
    forest["nodes_values"] = [v * 4 + 0.5 * (k % 2) for k, v in enumerate(forest["nodes_values"])]
    nodes = [classifier("c", 3, forest, base_values=[1.0, 2.0, 0.5])]
    if dtype == np.float64:
        nodes.append(regressor("r", 2, random_forest("target", 2, modes=MODES, seed=6)))
    assert_matches_onnxruntime(nodes, x, tmp_path)


def test_as_tensor_attributes(tmp_path):
    forest = random_forest("target", 2, seed=6)
    tensors = {f"{name}_as_tensor": helper.make_tensor(name, TensorProto.DOUBLE, [len(forest[name])],
                                                       forest.pop(name))
               for name in ("nodes_values", "target_weights")}
    assert_matches_onnxruntime([regressor("r", 2, forest, **tensors)], features().astype(np.float64), tmp_path)


# -- classifier -----------------------------------------------------------------------------------
@pytest.mark.parametrize("post", ["NONE", "LOGISTIC", "SOFTMAX", "SOFTMAX_ZERO", "PROBIT"])
def test_multiclass(post, tmp_path):
    signed = post != "PROBIT"
    nodes = [classifier("dense", 4, random_forest("class", 4, signed=signed), post_transform=post),
             # Classes no reached leaf weighs have no score: they cannot win, even over negative scores.
             classifier("sparse", 4, random_forest("class", 4, sparse=True, signed=signed, seed=1), post_transform=post),
             classifier("based", 4, random_forest("class", 4, sparse=True, signed=signed, seed=2), post_transform=post,
                        base_values=[0.1, 0.2, 0.05, 0.3]),
             classifier("part", 4, random_forest("class", 4, sparse=True, signed=signed, seed=3), post_transform=post,
                        base_values=[0.2, 0.0, 0.1, 0.0])]
    assert_matches_onnxruntime(nodes, features(), tmp_path)


def test_multiclass_ties_go_to_the_first_class(tmp_path):
    forest = random_forest("class", 3, trees=2, depth=2)
    forest["class_weights"] = [float(k % 2) for k in range(len(forest["class_weights"]))]
    assert_matches_onnxruntime([classifier("tie", 3, forest)], features(), tmp_path)


@pytest.mark.parametrize("post", ["NONE", "LOGISTIC", "SOFTMAX", "SOFTMAX_ZERO"])
def test_binary_one_weight_column(post, tmp_path):
    """scikit-learn's binary trees: every weight on one class; [1 - s, s] for positive weights,
    [-s, s] (LOGISTIC: [sig(-s), sig(s)]) for signed ones, with or without one base value."""
    nodes = [classifier("positive", 2, random_forest("class", 2, ids=[0], signed=False), post_transform=post),
             classifier("signed", 2, random_forest("class", 2, ids=[0], seed=1), post_transform=post),
             classifier("based", 2, random_forest("class", 2, ids=[0], seed=2), post_transform=post, base_values=[0.3]),
             classifier("class1", 2, random_forest("class", 2, ids=[1], seed=3), post_transform=post)]
    assert_matches_onnxruntime(nodes, features(), tmp_path)


@pytest.mark.parametrize("post", ["NONE", "LOGISTIC", "SOFTMAX", "PROBIT"])
def test_binary_two_weight_columns(post, tmp_path):
    signed = post != "PROBIT"
    nodes = [classifier("both", 2, random_forest("class", 2, signed=signed), post_transform=post),
             classifier("based", 2, random_forest("class", 2, signed=signed, seed=1), post_transform=post,
                        base_values=[0.2, 0.4]),
             # Rows whose leaves lack a class-1 weight follow onnxruntime's other branch.
             classifier("sparse", 2, random_forest("class", 2, sparse=True, signed=signed, seed=2), post_transform=post,
                        base_values=[0.1, -0.3])]
    if post != "PROBIT":
        nodes.append(classifier("unbased", 2, random_forest("class", 2, sparse=True, seed=3), post_transform=post))
    assert_matches_onnxruntime(nodes, features(), tmp_path)


# -- refusals -------------------------------------------------------------------------------------
@pytest.mark.parametrize("case, message", [
    ({"classlabels_strings": ["a", "b"]}, "string class labels"),
    ({"post_transform": "PROBIT"}, "writes only the first probability"),
    ({"nodes_modes": ["BRANCH_MEMBER"]}, "not tree-node modes"),
    ({"nodes_featureids": [9]}, "reach feature 9"),
], ids=["strings", "probit-single-score", "mode", "feature"])
def test_refused_with_a_message(case, message, tmp_path):
    forest = random_forest("class", 2, ids=[0], signed=False)
    for name in ("nodes_modes", "nodes_featureids"):
        if name in case:
            forest[name] = case.pop(name) * len(forest[name])
    node = classifier("c", 2, forest, **case)
    if "classlabels_strings" in case:
        node.attribute.remove(next(a for a in node.attribute if a.name == "classlabels_int64s"))
    with pytest.raises(CodegenError, match=message):
        codegen.compile(ml_model([node], features()), "x86", tmp_path)


# -- Scaler, Normalizer, Binarizer ---------------------------------------------------------------
def test_scaler(tmp_path):
    nodes = [helper.make_node("Scaler", ["x"], ["per_feature"], domain="ai.onnx.ml",
                              offset=[0.5, -1.0, 2.0, 0.0], scale=[2.0, 0.5, -1.5, 3.0]),
             helper.make_node("Scaler", ["x"], ["all"], domain="ai.onnx.ml", offset=[0.25], scale=[4.0])]
    assert_matches_onnxruntime(nodes, features(), tmp_path)


def test_scaler_of_integers(tmp_path):
    node = helper.make_node("Scaler", ["x"], ["y"], domain="ai.onnx.ml", offset=[1.5, 0.0, 2.0, 0.5],
                            scale=[0.5, 2.0, 1.0, -1.0])
    assert_matches_onnxruntime([node], (features() * 4).astype(np.int64), tmp_path)


def test_normalizer_and_binarizer(tmp_path):
    x = features() - 1.0
    x[3] = 0.0  # a zero norm leaves the row as it is
    nodes = [helper.make_node("Normalizer", ["x"], [norm.lower()], domain="ai.onnx.ml", norm=norm)
             for norm in ("MAX", "L1", "L2")]
    nodes += [helper.make_node("Binarizer", ["x"], ["bin"], domain="ai.onnx.ml", threshold=0.5),
              helper.make_node("Binarizer", ["x"], ["bin_default"], domain="ai.onnx.ml")]
    assert_matches_onnxruntime(nodes, x, tmp_path)


# -- the corpus -----------------------------------------------------------------------------------
@pytest.mark.parametrize("model_id", ["surfaces-mlp", "surfaces-tree"])
def test_corpus_model_agrees(model_id, tmp_path):
    """skl2onnx's exports: Scaler before an MLP; a k-neighbours-surrogate tree as one
    TreeEnsembleClassifier (int64 labels). Also rows across the thresholds, not only the samples."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "corpus"))
    import corpus_lib

    entry = corpus_lib.by_id(model_id)
    try:
        model = onnx.load(str(corpus_lib.fetch(entry)))
    except corpus_lib.Unavailable as e:
        pytest.skip(str(e))
    samples = corpus_lib.samples(entry)["input"]
    wide = np.random.default_rng(0).uniform(0, 150, samples.shape).astype(np.float32)
    x = np.concatenate([samples, wide])
    lib = codegen.load(codegen.compile(model, "x86", tmp_path, shapes={"input": list(x.shape)}).library)
    outputs, reference = lib.run({"input": x}), ort.run(model, {"input": x})
    for name, expected in reference.items():
        assert outputs[name].dtype == expected.dtype, name
        np.testing.assert_allclose(outputs[name], expected, rtol=1e-4, atol=1e-4, err_msg=name)
