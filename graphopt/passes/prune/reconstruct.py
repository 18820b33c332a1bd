"""Channels chosen by how well their consumers' outputs can be rebuilt without them, and the
consumers refit by least squares: the math behind prune-channels' data-aware methods (ThiNet, Luo
et al. 2017; LASSO channel selection, He et al. 2017).

A consumer is a Conv, Gemm or MatMul reading a group's channels. On a row x of its input
(`activations.layer_rows`: the unfolded patch of a Conv) it computes y = x Wᵀ + b, a sum over its
input channels c of contributions z_c = x_c W_cᵀ (x_c, W_c: the columns channel c owns). Removing
the channels R leaves the error Σ_{c∈R} z_c, whose mean squared norm is 1_Rᵀ G 1_R with

    G[c, d] = E⟨z_c, z_d⟩ = Σ_{i ∈ c, j ∈ d} H_ij (WᵀW)_ij,    H = E[xᵀx],

summed over the group's consumers (a residual or Concat group is chosen jointly). G comes from the
streamed second moment H, so selection sees every calibration row, never a sample, and costs
C × C memory per group. `thinet` removes greedily the channel that adds least to 1_Rᵀ G 1_R;
`lasso` ranks channels along the path of min (1 - β)ᵀ G (1 - β) + λ|β|₁ (each channel's
contribution scaled by β_c), keeping those that stay non-zero at the largest λ.

The refit then solves, per consumer and over all calibration rows, the ridge least squares of the
consumer's original output on the columns that stay, and on a constant 1 for its bias when it has
one: with A = H_SS + λI and m = E[x_S], [[A, m], [mᵀ, 1]] [X; β] = [E[x_S yᵀ]; E[yᵀ]], solved by
eliminating β. That refit is what recovers the accuracy the removal costs. The mean of x comes from
the rows `activations.statistics` samples (H from all rows); where the two disagree enough to make
the system indefinite, the mean is shrunk until it is not.

Whatever lies between the producer and the consumer (a Relu, a BatchNormalization folded or not, a
pool, a Flatten) is already in the consumer's INPUT, which is what H measures: nothing between
them has to be linear. The statistics are those of the model the pass is given, all layers in one
pass over the data (one shot); prune-channels(sequential=True) instead measures each group's
consumers on the model pruned so far, and then each refit targets that model's output.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numba
import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir.graph import attr
from graphopt.passes import activations
from graphopt.passes.prune.dependency import INPUT, DependencyGraph
from graphopt.pattern import Rewriter

LASSO_STEPS = 48  # λ values on the path, geometric from λ_max down to λ_max * 1e-4
MAX_MEAN_SHARE = 0.99  # of the bias refit's system: mᵀA⁻¹m is kept below this (see refit)
MEAN_ROWS = 4096  # rows sampled per consumer for the mean of its input (the bias refit)
Progress = Callable[[int, int], None]


@dataclass
class Consumer:
    """A layer reading pruned channels: its weight as [outputs, K], which of its K columns each
    channel of each group owns, and its input statistics."""
    name: str
    columns: dict[str, np.ndarray]  # group name -> [channels, columns per channel]
    weight: np.ndarray | None = None  # [outputs, K] float64, Gemm's alpha applied
    bias: np.ndarray | None = None  # [outputs] float64, Gemm's beta applied; None: the bias is not refit
    hessian: np.ndarray | None = None  # [K, K] E[xᵀx]
    mean: np.ndarray | None = None  # [K] E[x], from the sampled rows


@dataclass
class Reconstruction:
    """What the data-aware methods know of a graph's prunable groups, by group name."""
    consumers: dict[str, Consumer]  # by node name
    grams: dict[str, np.ndarray]  # group name -> G [channels, channels]
    unsupported: dict[str, str]  # group name -> why its channels are chosen by the weights instead

    def choose(self, group: str, keep: int, divisions: int, method: str) -> np.ndarray | None:
        """Sorted indices of the `keep` channels kept, or None when the group is unsupported."""
        g = self.grams.get(group)
        if g is None:
            return None
        return thinet(g, keep, divisions) if method == "thinet" else select(lasso_scores(g), keep, divisions)

    def record(self, group: str, method: str) -> dict:
        """A group's decision entry: how its channels were chosen, and why not as asked."""
        if group in self.grams:
            return {"method": method}
        return {"method": "l1", "why": self.unsupported[group]}

    def refit(self, rw: Rewriter, graph: gs.Graph, kept: dict[str, np.ndarray], ridge: float) -> dict[str, dict]:
        """Refit every consumer of the groups in `kept` (group name -> channels kept) on the
        columns that stay; returns per consumer the relative output error [removed, refit]."""
        nodes = {n.name: n for n in graph.nodes}
        errors = {}
        for consumer in self.consumers.values():
            removed = [np.delete(cols, kept[name], axis=0).ravel() for name, cols in consumer.columns.items()
                       if name in kept]
            if not removed:
                continue
            removed = np.concatenate(removed)
            weight, bias = refit(consumer, removed, ridge)
            node = nodes[consumer.name]
            write(rw, node, weight, bias)
            cut = consumer.weight.copy()
            cut[:, removed] = 0
            energy = max(output_energy(consumer), 1e-300)
            errors[consumer.name] = {"error": [output_error(consumer, cut, consumer.bias) / energy,
                                               output_error(consumer, weight, bias) / energy]}
        return errors


