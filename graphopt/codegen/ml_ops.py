"""ONNX-ML operators (domain ai.onnx.ml) as Relax: TVM 0.27's ONNX frontend has none of them.

Converted, with onnxruntime's semantics (its CPU kernels are the reference; where the ONNX
specification is vague, they decide):
- Scaler: Y = (X - offset) * scale, per feature (the input's second axis, or its only one) or
  with one offset and scale for all; float output.
- Normalizer: each row divided by its MAX, L1 or L2 norm (a zero norm leaves the row as it is);
  rank 1 or 2; float output.
- Binarizer: 1 where X > threshold, else 0 (a NaN gives 0 where onnxruntime fails the run).
- TreeEnsembleRegressor: the trees (`tree_ensemble`) with SUM, AVERAGE, MIN or MAX over the trees
  and `base_values` (none or one per target) added; a target no reached leaf weighs is 0; then
  `post_transform`. With one target only PROBIT applies and only each leaf's first weight counts.
- TreeEnsembleClassifier: per class the sum of the reached leaves' weights; a class without a
  score (no reached leaf weighs it, no base value) is 0. Over two classes: the label is the
  first highest class with a score, the probabilities the post-transformed scores. Two classes
  follow onnxruntime's binary rules row by row (`_binary`). Labels come from `classlabels_int64s`.
post_transform: NONE, LOGISTIC, SOFTMAX, SOFTMAX_ZERO, PROBIT (onnxruntime's approximate inverse erf).
Refused with CodegenError: string class labels (the libraries output numbers), a single class,
and the two-class cases where onnxruntime leaves the second probability unwritten.
ZipMap is not converted: it outputs a sequence of maps. Verified by tests/codegen/test_ml_ops.py.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from graphopt.codegen import tree_ensemble as trees
from graphopt.codegen.tree_ensemble import text, values
from graphopt.ir.errors import CodegenError

_TRANSFORMS = ("NONE", "LOGISTIC", "SOFTMAX", "SOFTMAX_ZERO", "PROBIT")
_AGGREGATES = {"SUM": "sum", "AVERAGE": "sum", "MIN": "min", "MAX": "max"}
_INPUT_TYPES = ("float32", "float64", "int32", "int64")


def _relax():
    from tvm import relax

    return relax


def _const(value, dtype):
    # The dtype given as well: relax.const makes int64 arrays int32 where the values fit.
    return _relax().const(np.asarray(value, dtype), dtype)


def _shape(x) -> list[int]:
    return [int(d) for d in x.ty.shape.values]


def _as_float(bb, x, op: str):
    """`x` as float, or as double where it is double; refused for other types than onnxruntime's."""
    dtype = str(x.ty.dtype)
    if dtype not in _INPUT_TYPES:
        raise CodegenError(f"{op}: input of type {dtype} is not supported (float, double, int32 or int64)")
    return x if dtype in ("float32", "float64") else bb.emit(_relax().op.astype(x, "float32"))


def scaler(bb, inputs: Sequence, attrs: Mapping[str, Any]):
    """Scaler(X) -> Y float."""
    relax = _relax()
    x = _as_float(bb, inputs[0], "Scaler")
    scale, offset = values(attrs, "scale", np.float64), values(attrs, "offset", np.float64)
    shape = _shape(x)
    stride = shape[0] if len(shape) == 1 else shape[1] if len(shape) > 1 else 0
    if len(scale) == 0 or len(scale) != len(offset):
        raise CodegenError(f"Scaler: scale ({len(scale)} values) and offset ({len(offset)}) must be given, "
                           f"of one length")
    if len(scale) != 1 and (len(scale) != stride or len(shape) > 2):
        raise CodegenError(f"Scaler: {len(scale)} scales fit neither every feature of the input of shape "
                           f"{shape} nor all of them (1 value)")
    dtype = str(x.ty.dtype)  # [features] broadcasts along the last axis, the features of rank 1 and 2
    centred = relax.op.subtract(x, _const(offset, dtype))
    return relax.op.astype(relax.op.multiply(centred, _const(scale, dtype)), "float32")


