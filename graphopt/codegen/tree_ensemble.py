"""The forest of an ONNX-ML tree ensemble (TreeEnsembleClassifier, TreeEnsembleRegressor) as Relax:
which leaf every tree reaches for every row, and each output's weights gathered from those leaves.

Read as onnxruntime reads the attributes: a node is (tree id, node id); a tree's root is the first
node of each run of equal `nodes_treeids`, and the number of such runs is the number of trees;
`nodes_truenodeids`/`nodes_falsenodeids` name nodes of the same tree; a node goes to its true
child when `x[feature] MODE threshold` holds (BRANCH_LEQ <=, LT <, GTE >=, GT >, EQ ==, NEQ !=, so
a NaN feature goes false, except for NEQ) or, with `nodes_missing_value_tracks_true`, when the
feature is NaN; weights (`<prefix>_ids`, `_nodeids`, `_treeids`, `_weights`) on a branch node are
ignored. `*_as_tensor` attributes (ai.onnx.ml 3) replace their float lists. Thresholds and sums
are double for a double input, float otherwise (integer inputs are compared as float), as there.

Traversal is vectorised over [rows, trees]: every tree starts at its root, and each level is one
TE kernel that reads the node's feature, threshold (and mode, and missing flag, only where the
forest has several modes or such flags) from flat node arrays and steps to a child; a leaf is its
own child on both sides, so a path that ends early stays on its leaf. The node arrays are kernel
arguments, so every level calls the same PrimFunc (the BlockBuilder keeps one copy): the build
compiles it once whatever the depth (that of the deepest path). Each output's score is then a
gather of per-node weight tables at the reached leaves, reduced over the trees.
Verified against onnxruntime by tests/codegen/test_ml_ops.py.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from onnx import numpy_helper

from graphopt.ir.errors import CodegenError

MODES = ("BRANCH_LEQ", "BRANCH_LT", "BRANCH_GTE", "BRANCH_GT", "BRANCH_EQ", "BRANCH_NEQ")
LEAF = len(MODES)


@dataclass(frozen=True)
class Forest:
    """Flat node arrays (one entry per node, in the attributes' order) and the leaf weights."""

    feature: np.ndarray       # int32
    threshold: np.ndarray     # float32, or float64 for a double input
    mode: np.ndarray          # int32 index into MODES, LEAF for a leaf
    true_next: np.ndarray     # int32 node index; a leaf's own index
    false_next: np.ndarray    # int32 node index; a leaf's own index
    missing_true: np.ndarray  # bool
    roots: np.ndarray         # int32 node index of each tree's root
    depth: int                # branch nodes on the longest path from a root
    weight_node: np.ndarray   # int64 leaf index of each weight (weights on branch nodes dropped)
    weight_id: np.ndarray     # int64 class or target of each weight
    weight: np.ndarray        # the threshold dtype

    @property
    def trees(self) -> int:
        return len(self.roots)

    def weight_table(self, outputs: int, combine: str) -> np.ndarray:
        """[nodes, outputs]: the weights of each leaf per output, combined by `combine` ("sum",
        "min" or "max"); an output no weight of the node names is 0 for "sum", else +-inf."""
        fill = {"sum": 0.0, "min": np.inf, "max": -np.inf}[combine]
        table = np.full((len(self.feature), outputs), fill, self.weight.dtype)
        ufunc = {"sum": np.add, "min": np.minimum, "max": np.maximum}[combine]
        ufunc.at(table, (self.weight_node, self.weight_id), self.weight)
        return table

    def hit_table(self, outputs: int) -> np.ndarray:
        """[nodes, outputs] float: 1 where a weight of the node names the output (onnxruntime's
        `has_score`), else 0."""
        table = np.zeros((len(self.feature), outputs), self.weight.dtype)
        table[self.weight_node, self.weight_id] = 1
        return table

    def first_weights(self) -> np.ndarray:
        """[nodes, 1]: each leaf's first weight, the only one onnxruntime reads for one target."""
        table = np.zeros((len(self.feature), 1), self.weight.dtype)
        first = np.unique(self.weight_node, return_index=True)[1]
        table[self.weight_node[first], 0] = self.weight[first]
        return table


def values(attrs: Mapping[str, Any], name: str, dtype) -> np.ndarray:
    """Float list attribute `name`, or `name_as_tensor` where given, as a flat `dtype` array."""
    tensor = attrs.get(f"{name}_as_tensor")
    if tensor is not None:
        return numpy_helper.to_array(tensor).astype(dtype).ravel()
    return np.asarray(attrs.get(name, ()), np.float32).astype(dtype)


def text(value) -> str:
    """A string attribute (the frontend gives bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def parse(attrs: Mapping[str, Any], prefix: str, dtype, features: int) -> Forest:
    """The forest of a tree-ensemble node whose weights are `<prefix>_ids/_nodeids/_treeids/_weights`,
    for an input of `features` columns; CodegenError where onnxruntime would refuse it."""
    def ints(name: str) -> np.ndarray:
        return np.asarray(attrs.get(name, ()), np.int64)

    tree_ids, node_ids = ints("nodes_treeids"), ints("nodes_nodeids")
    feature, modes = ints("nodes_featureids"), [text(m) for m in attrs.get("nodes_modes", ())]
    threshold = values(attrs, "nodes_values", dtype)
    count = len(tree_ids)
    lengths = {"nodes_nodeids": len(node_ids), "nodes_featureids": len(feature), "nodes_modes": len(modes),
               "nodes_truenodeids": len(ints("nodes_truenodeids")), "nodes_values": len(threshold),
               "nodes_falsenodeids": len(ints("nodes_falsenodeids"))}
    if count == 0 or any(n != count for n in lengths.values()):
        raise CodegenError(f"the node attributes must all have one entry per node: nodes_treeids has {count}, "
                           + ", ".join(f"{k} {n}" for k, n in lengths.items()))
    unknown = sorted(set(modes) - {*MODES, "LEAF"})
    if unknown:
        raise CodegenError(f"nodes_modes {unknown} are not tree-node modes ({', '.join(MODES)}, LEAF)")
    mode = np.array([MODES.index(m) if m != "LEAF" else LEAF for m in modes], np.int32)
    branch = mode != LEAF
    if branch.any() and (feature[branch].min() < 0 or feature[branch].max() >= features):
        raise CodegenError(f"nodes_featureids reach feature {int(feature[branch].max())}, "
                           f"but the input has {features} features")
    index = _node_index(tree_ids, node_ids)
    true_next = _children(ints("nodes_truenodeids"), tree_ids, branch, index, "nodes_truenodeids")
    false_next = _children(ints("nodes_falsenodeids"), tree_ids, branch, index, "nodes_falsenodeids")
    missing = ints("nodes_missing_value_tracks_true")
    missing_true = np.zeros(count, bool)
    missing_true[:min(len(missing), count)] = missing[:count] == 1
    roots = np.flatnonzero(np.r_[True, tree_ids[1:] != tree_ids[:-1]]).astype(np.int32)
    weight_node, weight_id, weight = _weights(attrs, prefix, dtype, index, branch)
    return Forest(feature.astype(np.int32), threshold, mode, true_next, false_next, missing_true & branch, roots,
                  _depth(roots, true_next, false_next, branch), weight_node, weight_id, weight)


def _node_index(tree_ids: np.ndarray, node_ids: np.ndarray) -> dict[tuple[int, int], int]:
    index: dict[tuple[int, int], int] = {}
    for i, key in enumerate(zip(tree_ids.tolist(), node_ids.tolist())):
        if key in index:
            raise CodegenError(f"node {key[1]} of tree {key[0]} is given twice")
        index[key] = i
    return index


def _children(ids: np.ndarray, tree_ids: np.ndarray, branch: np.ndarray, index: Mapping, name: str) -> np.ndarray:
    """Each branch node's child (named by node id in its own tree) as a node index; a leaf's own index."""
    out = np.arange(len(ids), dtype=np.int32)
    for i in np.flatnonzero(branch):
        child = index.get((int(tree_ids[i]), int(ids[i])))
        if child is None or child == i:
            raise CodegenError(f"{name}: node {i} of tree {int(tree_ids[i])} points at node {int(ids[i])}, "
                               f"{'itself' if child == i else 'which that tree does not have'}")
        out[i] = child
    return out


def _weights(attrs: Mapping[str, Any], prefix: str, dtype, index: Mapping, branch: np.ndarray):
    ids = np.asarray(attrs.get(f"{prefix}_ids", ()), np.int64)
    node_ids = np.asarray(attrs.get(f"{prefix}_nodeids", ()), np.int64)
    tree_ids = np.asarray(attrs.get(f"{prefix}_treeids", ()), np.int64)
    weight = values(attrs, f"{prefix}_weights", dtype)
    if not len(ids) == len(node_ids) == len(tree_ids) == len(weight):
        raise CodegenError(f"{prefix}_ids, {prefix}_nodeids, {prefix}_treeids and {prefix}_weights must have "
                           f"one entry per weight ({len(ids)}, {len(node_ids)}, {len(tree_ids)}, {len(weight)})")
    nodes = []
    for tree, node in zip(tree_ids.tolist(), node_ids.tolist()):
        if (tree, node) not in index:
            raise CodegenError(f"a weight names node {node} of tree {tree}, which the ensemble does not have")
        nodes.append(index[(tree, node)])
    nodes = np.asarray(nodes, np.int64)
    on_leaf = ~branch[nodes] if len(nodes) else np.zeros(0, bool)
    # onnxruntime orders the weights by (tree, node), keeping each leaf's weights in their order.
    order = np.argsort(nodes[on_leaf], kind="stable")
    return nodes[on_leaf][order], ids[on_leaf][order], weight[on_leaf][order]


def _depth(roots: np.ndarray, true_next: np.ndarray, false_next: np.ndarray, branch: np.ndarray) -> int:
    """Branch nodes on the longest path from a root, level by level; a cycle is refused."""
    frontier, depth = set(roots.tolist()), 0
    while True:
        frontier = {int(c) for n in frontier if branch[n] for c in (true_next[n], false_next[n])}
        if not frontier:
            return depth
        depth += 1
        if depth > len(branch):
            raise CodegenError("the trees have a cycle: a node is its own descendant")


def leaves(bb, x, forest: Forest):
    """[rows, trees] int32: the leaf each tree reaches for each row of `x` ([rows, features], of the
    forest's threshold dtype)."""
    from tvm import relax, te, tirx

    rows = int(x.ty.shape.values[0])
    used = [int(m) for m in np.unique(forest.mode[forest.mode != LEAF])]
    arrays = {"feature": forest.feature, "threshold": forest.threshold, "true": forest.true_next,
              "false": forest.false_next}
    if len(used) > 1:
        arrays["mode"] = forest.mode
    if forest.missing_true.any():
        arrays["missing"] = forest.missing_true.astype(np.int32)
    names = list(arrays)

    def level(data, current, *tensors):
        a = dict(zip(names, tensors))

        def child(row, tree):
            node = current[row, tree]
            value = data[row, a["feature"][node]]
            tests = [(m, _compare(m, value, a["threshold"][node])) for m in used]
            taken = tests[0][1] if len(tests) == 1 else tirx.any(
                *[tirx.And(a["mode"][node] == m, test) for m, test in tests])
            if "missing" in a:
                taken = tirx.Or(taken, tirx.And(a["missing"][node] != 0, tirx.isnan(value)))
            return tirx.Select(taken, a["true"][node], a["false"][node])

        return te.compute((rows, forest.trees), child, name="tree_level")

    reached = bb.emit(relax.op.broadcast_to(_const(forest.roots[None, :]), (rows, forest.trees)))
    constants = [_const(arrays[k]) for k in names]
    for _ in range(forest.depth):
        reached = bb.emit_te(level, x, reached, *constants, primfunc_name_hint="tree_level")
    return reached


def _compare(mode: int, value, threshold):
    from tvm import tirx

    name = MODES[mode]
    if name == "BRANCH_NEQ":  # true for NaN, as C++'s != (TVM's != is an ordered compare: false)
        return tirx.Or(value != threshold, tirx.isnan(value))
    return {"BRANCH_LEQ": value <= threshold, "BRANCH_LT": value < threshold, "BRANCH_GTE": value >= threshold,
            "BRANCH_GT": value > threshold, "BRANCH_EQ": value == threshold}[name]


def gathered(bb, reached, table: np.ndarray, reduce: str):
    """[rows, outputs]: `table` ([nodes, outputs]) read at the `reached` leaves ([rows, trees]) and
    reduced over the trees by `reduce` ("sum", "min" or "max")."""
    from tvm import relax

    # "clip", not the default "fast", which has TOPI warn about out-of-bounds indices at every build
    # (the leaves are in bounds).
    per_tree = bb.emit(relax.op.take(_const(table), reached, axis=0, mode="clip"))
    return bb.emit({"sum": relax.op.sum, "min": relax.op.min, "max": relax.op.max}[reduce](per_tree, axis=1))


def _const(array: np.ndarray):
    """A Relax constant of `array`'s own dtype (relax.const makes double float and int64 int32)."""
    from tvm import relax

    return relax.const(array, str(array.dtype))