def prepare(graph: gs.Graph, dg: DependencyGraph, groups: dict[int, str], feeds: dict[str, np.ndarray],
            seed: int = 0, progress: Progress | None = None) -> Reconstruction:
    """Measure the consumers of `groups` (root id -> group name) on `feeds`, in one pass over them."""
    found, unsupported = consumers(dg, groups)
    nodes = {n.name: n for n in graph.nodes}
    stats = activations.statistics(graph, [nodes[name] for name in found], feeds, keep_rows=MEAN_ROWS,
                                   seed=seed, progress=progress) if found else {}
    for name, consumer in found.items():
        measure(consumer, nodes[name], stats[name])
    grams = {}
    for name in groups.values():
        members = [c for c in found.values() if name in c.columns]
        # A group is chosen from all its consumers or by its weights; those it has are refit anyway.
        if members and name not in unsupported:
            grams[name] = gram(name, members)
        elif name not in unsupported:
            unsupported[name] = "no layer reads its channels"
    return Reconstruction(found, grams, unsupported)


def consumers(dg: DependencyGraph, groups: dict[int, str]) -> tuple[dict[str, Consumer], dict[str, str]]:
    """The consumers of `groups` (root id -> name) with the columns each channel owns, and per group
    whose consumers the row view does not cover (a ConvTranspose, say), why."""
    found: dict[str, Consumer] = {}
    unsupported: dict[str, str] = {}
    for s in (s for s in dg.slices if s.role == INPUT):
        # A Conv's unfolded row holds, per input channel, its kernel window (activations._unfold).
        per_position = math.prod(s.node.inputs[1].shape[2:]) if s.node.op == "Conv" else 1
        why = activations.supported(s.node)
        offset = 0
        for seg in s.segments:
            name = groups.get(dg.root(seg.group))
            if name and why:
                unsupported[name] = f"its consumer {s.node.op} '{s.node.name}' cannot be reconstructed: {why}"
            elif name:
                positions = offset + np.arange(seg.channels)[:, None] * seg.expand + np.arange(seg.expand)
                cols = (positions[..., None] * per_position + np.arange(per_position)).reshape(seg.channels, -1)
                consumer = found.setdefault(s.node.name, Consumer(s.node.name, {}))
                have = consumer.columns.get(name)
                consumer.columns[name] = cols if have is None else np.concatenate([have, cols], 1)
            offset += seg.channels * seg.expand
    return found, unsupported


def measure(consumer: Consumer, node: gs.Node, stats: activations.LayerStats) -> None:
    """Fill in the consumer's weight, bias and input statistics."""
    alpha = float(attr(node, "alpha", 1.0)) if node.op == "Gemm" else 1.0
    beta = float(attr(node, "beta", 1.0)) if node.op == "Gemm" else 1.0
    consumer.weight = activations.weight_matrix(node)[0].astype(np.float64) * alpha
    bias = node.inputs[2] if len(node.inputs) > 2 and node.op != "MatMul" else None
    if isinstance(bias, gs.Constant) and bias.values.size == consumer.weight.shape[0]:
        consumer.bias = np.asarray(bias.values, np.float64).ravel() * beta
    consumer.hessian = stats.hessian[0]
    rows = stats.rows[0] if stats.rows is not None else np.zeros((0, consumer.hessian.shape[0]))
    consumer.mean = rows.astype(np.float64).mean(0) if len(rows) else np.zeros(consumer.hessian.shape[0])


