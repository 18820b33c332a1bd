"""factorize-svd: a Gemm or MatMul with a constant 2-D weight W as two chained products through
rank r: by default with --data (method="whitened") the rank-r factors that minimise the layer's
OUTPUT error on the calibration inputs, W ~ U_r (S_r V_r^T L^-1) from the SVD of W L with
L L^T the inputs' (shrunk, damped) second moment (SVD-LLM, Wang et al. 2024), the output factor
then refit by least squares and the output mean the truncation moved restored through the bias;
without data (method="weights") the truncated SVD of W itself, (U_r S_r^1/2)(S_r^1/2 V_r^T) (Xue
et al. 2013; Denton et al. 2014).

Matches: Gemm with a float constant B (transA, transB, alpha, beta honoured), MatMul with one 2-D
float constant operand (right: any batch rank; or left, which has no row view and is factored from
the weight alone, said in its decision).
Rewrites: the product into two, the second keeping the node's name, C and beta (whitened Gemm: C
becomes beta C + the bias shift, beta 1; a Gemm without C gets one); r from `rank` (or "vbmf"),
`energy`, `max_error` (of the output when whitened, of the weight otherwise), `ratio`, or a
`ratio` budget spread by sensitivity (the default with --data; spent once).
Refuses: a rank that saves no parameters, a shared or graph-output weight, a weight not 2-D or
not floating point, a Gemm's constant A, two constant operands, the halves of an earlier
factorization.
Guarantees: LOSSY(cosine >= 0.6) (random-weight MLP and transformer at ratio 0.5, the flat-
spectrum worst case); exact up to rounding when r keeps every non-zero singular value (either
method); idempotent.
Verified by: tests/passes/factorize/test_svd.py against onnxruntime (whitened: the reported output
error is the one measured on the calibration data, and lower than the weight SVD's on held-out
data; digits within a point at half the Gemm parameters), and TVM compilation.
Details: docs/passes/factorize-svd.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir.cost import macs
from graphopt.ir.errors import Refused
from graphopt.ir.graph import is_graph_output, np_dtype, producer
from graphopt.ir.verify import SHAPES_INFERRED, TOPOSORTED
from graphopt.passes.base import LOSSY, PassInfo
from graphopt.passes.factorize import lowrank, whiten
from graphopt.passes.factorize.lowrank import Calibration, Match, Plan
from graphopt.passes.factorize.rank import Criterion, energy_kept, energy_rank, error_rank, evbmf_rank, svd_keep_rank
from graphopt.passes.weights import check_weight
from graphopt.pattern import Rewriter

PRODUCTS = ("Gemm", "MatMul")


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
    lowrank.check_finite(weight)
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


@dataclass(frozen=True)
class Decomposition:
    """The layer's matrix as y = Wᵀ x (W = the effective weight, K x N) factored for truncation:
    Wᵀ = basis diag(s) rows, basis [N, k], rows [k, K]. method="weights": the SVD of Wᵀ;
    "whitened": that of Wᵀ L mapped back (rows = VᵀL⁻¹), with `h` the input statistics the
    refit and the output error use and `mean` the input mean a bias absorbs (None: no bias to)."""
    weight: np.ndarray
    basis: np.ndarray
    s: np.ndarray
    rows: np.ndarray
    calibration: Calibration
    h: np.ndarray | None = None
    mean: np.ndarray | None = None


def choose_rank(shape: tuple[int, int], s: np.ndarray, criterion: Criterion) -> int:
    m, n = shape
    if criterion.rank is not None:
        return min(criterion.rank, s.size)
    if criterion.energy is not None:
        return energy_rank(s, criterion.energy)
    if criterion.max_error is not None:
        return error_rank(s, criterion.max_error)
    if criterion.keep is not None:
        return min(svd_keep_rank(m, n, criterion.keep), s.size)
    return max(1, evbmf_rank(s, shape))


def decompose(node: gs.Node, match: Match, calibration: Calibration) -> Decomposition:
    w = effective_weight(node, match.index)
    moments = calibration.moments
    if moments is None:
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        return Decomposition(w, vt.T, s, u.T, calibration)
    mean = moments.mean if _bias_can_absorb(node) else None
    h = moments.estimate(centered=mean is not None)
    basis, s, rows = whiten.whitened_svd(w.T, whiten.damped_cholesky(h, calibration.damping))
    return Decomposition(w, basis, s, rows, calibration, h, mean)


def _bias_can_absorb(node: gs.Node) -> bool:
    """A Gemm takes a constant C (or a new one): the output mean the truncation moves goes there."""
    c = node.inputs[2] if node.op == "Gemm" and len(node.inputs) > 2 else None
    return node.op == "Gemm" and (c is None or c.is_empty() or isinstance(c, gs.Constant))


def truncate(node: gs.Node, match: Match, decomposition: Decomposition, criterion: Criterion) -> Plan:
    """The rank-r factors; `Refused` when they hold no fewer parameters than the weight."""
    d = decomposition
    w = d.weight
    rank = choose_rank(w.shape, d.s, criterion)
    rows, cols = w.shape
    before, after = rows * cols, rank * (rows + cols)
    if after >= before:
        raise lowrank.no_saving(f"rank {rank} ({criterion.describe()})", "parameters", before, after)
    layer_macs = macs(node)
    extra = {"energy": round(energy_kept(d.s, rank), 6), **d.calibration.describe()}
    if d.h is None:
        root = np.sqrt(d.s[:rank])
        left, right = d.rows[:rank].T * root, root[:, None] * d.basis[:, :rank].T
        error, shift = float(np.sqrt(max(1.0 - energy_kept(d.s, rank), 0.0))), None
    else:
        left, right, shift, extra["output_error"] = _whitened_factors(d, rank)
        error = float(np.linalg.norm(w - left @ right) / max(np.linalg.norm(w), 1e-300))
        extra["bias"] = "absorbs the output mean" if shift is not None else "none to absorb the output mean"
    return Plan(criterion, {"rank": rank}, (left, right), (before, after), (layer_macs, layer_macs * after // before),
                error, extra, shift)


def _whitened_factors(d: Decomposition, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, float]:
    """x W ~ (x left) right from the whitened truncation, the output factor refit by least squares
    on the calibration statistics; the bias shift that restores the output mean; the output error."""
    first = d.s[:rank, None] * d.rows[:rank]
    second = whiten.refit_output_factor(d.weight.T, first, d.h, d.basis[:, :rank])
    # Balance each component's scale between the factors (exact; keeps both in float32's range).
    scale = np.sqrt(np.linalg.norm(first, axis=1) / np.maximum(np.linalg.norm(second, axis=0), 1e-300))
    scale = np.where(scale > 0, scale, 1.0)
    left, right = (first / scale[:, None]).T, (second * scale).T
    delta = d.weight - left @ right
    shift = None if d.mean is None else d.mean @ delta
    return left, right, shift, round(whiten.output_error(d.weight.T, (left @ right).T, d.h), 6)


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
        bias, beta = inputs[2:], attrs.get("beta", 1.0)
        if plan.bias_shift is not None:
            bias, beta = [rw.constant(f"{weight.name}_svd_c", _shifted_bias(inputs, beta, plan.bias_shift, dtype))], 1.0
        rw.add_node("Gemm", [inputs[0], u_w], [inner], name=f"{name}_svd1",
                    attrs={"transA": attrs.get("transA", 0), "transB": int(trans_b)})
        second = rw.add_node("Gemm", [inner, v_w, *bias], [out], name=name,
                             attrs={"transB": int(trans_b), "beta": beta})
    elif index == 0:  # W x = U (V x)
        rw.add_node("MatMul", [v_w, inputs[1]], [inner], name=f"{name}_svd1")
        second = rw.add_node("MatMul", [u_w, inner], [out], name=name)
    else:  # x W = (x U) V
        rw.add_node("MatMul", [inputs[0], u_w], [inner], name=f"{name}_svd1")
        second = rw.add_node("MatMul", [inner, v_w], [out], name=name)
    # The half that writes the layer's output keeps its name (the detached node is dropped on
    # commit), so include/exclude still find the layer on a second run, which refuses it.
    second.name = name


def _shifted_bias(inputs: list, beta: float, shift: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """beta C + shift, broadcast as Gemm broadcasts C (C absent: the shift alone)."""
    c = inputs[2] if len(inputs) > 2 and not inputs[2].is_empty() else None
    return (shift if c is None else beta * c.values.astype(np.float64) + shift).astype(dtype)


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