def normalizer(bb, inputs: Sequence, attrs: Mapping[str, Any]):
    """Normalizer(X) -> Y float, rows by their MAX, L1 or L2 norm."""
    relax = _relax()
    x = bb.emit(relax.op.astype(_as_float(bb, inputs[0], "Normalizer"), "float32"))
    norm = text(attrs.get("norm", b"MAX"))
    if len(_shape(x)) > 2:
        raise CodegenError(f"Normalizer: the input has rank {len(_shape(x))}; onnxruntime takes rank 1 or 2")
    if norm not in ("MAX", "L1", "L2"):
        raise CodegenError(f"Normalizer: norm '{norm}' is not MAX, L1 or L2")
    zero = _const(0.0, "float32")
    if norm == "L2":  # sqrt(x^2 / total) with x's sign
        squares = bb.emit(relax.op.multiply(x, x))
        total = bb.emit(relax.op.sum(squares, axis=-1, keepdims=True))
        root = relax.op.sqrt(relax.op.divide(squares, total))
        scaled = relax.op.where(relax.op.less(x, zero), relax.op.negative(root), root)
    else:
        total = bb.emit(relax.op.max(x, axis=-1, keepdims=True) if norm == "MAX"
                        else relax.op.sum(relax.op.abs(x), axis=-1, keepdims=True))
        scaled = relax.op.divide(x, total)
    return relax.op.where(relax.op.equal(total, zero), x, scaled)


def binarizer(bb, inputs: Sequence, attrs: Mapping[str, Any]):
    """Binarizer(X) -> Y of X's type."""
    relax = _relax()
    x, dtype = inputs[0], str(inputs[0].ty.dtype)
    above = relax.op.greater(x, _const(float(attrs.get("threshold", 0.0)), dtype))
    return relax.op.astype(above, dtype)


def _features(bb, x, op: str):
    """The [rows, features] input in the trees' threshold dtype (double for double, else float)."""
    x = _as_float(bb, x, op)
    if len(_shape(x)) != 2:
        raise CodegenError(f"{op}: the input has rank {len(_shape(x))}; tree ensembles take [rows, features]")
    return x


def _post_transform(attrs: Mapping[str, Any], op: str) -> str:
    post = text(attrs.get("post_transform", b"NONE"))
    if post not in _TRANSFORMS:
        raise CodegenError(f"{op}: post_transform '{post}' is not one of {', '.join(_TRANSFORMS)}")
    return post


def _check_ids(forest: trees.Forest, outputs: int, what: str, op: str) -> None:
    if len(forest.weight_id) and (forest.weight_id.min() < 0 or forest.weight_id.max() >= outputs):
        raise CodegenError(f"{op}: a weight names {what} {int(forest.weight_id.max())}, but there are {outputs}")


def tree_ensemble_regressor(bb, inputs: Sequence, attrs: Mapping[str, Any]):
    """TreeEnsembleRegressor(X) -> Y float [rows, n_targets]."""
    relax, op = _relax(), "TreeEnsembleRegressor"
    x = _features(bb, inputs[0], op)
    dtype = str(x.ty.dtype)
    forest = trees.parse(attrs, "target", dtype, _shape(x)[1])
    targets, post = int(attrs.get("n_targets", 0)), _post_transform(attrs, op)
    aggregate = text(attrs.get("aggregate_function", b"SUM"))
    if targets < 1:
        raise CodegenError(f"{op}: n_targets must be at least 1, not {targets}")
    if aggregate not in _AGGREGATES:
        raise CodegenError(f"{op}: aggregate_function '{aggregate}' is not one of {', '.join(_AGGREGATES)}")
    base, reduce = values(attrs, "base_values", dtype), _AGGREGATES[aggregate]
    reached = trees.leaves(bb, x, forest)
    _check_ids(forest, targets, "target", op)
    if len(base) not in (0, targets):
        raise CodegenError(f"{op}: {len(base)} base_values for {targets} targets (0 or one per target)")
    table = forest.first_weights() if targets == 1 else forest.weight_table(targets, reduce)
    scores = trees.gathered(bb, reached, table, reduce)
    if aggregate == "AVERAGE":
        scores = relax.op.divide(scores, _const(forest.trees, dtype))
    if len(base):
        scores = relax.op.add(scores, _const(base, dtype))
    if targets > 1:  # a target no reached leaf weighs is 0, without its base value
        hit = trees.gathered(bb, reached, forest.hit_table(targets), "max")
        scores = relax.op.where(relax.op.greater(hit, _const(0, dtype)), scores, _const(0, dtype))
    scores = bb.emit(relax.op.astype(scores, "float32"))
    if targets == 1:  # onnxruntime applies no other transform to a single target
        return _probit(scores) if post == "PROBIT" else scores
    return _transform(bb, scores, post)