def write(rw: Rewriter, node: gs.Node, weight: np.ndarray, bias: np.ndarray | None) -> None:
    """Store a refit weight [outputs, K] and bias in the node's own layouts (Gemm's alpha, beta undone)."""
    alpha = float(attr(node, "alpha", 1.0)) if node.op == "Gemm" else 1.0
    beta = float(attr(node, "beta", 1.0)) if node.op == "Gemm" else 1.0
    rw.set_constant_input(node, 1, activations.weight_values(node, weight[None] / alpha))
    if bias is not None:
        old = node.inputs[2].values
        rw.set_constant_input(node, 2, (bias / beta).reshape(old.shape).astype(old.dtype))


def gram(group: str, members: list[Consumer]) -> np.ndarray:
    """G[c, d] = E⟨z_c, z_d⟩ summed over the consumers: the mean squared output error of removing
    a set R of the group's channels is 1_Rᵀ G 1_R."""
    total = None
    for consumer in members:
        cols = consumer.columns[group]
        channels, width = cols.shape
        flat = cols.ravel()
        w = consumer.weight[:, flat]
        product = consumer.hessian[np.ix_(flat, flat)] * (w.T @ w)
        blocks = product.reshape(channels, width, channels, width).sum(axis=(1, 3))
        total = blocks if total is None else total + blocks
    return total


