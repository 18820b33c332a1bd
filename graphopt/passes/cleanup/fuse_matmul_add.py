"""fuse-matmul-add: MatMul(A, B) + C with constant B and C becomes Gemm(A, B, C).

Matches: Add whose one input is a MatMul read by nothing else, with a constant 2-D B, and whose
other input is a constant C that broadcasts one way to the (M, N) product.
Rewrites: the pair becomes one Gemm.
Refuses: A not of rank 2 (Gemm takes matrices only); a C that does not broadcast one way.
Guarantees: EXACT (Gemm computes the same sum of products plus C); idempotent.
Verified by: tests/passes/cleanup/test_fuse_matmul_add.py against onnxruntime.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from graphopt.ir.verify import SHAPES_INFERRED
from graphopt.passes.base import EXACT, PassInfo, Refused, RewritePass
from graphopt.pattern import Any, Const, MatchResult, Op, Rewriter, Rule

MATMUL = Op("MatMul", Any("a"), Const("b"), name="mm")
PATTERNS = (Op("Add", MATMUL, Const("c")), Op("Add", Const("c"), MATMUL))


def match(node: gs.Node, graph: gs.Graph) -> MatchResult:
    m = next((r for r in (p.match(node, graph) for p in PATTERNS) if r), MatchResult.no_match())
    if not m:
        return m
    a, b, c = m["a"], m["b"].values, m["c"].values
    if b.ndim != 2:
        return MatchResult.no_match()
    if a.shape is None or len(a.shape) != 2:
        rank = "unknown" if a.shape is None else len(a.shape)
        raise Refused(f"MatMul '{m['mm'].name}' input has rank {rank}; Gemm needs rank 2")
    n = b.shape[1]
    m_dim = a.shape[0]
    c_dims = (1,) * (2 - c.ndim) + c.shape if c.ndim <= 2 else None
    if c_dims is None or c_dims[1] not in (1, n) or (c_dims[0] != 1 and c_dims[0] != m_dim):
        raise Refused(f"bias of shape {c.shape} does not broadcast one way to (M, {n})")
    if c.dtype != b.dtype:
        return MatchResult.no_match()
    return m


def rewrite(rw: Rewriter, node: gs.Node, m: MatchResult) -> None:
    out = node.outputs[0]
    rw.remove(m["mm"])
    rw.remove(node)
    rw.add_node("Gemm", [m["a"], m["b"], m["c"]], [out], name=m["mm"].name)


class FuseMatMulAdd(RewritePass):
    name = "fuse-matmul-add"
    info = PassInfo(EXACT, requires=frozenset({SHAPES_INFERRED}))
    rules = (Rule("matmul-add-to-gemm", ("Add",), match, rewrite),)
