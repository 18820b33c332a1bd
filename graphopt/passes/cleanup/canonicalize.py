"""canonicalize: the cleanup passes run to a fixed point.

Matches: whatever fold-constants, eliminate-noops, fold-batchnorm, fuse-matmul-add and
eliminate-dead match.
Rewrites: runs those passes in a nested PassManager (each sub-pass verified) until a whole round
changes nothing, at most `max_rounds` rounds.
Refuses: what its passes refuse, in the last round (each refusal names its sub-pass).
Guarantees: EXACT, as each of its passes; idempotent.
Verified by: tests/passes/cleanup/test_canonicalize.py on the bundled models and the ONNX
backend node suite (tests/conformance).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import onnx_graphsurgeon as gs

from graphopt.passes.base import EXACT, Pass, PassContext, PassInfo, PassResult, option
from graphopt.passes.cleanup.eliminate_dead import EliminateDead
from graphopt.passes.cleanup.eliminate_noops import EliminateNoops
from graphopt.passes.cleanup.fold_batchnorm import FoldBatchNorm
from graphopt.passes.cleanup.fold_constants import FoldConstants
from graphopt.passes.cleanup.fuse_matmul_add import FuseMatMulAdd


@dataclass(frozen=True)
class Options:
    max_rounds: int = option(8, "at most this many rounds of all the cleanup passes")


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
        # The last round's refusals only: one in an early round may have been resolved later.
        refused = [replace(r, rule=f"{record.name}/{r.rule}" if r.rule else record.name)
                   for record in records for r in record.refused]
        return PassResult(modified, {"rounds": rounds, "passes": stats}, refused)


def _merge(into: dict, stats: dict) -> None:
    """Sum counters across rounds; other values keep the last round's."""
    for key, value in stats.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            into[key] = into.get(key, 0) + value
        elif isinstance(value, dict):
            _merge(into.setdefault(key, {}), value)
        else:
            into[key] = value
