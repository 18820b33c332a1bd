"""canonicalize: the cleanup passes run to a fixed point.

Runs fold-constants, eliminate-noops, fold-batchnorm, fuse-matmul-add and eliminate-dead in a
nested PassManager (so each sub-pass is verified) until a whole round changes nothing.
Guarantees: EXACT, as each of its passes.
Verified by: tests/passes/cleanup/test_canonicalize.py on the bundled models and the ONNX
backend node suite (tests/conformance).
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from graphopt.passes.base import EXACT, Pass, PassContext, PassInfo, PassResult
from graphopt.passes.cleanup.eliminate_dead import EliminateDead
from graphopt.passes.cleanup.eliminate_noops import EliminateNoops
from graphopt.passes.cleanup.fold_batchnorm import FoldBatchNorm
from graphopt.passes.cleanup.fold_constants import FoldConstants
from graphopt.passes.cleanup.fuse_matmul_add import FuseMatMulAdd


@dataclass(frozen=True)
class Options:
    max_rounds: int = 8


class Canonicalize(Pass):
    name = "canonicalize"
    info = PassInfo(EXACT)
    Options = Options

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        from graphopt.passes.manager import PassManager

        manager = PassManager([FoldConstants(), EliminateNoops(), FoldBatchNorm(), FuseMatMulAdd(),
                               EliminateDead()], verify=ctx.verify)
        stats: dict[str, dict] = {}
        modified, rounds = False, 0
        while rounds < self.options.max_rounds:
            rounds += 1
            records = manager.run(graph, ctx)
            for r in records:
                _merge(stats.setdefault(r.name, {}), r.stats)
            if not any(r.modified for r in records):
                break
            modified = True
        return PassResult(modified, {"rounds": rounds, "passes": stats})


def _merge(into: dict, stats: dict) -> None:
    """Sum counters and concatenate lists across rounds; keep the last refusal list only,
    since a refusal in an early round may have been resolved later."""
    for key, value in stats.items():
        if key == "refused":
            into[key] = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            into[key] = into.get(key, 0) + value
        elif isinstance(value, dict):
            _merge(into.setdefault(key, {}), value)
        else:
            into[key] = value
