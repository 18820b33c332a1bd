"""factorize-tucker: a Conv as Conv 1x1 (C_in -> r_in), Conv kxk (r_in -> r_out) and Conv 1x1
(r_out -> C_out): Tucker-2 on the weight's channel modes. Without data (method="weights") by
HOSVD of the weight (Kim et al. 2016). With --data (method="whitened", the default) fitted to the
layer's output on the calibration inputs: the first 1x1 from the SVD of the weight whitened by the
input channels' covariance (H aggregated over kernel positions), the core by least squares on the
full H of the unfolded inputs, the last 1x1 the leading output directions of that fit (the best
output projection given the first 1x1), the output mean the truncation moved restored in the bias.

Matches: Conv with group 1, a float constant weight and a kernel of more than one element (1-D,
2-D or 3-D; whitened needs the 2-D row view, others fall back to HOSVD and say so).
Rewrites: the Conv into the three; the core keeps strides, pads, dilations and auto_pad, the last
1x1 the bias (shifted when whitened) and the node's name; ranks from `rank` (or "vbmf"), `energy`,
`max_error`, `ratio`, or a `ratio` budget spread by sensitivity (the default with --data; spent once).
Refuses: ranks that save no MACs (input and output resolution counted), grouped, depthwise and
1x1 convs, a shared or graph-output weight, a weight not floating point, the core of an earlier
factorization.
Guarantees: LOSSY(cosine >= 0.9) (random-weight ResNet at ratio 0.5); exact up to rounding at full
multilinear rank (either method); idempotent.
Verified by: tests/passes/factorize/test_tucker.py against onnxruntime, and TVM compilation.
Details: docs/passes/factorize-tucker.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir.cost import count
from graphopt.ir.errors import Refused
from graphopt.ir.graph import np_dtype, producer
from graphopt.ir.verify import SHAPES_INFERRED, TOPOSORTED
from graphopt.passes.base import LOSSY, PassInfo
from graphopt.passes.factorize import lowrank, whiten
from graphopt.passes.factorize.lowrank import Calibration, Match, Plan
from graphopt.passes.factorize.rank import (
    Criterion,
    energy_kept,
    energy_rank,
    error_rank,
    evbmf_rank,
    tucker_keep_ranks,
)
from graphopt.passes.weights import check_weight
from graphopt.pattern import Rewriter


class Options(lowrank.Options):
    pass_name = "factorize-tucker"


def examine(node: gs.Node, graph: gs.Graph) -> Match | None:
    """Binds the weight; None for a Conv whose weight is computed at run time."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if not isinstance(weight, gs.Constant):
        return None
    group = node.attrs.get("group", 1)
    if group != 1:
        kind = "depthwise" if group == weight.shape[0] and weight.shape[1] == 1 else "grouped"
        raise Refused(f"{kind} convolution (group={group}): Tucker-2 needs group=1")
    if count(weight.shape[2:]) <= 1:
        raise Refused("1x1 convolution: no spatial kernel to factor around")
    check_weight(graph, weight, "factorize")
    lowrank.check_finite(weight)
    _check_not_factored(node)
    return Match(weight, 1)


def _pointwise(node: gs.Node | None, bias_free: bool) -> bool:
    if node is None or node.op != "Conv" or node.attrs.get("group", 1) != 1:
        return False
    w = node.inputs[1] if len(node.inputs) > 1 else None
    has_bias = len(node.inputs) > 2 and not node.inputs[2].is_empty()
    return isinstance(w, gs.Constant) and count(w.shape[2:]) == 1 and not (bias_free and has_bias)


def _check_not_factored(node: gs.Node) -> None:
    """Refuses the core of a factorization: a Conv between a bias-free 1x1 Conv and a 1x1 Conv."""
    x, out = node.inputs[0], node.outputs[0]
    if (_pointwise(producer(x), bias_free=True) and len(x.outputs) == 1 and len(out.outputs) == 1
            and _pointwise(out.outputs[0], bias_free=False)):
        names = f"'{producer(x).name}' and '{out.outputs[0].name}'"
        raise Refused(f"{lowrank.ALREADY_FACTORED}: the core between 1x1 convolutions {names}")


def unfold(w: np.ndarray, mode: int) -> np.ndarray:
    """The mode-`mode` unfolding: that axis as rows, all others flattened as columns."""
    return np.moveaxis(w, mode, 0).reshape(w.shape[mode], -1)