def tree_ensemble_classifier(bb, inputs: Sequence, attrs: Mapping[str, Any]):
    """TreeEnsembleClassifier(X) -> (Y int64 [rows], Z float [rows, classes])."""
    relax, op = _relax(), "TreeEnsembleClassifier"
    if attrs.get("classlabels_strings"):
        raise CodegenError(f"{op}: string class labels (classlabels_strings) are not supported: graphopt's "
                           f"libraries output numbers; export the classifier with int64 labels")
    labels = np.asarray(attrs.get("classlabels_int64s", ()), np.int64)
    if len(labels) < 2:
        raise CodegenError(f"{op}: {len(labels)} class labels; a classifier needs at least 2")
    x = _features(bb, inputs[0], op)
    dtype = str(x.ty.dtype)
    forest = trees.parse(attrs, "class", dtype, _shape(x)[1])
    _check_ids(forest, len(labels), "class", op)
    post, base = _post_transform(attrs, op), values(attrs, "base_values", dtype)
    reached = trees.leaves(bb, x, forest)
    scores = trees.gathered(bb, reached, forest.weight_table(len(labels), "sum"), "sum")
    hit = bb.emit(relax.op.greater(trees.gathered(bb, reached, forest.hit_table(len(labels)), "max"),
                                   _const(0, dtype)))
    if len(labels) > 2:
        return _multiclass(bb, scores, hit, labels, base, post)
    return _binary(bb, scores, hit, labels, base, post, _BinaryCase.of(attrs, forest))


def _multiclass(bb, scores, hit, labels: np.ndarray, base: np.ndarray, post: str):
    relax = _relax()
    dtype = str(scores.ty.dtype)
    if len(base) not in (0, len(labels)):
        raise CodegenError(f"TreeEnsembleClassifier: {len(base)} base_values for {len(labels)} classes "
                           f"(0 or one per class)")
    if len(base):  # every class gets its base value, and so a score
        scores = bb.emit(relax.op.add(scores, _const(base, dtype)))
        hit = _const(np.ones(_shape(hit), bool), "bool")
    # The first highest class among those with a score.
    ranked = relax.op.where(hit, scores, _const(-np.inf, dtype))
    label = relax.op.take(_const(labels, "int64"), relax.op.argmax(ranked, axis=1), axis=0, mode="clip")
    probabilities = _transform(bb, bb.emit(relax.op.astype(scores, "float32")), post)
    return relax.Tuple([bb.emit(label), probabilities])


@dataclass(frozen=True)
class _BinaryCase:
    """What onnxruntime decides once per two-class model: whether the weights name one class, and
    whether they are all >= 0; and where rows may lack a class-1 score (no leaf, some leaves, all)."""

    single_class: bool
    positive: bool
    class1_everywhere: bool
    class1_anywhere: bool

    @classmethod
    def of(cls, attrs: Mapping[str, Any], forest: trees.Forest) -> _BinaryCase:
        # onnxruntime reads these from the attributes as given, branch-node weights included.
        ids, weights = np.asarray(attrs.get("class_ids", ()), np.int64), values(attrs, "class_weights", np.float64)
        leaves = np.flatnonzero(forest.mode == trees.LEAF)
        with_class1 = set(forest.weight_node[forest.weight_id == 1].tolist())
        return cls(len(set(ids.tolist())) == 1, bool((weights >= 0).all()),
                   all(int(n) in with_class1 for n in leaves), bool(with_class1))


def _binary(bb, scores, hit, labels: np.ndarray, base: np.ndarray, post: str, case: _BinaryCase):
    """onnxruntime's two-class rules (TreeAggregatorClassifier::FinalizeScores), row by row.

    Base values: with two and a class-1 score, class 1 becomes b1 + s0 and class 0 its opposite;
    otherwise each adds to its class. The label reads class 1's score, else class 0's: where the
    weights name one class, above 0.5 (weights all >= 0) or 0 gives the second label, else the
    first; otherwise above 0 gives a literal 1, else 0. Probabilities: both scores post-transformed
    where the row has a class-1 score or there are two base values; else the one score s becomes
    [sig(-s), sig(s)] for LOGISTIC, [1 - s, s] for one class of weights >= 0, else [-s, s]."""
    relax = _relax()
    dtype = str(scores.ty.dtype)
    if len(base) > 2:
        raise CodegenError(f"TreeEnsembleClassifier: {len(base)} base_values for 2 classes (at most 2)")
    s0, s1 = (bb.emit(relax.op.take(scores, _const(k, "int64"), axis=1, mode="clip")) for k in (0, 1))
    h0, h1 = (bb.emit(relax.op.take(hit, _const(k, "int64"), axis=1, mode="clip")) for k in (0, 1))
    if len(base) == 2:  # with a class-1 score, it becomes b1 + s0 and class 0 its opposite
        moved = bb.emit(relax.op.add(s0, _const(base[1], dtype)))
        s0 = bb.emit(relax.op.where(h1, relax.op.negative(moved), relax.op.add(s0, _const(base[0], dtype))))
        s1 = bb.emit(relax.op.where(h1, moved, relax.op.add(s1, _const(base[1], dtype))))
    elif len(base) == 1:
        s0 = bb.emit(relax.op.add(s0, _const(base[0], dtype)))
    zero = _const(0, dtype)
    positive = relax.op.where(h1, s1, relax.op.where(h0, s0, zero))
    if case.single_class:
        cut = _const(0.5 if case.positive else 0.0, dtype)
        label = relax.op.where(relax.op.greater(positive, cut), _const(labels[1], "int64"), _const(labels[0], "int64"))
    else:  # onnxruntime's literal positive and negative labels, whatever classlabels_int64s say
        label = relax.op.astype(relax.op.greater(positive, zero), "int64")
    # A class without a score is written as 0, whatever was added to it.
    v0, v1 = (bb.emit(relax.op.astype(relax.op.where(h, s, zero), "float32")) for h, s in ((h0, s0), (h1, s1)))
    both = _transform(bb, bb.emit(relax.op.stack([v0, v1], axis=1)), post)
    if len(base) == 2 or case.class1_everywhere:
        return relax.Tuple([bb.emit(label), both])
    one = _single_score(bb, v0, post, case, len(base))
    probabilities = one if not case.class1_anywhere else relax.op.where(relax.op.expand_dims(h1, [1]), both, one)
    return relax.Tuple([bb.emit(label), bb.emit(probabilities)])


