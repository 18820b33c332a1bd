"""factorize-svd: a Gemm or MatMul with a constant 2-D weight W as two chained products through
rank r, W ~ (U_r S_r^1/2)(S_r^1/2 V_r^T) (Xue et al. 2013; Denton et al. 2014).

Matches: Gemm with a float constant B (transA, transB, alpha, beta honoured), MatMul with one 2-D
float constant operand (right: any batch rank; or left).
Rewrites: the product into two, the second keeping the node's name, C and beta; r from `rank`,
`energy`, `ratio` or method="vbmf", or a `ratio` budget spread by sensitivity (spent once).
Refuses: a rank that saves no parameters, a shared or graph-output weight, a weight not 2-D or
not floating point, a Gemm's constant A, two constant operands, the halves of an earlier
factorization.
Guarantees: LOSSY(cosine >= 0.6) (random-weight MLP and transformer at ratio 0.5, the flat-
spectrum worst case); exact up to rounding when r keeps every non-zero singular value; idempotent.
Verified by: tests/passes/factorize/test_svd.py against onnxruntime, and TVM compilation.
Details: docs/passes/factorize-svd.md.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir.cost import macs
from graphopt.ir.errors import Refused
from graphopt.ir.graph import is_graph_output, np_dtype, producer
from graphopt.ir.verify import SHAPES_INFERRED, TOPOSORTED
from graphopt.passes.base import LOSSY, PassInfo
from graphopt.passes.factorize import lowrank
from graphopt.passes.factorize.lowrank import Match, Plan
from graphopt.passes.factorize.rank import Criterion, energy_kept, energy_rank, evbmf_rank, svd_keep_rank
from graphopt.passes.weights import check_weight
from graphopt.pattern import Rewriter

PRODUCTS = ("Gemm", "MatMul")
# The effective weight and its thin SVD (u, s, vt).
Decomposition = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class Options(lowrank.Options):
    pass_name = "factorize-svd"


def examine(node: gs.Node, graph: gs.Graph) -> Match | None:
    """Binds the constant weight and its input position; None for a product of two activations."""
    constant = [i for i in (0, 1) if len(node.inputs) > i and isinstance(node.inputs[i], gs.Constant)]
    if not constant:
        return None  # no weight to factor
    if len(constant) == 2:
        raise Refused("both operands are constant: fold them first (fold-constants)")
    index = constant[0]
    if node.op == "Gemm" and index == 0:
        raise Refused("the Gemm's constant operand is A; only a constant B is factored")
    weight = node.inputs[index]
    if len(weight.shape) != 2:
        raise Refused(f"weight '{weight.name}' is {len(weight.shape)}-D; only a 2-D weight is factored")
    check_weight(graph, weight, "factorize")
    _check_not_factored(graph, node, index)
    return Match(weight, index)


def _check_not_factored(graph: gs.Graph, node: gs.Node, index: int) -> None:
    """Refuses `node` when it is one half of a factorization: a bias-free product whose output only
    another constant-weight product reads, through an inner dimension r that saves parameters
    (r (m + n) < m n), or the product reading such a half's output. A chain that does not save
    (an exporter's MatMul -> MatMul) is two layers, each factored on its own."""
    activation = node.inputs[1 - index]
    source = producer(activation)
    if (source is not None and _bias_free_linear(source) and len(activation.outputs) == 1
            and _low_rank_pair(source, node)):
        raise Refused(f"{lowrank.ALREADY_FACTORED}: reads the bias-free product '{source.name}' directly")
    out = node.outputs[0]
    readers = list(out.outputs)
    if (_bias_free_linear(node) and len(readers) == 1 and _bias_free_linear(readers[0], bias_ok=True)
            and not is_graph_output(graph, out) and _low_rank_pair(node, readers[0])):
        raise Refused(f"{lowrank.ALREADY_FACTORED}: feeds the product '{readers[0].name}' directly")


def _features(node: gs.Node) -> tuple[int, int] | None:
    """(input features, output features) of a product with one constant 2-D operand."""
    index = next((i for i in (1, 0) if isinstance(node.inputs[i], gs.Constant)), None)
    if index is None or len(node.inputs[index].shape) != 2:
        return None
    k, n = _weight_shape(node, index)
    return (k, n) if node.op == "Gemm" or index == 1 else (n, k)


def _weight_shape(node: gs.Node, index: int) -> tuple[int, int]:
    """The shape of `effective_weight`, without reading the values."""
    rows, cols = node.inputs[index].shape
    return (cols, rows) if node.op == "Gemm" and node.attrs.get("transB", 0) else (rows, cols)


def _low_rank_pair(first: gs.Node, second: gs.Node) -> bool:
    a, b = _features(first), _features(second)
    if a is None or b is None or a[1] != b[0]:
        return False
    (m, r), n = a, b[1]
    return r * (m + n) < m * n


def _bias_free_linear(node: gs.Node, bias_ok: bool = False) -> bool:
    if node.op not in PRODUCTS or not any(isinstance(t, gs.Constant) for t in node.inputs[:2]):
        return False
    return bias_ok or node.op == "MatMul" or len(node.inputs) < 3 or node.inputs[2].is_empty()


def effective_weight(node: gs.Node, index: int) -> np.ndarray:
    """The matrix the layer multiplies by, in float64: alpha * op(B) for Gemm (K x N), else W."""
    w = node.inputs[index].values.astype(np.float64)
    if node.op == "Gemm":
        w = (w.T if node.attrs.get("transB", 0) else w) * node.attrs.get("alpha", 1.0)
    return w


def choose_rank(w: np.ndarray, s: np.ndarray, criterion: Criterion) -> int:
    m, n = w.shape
    if criterion.rank is not None:
        return min(criterion.rank, s.size)
    if criterion.energy is not None:
        return energy_rank(s, criterion.energy)
    if criterion.keep is not None:
        return min(svd_keep_rank(m, n, criterion.keep), s.size)
    return max(1, evbmf_rank(s, w.shape))


def decompose(node: gs.Node, match: Match) -> Decomposition:
    w = effective_weight(node, match.index)
    return (w, *np.linalg.svd(w, full_matrices=False))


def truncate(node: gs.Node, match: Match, decomposition: Decomposition, criterion: Criterion) -> Plan:
    """The rank-r factors; `Refused` when they hold no fewer parameters than the weight."""
    w, u, s, vt = decomposition
    rank = choose_rank(w, s, criterion)
    rows, cols = w.shape
    before, after = rows * cols, rank * (rows + cols)
    if after >= before:
        raise lowrank.no_saving(f"rank {rank} ({criterion.describe()})", "parameters", before, after)
    root = np.sqrt(s[:rank])
    left, right = u[:, :rank] * root, root[:, None] * vt[:rank]
    kept = energy_kept(s, rank)
    layer_macs = macs(node)
    return Plan(criterion, {"rank": rank}, (left, right), (before, after), (layer_macs, layer_macs * after // before),
                float(np.sqrt(max(1.0 - kept, 0.0))), {"energy": round(kept, 6)})


def factor(rw: Rewriter, node: gs.Node, match: Match, plan: Plan) -> None:
    weight, index = match.weight, match.index
    dtype = np_dtype(weight.dtype)
    left, right = (f.astype(dtype) for f in plan.factors)
    trans_b = node.op == "Gemm" and node.attrs.get("transB", 0)
    if trans_b:  # each factor keeps the layout the original weight had
        left, right = left.T.copy(), right.T.copy()
    out = node.outputs[0]
    rank = plan.ranks["rank"]
    inner = rw.variable(f"{out.name}_svd", dtype=out.dtype or dtype, shape=_inner_shape(node, index, rank))
    u_w, v_w = rw.constant(f"{weight.name}_svd_u", left), rw.constant(f"{weight.name}_svd_v", right)
    inputs, name, attrs = list(node.inputs), node.name, dict(node.attrs)
    rw.remove(node)
    if node.op == "Gemm":  # A' (alpha B') + beta C = (A' U) V + beta C
        rw.add_node("Gemm", [inputs[0], u_w], [inner], name=f"{name}_svd1",
                    attrs={"transA": attrs.get("transA", 0), "transB": int(trans_b)})
        second = rw.add_node("Gemm", [inner, v_w, *inputs[2:]], [out], name=name,
                             attrs={"transB": int(trans_b), "beta": attrs.get("beta", 1.0)})
    elif index == 0:  # W x = U (V x)
        rw.add_node("MatMul", [v_w, inputs[1]], [inner], name=f"{name}_svd1")
        second = rw.add_node("MatMul", [u_w, inner], [out], name=name)
    else:  # x W = (x U) V
        rw.add_node("MatMul", [inputs[0], u_w], [inner], name=f"{name}_svd1")
        second = rw.add_node("MatMul", [inner, v_w], [out], name=name)
    # The half that writes the layer's output keeps its name (the detached node is dropped on
    # commit), so include/exclude still find the layer on a second run, which refuses it.
    second.name = name


def _inner_shape(node: gs.Node, index: int, rank: int) -> list | None:
    """The shape of the product between the factors, where the activation's shape is known."""
    x = node.inputs[1 - index].shape
    if x is None:
        return None
    x = list(x)
    if node.op == "Gemm":  # A is M x K, or K x M with transA
        return [x[1] if node.attrs.get("transA", 0) else x[0], rank]
    if index == 1:
        return x[:-1] + [rank]
    return [rank] if len(x) == 1 else x[:-2] + [rank, x[-1]]


class FactorizeSVD(lowrank.LowRankPass):
    name = "factorize-svd"
    info = PassInfo(LOSSY("cosine", 0.6), requires=frozenset({TOPOSORTED, SHAPES_INFERRED}))
    Options = Options
    ops = PRODUCTS

    examine = staticmethod(examine)
    decompose = staticmethod(decompose)
    truncate = staticmethod(truncate)
    factor = staticmethod(factor)