@dataclass(frozen=True)
class Decomposition:
    """The weight [C_out, C_in, *kernel] and, per mode, the basis and spectrum its ranks are
    chosen from. method="weights": the left singular vectors of each mode's unfolding (HOSVD).
    "whitened": the input basis is the first 1x1's candidate rows VᵀL_c⁻¹ from the SVD of the
    weight whitened by the input channels' covariance; the output spectrum is that of W L (the
    layer's outputs on the data); `h` (the input statistics of the unfolded rows) and `mean` (the
    input mean the bias absorbs) serve the least-squares core and the output error."""
    weight: np.ndarray
    out_basis: np.ndarray | None  # None when whitened: chosen per r_in, in truncate
    out_s: np.ndarray
    in_basis: np.ndarray
    in_s: np.ndarray
    calibration: Calibration
    h: np.ndarray | None = None
    mean: np.ndarray | None = None


def choose_ranks(w: np.ndarray, spectra: tuple[np.ndarray, np.ndarray], criterion: Criterion) -> tuple[int, int]:
    """(r_out, r_in), each capped at its mode's number of singular values. `max_error` is split
    evenly between the modes (each leaves out at most max_error**2 / 2 of its squares), as the
    errors of the two projections add in quadrature."""
    if criterion.rank is not None:
        ranks = (criterion.rank, criterion.rank)
    elif criterion.energy is not None:
        ranks = tuple(energy_rank(s, criterion.energy) for s in spectra)
    elif criterion.max_error is not None:
        ranks = tuple(error_rank(s, criterion.max_error / np.sqrt(2.0)) for s in spectra)
    elif criterion.keep is not None:
        ranks = tucker_keep_ranks(w.shape[0], w.shape[1], count(w.shape[2:]), criterion.keep)
    else:
        shapes = ((w.shape[0], w.size // w.shape[0]), (w.shape[1], w.size // w.shape[1]))
        ranks = tuple(max(1, evbmf_rank(s, shape)) for s, shape in zip(spectra, shapes))
    return min(ranks[0], spectra[0].size), min(ranks[1], spectra[1].size)


def _positions(node: gs.Node) -> tuple[int, int]:
    """Positions (batch and spatial; symbolic dimensions as 1) of the input and of the output."""
    x, y = _positions_of(node.inputs[0]), _positions_of(node.outputs[0])
    if y is None:
        return 1, 1  # unknown shapes: compare per output position as if at stride 1
    return (y * count(node.attrs.get("strides", [1])) if x is None else x), y


def _positions_of(tensor: gs.Tensor) -> int | None:
    if tensor.shape is None:
        return None
    dims = [d for i, d in enumerate(tensor.shape) if i != 1]
    return count([d if isinstance(d, (int, np.integer)) and d > 0 else 1 for d in dims])


def decompose(node: gs.Node, match: Match, calibration: Calibration) -> Decomposition:
    w = match.weight.values.astype(np.float64)
    moments = calibration.moments
    if moments is None:
        (u_out, s_out, _), (u_in, s_in, _) = (np.linalg.svd(unfold(w, mode), full_matrices=False) for mode in (0, 1))
        return Decomposition(w, u_out, s_out, u_in.T, s_in, calibration)
    mean = moments.mean if _bias_constant(node) else None
    h = moments.estimate(centered=mean is not None)
    damping = calibration.damping
    # Input mode: the 1x1 that keeps r_in channels z = A x loses least output when A comes from the
    # weight whitened by the channels' covariance (W stacked over kernel positions [C_out*k, C_in]).
    stacked = np.moveaxis(w, 1, -1).reshape(-1, w.shape[1])
    s_in, in_rows = whiten.whitened_rows(stacked, whiten.damped_cholesky(whiten.channel_covariance(h, w.shape[1]),
                                                                        damping))
    # Output mode: the spectrum of the layer's outputs on the data (W L over the unfolded rows).
    out_s = whiten.whitened_spectrum(unfold(w, 0), h, damping)
    return Decomposition(w, None, out_s, in_rows, s_in, calibration, h, mean)


def _bias_constant(node: gs.Node) -> bool:
    """The Conv's bias is a constant or absent (the last 1x1 then takes a new one)."""
    return len(node.inputs) < 3 or node.inputs[2].is_empty() or isinstance(node.inputs[2], gs.Constant)


def truncate(node: gs.Node, match: Match, decomposition: Decomposition, criterion: Criterion) -> Plan:
    """The factors at the criterion's ranks; `Refused` when they need no fewer MACs."""
    d = decomposition
    w = d.weight
    c_out, c_in, kernel = w.shape[0], w.shape[1], count(w.shape[2:])
    r_out, r_in = choose_ranks(w, (d.out_s, d.in_s), criterion)
    p_in, p_out = _positions(node)
    macs_before = p_out * c_out * c_in * kernel
    macs_after = p_in * c_in * r_in + p_out * (r_in * r_out * kernel + r_out * c_out)
    if macs_after >= macs_before:
        raise lowrank.no_saving(f"ranks out {r_out}, in {r_in} ({criterion.describe()})", "MACs",
                                 macs_before, macs_after)
    params = (c_out * c_in * kernel, c_in * r_in + r_in * r_out * kernel + r_out * c_out)
    energy = {"out": round(energy_kept(d.out_s, r_out), 6), "in": round(energy_kept(d.in_s, r_in), 6)}
    extra, shift = {"energy": energy, **d.calibration.describe()}, None
    if d.h is None:
        u_out, u_in = d.out_basis[:, :r_out], d.in_basis[:r_in].T
        core = np.einsum("oi...,or,is->rs...", w, u_out, u_in, optimize=True)
        # The HOSVD reconstruction is an orthogonal projection of w: its error is what the core misses.
        error = np.sqrt(max(1.0 - float(np.sum(core**2) / max(np.sum(w**2), 1e-300)), 0.0))
    else:
        u_in, core, u_out = _whitened_factors(d, r_out, r_in)
        approx = np.einsum("rs...,or,is->oi...", core, u_out, u_in, optimize=True)
        error = float(np.linalg.norm(w - approx) / max(np.linalg.norm(w), 1e-300))
        extra["output_error"] = round(whiten.output_error(unfold(w, 0), unfold(approx, 0), d.h), 6)
        shift = None if d.mean is None else unfold(w - approx, 0) @ d.mean
        extra["bias"] = "absorbs the output mean" if shift is not None else "none to absorb the output mean"
    return Plan(criterion, {"out": r_out, "in": r_in}, (u_in, core, u_out), params, (macs_before, macs_after), error,
                extra, shift)


def _whitened_factors(d: Decomposition, r_out: int, r_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u_in [C_in, r_in], core, u_out [C_out, r_out]) fitted to the layer's outputs: A = u_inᵀ from
    the whitened input mode; the full-width core G minimising the output error given A, by least
    squares on H; u_out the leading eigenvectors of that fit's output covariance (the best output
    projection given A); the core projected on them (again the least-squares optimum)."""
    w = d.weight
    project = d.in_basis[:r_in]
    kernel = w.shape[2:]
    cross, inner = whiten.channel_projection_cross(d.h, project)
    full = whiten.solve_psd(inner, unfold(w, 0) @ cross)  # [C_out, (r_in, kernel)]
    values, vectors = np.linalg.eigh(full @ inner @ full.T)
    u_out = vectors[:, np.argsort(values)[::-1][:r_out]]
    core = (u_out.T @ full).reshape(r_out, r_in, *kernel)
    return project.T, core, u_out


def factor(rw: Rewriter, node: gs.Node, match: Match, plan: Plan) -> None:
    weight, (x, _, *bias), out = match.weight, node.inputs, node.outputs[0]
    dtype = np_dtype(weight.dtype)
    u_in, core, u_out = (f.astype(dtype) for f in plan.factors)
    spatial = core.ndim - 2
    pointwise = {"kernel_shape": [1] * spatial}
    squeezed = rw.variable(f"{out.name}_tucker_in", dtype=out.dtype or dtype, shape=_with_channels(x, plan.ranks["in"]))
    mixed = rw.variable(f"{out.name}_tucker_core", dtype=out.dtype or dtype,
                        shape=_with_channels(out, plan.ranks["out"]))
    first = rw.constant(f"{weight.name}_tucker_in", u_in.T.reshape(u_in.shape[::-1] + (1,) * spatial))
    last = rw.constant(f"{weight.name}_tucker_out", u_out.reshape(u_out.shape + (1,) * spatial))
    name, attrs = node.name, dict(node.attrs)  # group is 1, so the core takes every attribute
    rw.remove(node)
    rw.add_node("Conv", [x, first], [squeezed], pointwise, f"{name}_tucker_in")
    rw.add_node("Conv", [squeezed, rw.constant(f"{weight.name}_tucker_core", core)], [mixed], attrs,
                f"{name}_tucker_core")
    # The 1x1 that writes the layer's output keeps its name (the detached node is dropped on
    # commit), so include/exclude still find the layer on a second run, which refuses it.
    if plan.bias_shift is not None:  # the output mean the truncation moved, restored
        values = plan.bias_shift if not bias or bias[0].is_empty() else bias[0].values + plan.bias_shift
        bias = [rw.constant(f"{weight.name}_tucker_bias", values.astype(dtype))]
    rw.add_node("Conv", [mixed, last, *bias], [out], pointwise, name).name = name


def _with_channels(tensor: gs.Tensor, channels: int) -> list | None:
    return None if tensor.shape is None else [tensor.shape[0], channels, *tensor.shape[2:]]


class FactorizeTucker(lowrank.LowRankPass):
    name = "factorize-tucker"
    info = PassInfo(LOSSY("cosine", 0.9), requires=frozenset({TOPOSORTED, SHAPES_INFERRED}))
    Options = Options
    ops = ("Conv",)

    examine = staticmethod(examine)
    decompose = staticmethod(decompose)
    truncate = staticmethod(truncate)
    factor = staticmethod(factor)