def _single_score(bb, s0, post: str, case: _BinaryCase, base_count: int):
    """[rows, 2] from the one score of rows without a class-1 score, as onnxruntime completes it."""
    relax = _relax()
    if post == "PROBIT" or (not case.single_class and base_count == 1):
        raise CodegenError("TreeEnsembleClassifier: for this two-class model onnxruntime writes only the first "
                           "probability of rows without a class-1 score (PROBIT, or one base value with weights "
                           "on both classes); give class-1 weights on every leaf or two base_values")
    if post == "LOGISTIC":
        pair = [relax.op.sigmoid(relax.op.negative(s0)), relax.op.sigmoid(s0)]
    elif case.single_class and case.positive:
        pair = [relax.op.subtract(_const(1.0, "float32"), s0), s0]
    else:
        pair = [relax.op.negative(s0), s0]
    return bb.emit(relax.op.stack(pair, axis=1))


def _transform(bb, scores, post: str):
    """onnxruntime's post_transform of [rows, outputs] float scores."""
    relax = _relax()
    if post == "LOGISTIC":
        return bb.emit(relax.op.sigmoid(scores))
    if post == "SOFTMAX":
        return bb.emit(relax.op.nn.softmax(scores, axis=-1))
    if post == "SOFTMAX_ZERO":
        return _softmax_zero(bb, scores)
    if post == "PROBIT":
        return bb.emit(_probit(scores))
    return scores


def _softmax_zero(bb, v):
    """Softmax over the scores that are not (nearly) zero; those stay (nearly) zero."""
    relax = _relax()
    top = bb.emit(relax.op.max(v, axis=-1, keepdims=True))
    nonzero = bb.emit(relax.op.greater(relax.op.abs(v), _const(1e-7, "float32")))
    exps = bb.emit(relax.op.where(nonzero, relax.op.exp(relax.op.subtract(v, top)),
                                  relax.op.multiply(v, relax.op.exp(relax.op.negative(top)))))
    total = relax.op.sum(relax.op.where(nonzero, exps, _const(0.0, "float32")), axis=-1, keepdims=True)
    return bb.emit(relax.op.divide(exps, total))


def _probit(v):
    """sqrt(2) * ErfInv(2v - 1) with onnxruntime's ErfInv (Winitzki's approximation, a = 0.147)."""
    relax = _relax()
    f32 = np.float32

    def c(value):
        return _const(f32(value), "float32")

    x = relax.op.subtract(relax.op.multiply(v, c(2)), c(1))
    sign = relax.op.where(relax.op.less(x, c(0)), c(-1), c(1))
    log = relax.op.log(relax.op.multiply(relax.op.subtract(c(1), x), relax.op.add(c(1), x)))
    a = relax.op.add(c(f32(2) / (f32(np.pi) * f32(0.147))), relax.op.multiply(c(0.5), log))
    b = relax.op.multiply(c(f32(1) / f32(0.147)), log)
    inner = relax.op.subtract(relax.op.sqrt(relax.op.subtract(relax.op.multiply(a, a), b)), a)
    return relax.op.multiply(c(np.sqrt(2)), relax.op.multiply(sign, relax.op.sqrt(inner)))


CONVERTERS: dict[str, Callable] = {
    "Scaler": scaler, "Normalizer": normalizer, "Binarizer": binarizer,
    "TreeEnsembleRegressor": tree_ensemble_regressor, "TreeEnsembleClassifier": tree_ensemble_classifier,
}