def select(scores: np.ndarray, keep: int, divisions: int = 1) -> np.ndarray:
    """Sorted indices of the `keep` highest scores, the same number from each of `divisions` blocks."""
    blocks = scores.reshape(divisions, -1)
    top = np.argsort(-blocks, axis=1, kind="stable")[:, :keep // divisions]
    return np.sort(top + blocks.shape[1] * np.arange(divisions)[:, None], axis=1).ravel()


def thinet(g: np.ndarray, keep: int, divisions: int = 1) -> np.ndarray:
    """Sorted indices of the `keep` channels kept: greedily remove the channel that adds least to the
    error 1_Rᵀ G 1_R, each of `divisions` blocks losing as many."""
    channels = g.shape[0]
    per_block = (channels - keep) // divisions
    block = np.arange(channels) // (channels // divisions)
    lost = np.zeros(divisions, int)
    removed = np.zeros(channels, bool)
    cross = np.zeros(channels)  # Σ_{d ∈ R} G[c, d]
    for _ in range(channels - keep):
        added = np.diag(g) + 2 * cross
        added[removed | (lost[block] >= per_block)] = np.inf
        c = int(np.argmin(added))
        removed[c] = True
        lost[block[c]] += 1
        cross += g[:, c]
    return np.flatnonzero(~removed)


def lasso_scores(g: np.ndarray) -> np.ndarray:
    """Each channel's importance along the LASSO path of min (1 - β)ᵀ G (1 - β) + λ|β|₁: the
    largest λ at which β_c is non-zero, ties broken by |β_c| √G_cc at the smallest λ."""
    g = g / max(float(np.trace(g)) / len(g), 1e-300)  # scale-free: λ is relative
    b = g.sum(1)
    top = 2 * float(np.abs(b).max())
    lambdas = top * np.geomspace(1.0, 1e-4, LASSO_STEPS)
    entry, beta = _lasso_path(g, b, lambdas)
    tie = np.abs(beta) * np.sqrt(np.maximum(np.diag(g), 0))
    return entry + tie / (tie.max() + 1e-300) * 1e-6 * top


@numba.njit(cache=True, nogil=True)
def _lasso_path(g: np.ndarray, b: np.ndarray, lambdas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coordinate descent along decreasing λ, warm-started; entry[c] = the first λ with β_c ≠ 0."""
    n = g.shape[0]
    beta = np.zeros(n)
    entry = np.zeros(n)
    grad = b.copy()  # b - G β, kept up to date
    for lam in lambdas:
        for _ in range(200):
            change = 0.0
            for c in range(n):
                if g[c, c] <= 0:
                    continue
                rho = grad[c] + g[c, c] * beta[c]
                new = (max(rho - lam / 2, 0.0) - max(-rho - lam / 2, 0.0)) / g[c, c]
                delta = new - beta[c]
                if delta != 0.0:
                    for d in range(n):
                        grad[d] -= g[d, c] * delta
                    beta[c] = new
                    change = max(change, abs(delta) * np.sqrt(g[c, c]))
            if change < 1e-9:
                break
        for c in range(n):
            if beta[c] != 0.0 and entry[c] == 0.0:
                entry[c] = lam
    return entry, beta


def refit(consumer: Consumer, removed: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray | None]:
    """The consumer's weight [outputs, K] (removed columns zero) and bias that best reproduce its
    original output from the columns that stay, by ridge least squares over the calibration rows.

    With a bias the rows are [x, 1]: the normal equations [[A, m], [mᵀ, 1]] [X; β] = [R; r]
    (A = H_SS + λI, m = E[x_S]) are solved by eliminating β, from one solve with A."""
    stay = np.setdiff1d(np.arange(consumer.weight.shape[1]), removed)
    h, w, b = consumer.hessian, consumer.weight, consumer.bias
    a = h[np.ix_(stay, stay)]
    a = a + ridge * max(float(np.mean(np.diag(a))), 1e-12) * np.eye(len(stay))
    rhs = h[stay] @ w.T  # E[x_S yᵀ] without the bias's part
    weight = np.zeros_like(w)
    if b is None:
        weight[:, stay] = _spd_solve(a, rhs).T
        return weight, None
    mu = consumer.mean
    solved = _spd_solve(a, np.column_stack([rhs, mu[stay]]))
    p = solved[:, -1]
    # The mean is estimated from sampled rows, H from all: where an input barely varies the pair
    # can be inconsistent (mᵀA⁻¹m ≥ 1, [[A, m], [mᵀ, 1]] indefinite); shrinking the mean restores it.
    q = float(mu[stay] @ p)
    shrink = math.sqrt(MAX_MEAN_SHARE / q) if q > MAX_MEAN_SHARE else 1.0
    mu, p = mu * shrink, p * shrink
    x = solved[:, :-1] + np.outer(p, b)  # A⁻¹ (R + m bᵀ): the bias's part of E[x_S yᵀ] added
    beta = (w @ mu + b - mu[stay] @ x) / (1.0 - float(mu[stay] @ p))
    weight[:, stay] = (x - np.outer(p, beta)).T
    return weight, beta


def _spd_solve(a: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """a⁻¹ rhs for a damped symmetric positive semidefinite a; damped further while singular."""
    scale = max(float(np.mean(np.abs(np.diag(a)))), 1e-12)
    for extra in (0.0, 1e-8, 1e-6, 1e-4, 1e-2):
        try:
            solved = np.linalg.solve(a + extra * scale * np.eye(len(a)), rhs)
        except np.linalg.LinAlgError:
            continue
        if np.isfinite(solved).all():
            return solved
    raise np.linalg.LinAlgError("the consumer's input second moment is singular even when damped: "
                                "give more calibration data or a larger ridge")


def output_energy(consumer: Consumer) -> float:
    """E||y||² of the consumer's original output (bias included)."""
    energy = float(np.sum((consumer.weight @ consumer.hessian) * consumer.weight))
    if consumer.bias is not None:
        energy += 2 * float(consumer.bias @ (consumer.weight @ consumer.mean)) + float(consumer.bias @ consumer.bias)
    return energy


def output_error(consumer: Consumer, weight: np.ndarray, bias: np.ndarray | None) -> float:
    """Mean squared difference of the consumer's output with (weight, bias) from the original, over
    the calibration rows (from H and the mean, so over all of them)."""
    delta = consumer.weight - weight
    error = float(np.sum((delta @ consumer.hessian) * delta))
    if consumer.bias is not None and bias is not None:
        db = consumer.bias - bias
        error += 2 * float(db @ (delta @ consumer.mean)) + float(db @ db)
    return error
