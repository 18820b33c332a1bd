"""Drivers that apply rules: a greedy walk repeated to a fixed point, or a single walk."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import onnx_graphsurgeon as gs

from graphopt.ir.errors import Refused
from graphopt.pattern.pattern import MatchResult
from graphopt.pattern.rewriter import Rewriter


@dataclass(frozen=True)
class Rule:
    """`match` is pure and raises `Refused(reason)` to say why it will not rewrite a structural
    match; `rewrite` changes the graph through the rewriter."""
    name: str
    ops: tuple[str, ...]
    match: Callable[[gs.Node, gs.Graph], MatchResult]
    rewrite: Callable[[Rewriter, gs.Node, MatchResult], None]


@dataclass
class RewriteStats:
    applied: Counter = field(default_factory=Counter)
    refused: dict = field(default_factory=dict)  # (node name, rule name) -> reason
    walks: int = 0

    @property
    def modified(self) -> bool:
        return sum(self.applied.values()) > 0


def apply_rules(graph: gs.Graph, rules: tuple[Rule, ...], fixed_point: bool = True,
                max_walks: int = 32) -> RewriteStats:
    """Walk the graph in order, applying the first rule that matches each node; repeat until no
    rule applies (or once, without `fixed_point`)."""
    by_op: dict[str, list[Rule]] = {}
    for rule in rules:
        for op in rule.ops:
            by_op.setdefault(op, []).append(rule)
    stats = RewriteStats()
    rewriter = Rewriter(graph)
    for _ in range(max_walks):
        stats.walks += 1
        applied = _walk(graph, by_op, rewriter, stats)
        rewriter.commit()
        if not applied or not fixed_point:
            break
    return stats


def _walk(graph: gs.Graph, by_op: dict, rewriter: Rewriter, stats: RewriteStats) -> int:
    applied = 0
    for node in list(graph.nodes):
        if not node.outputs or node.domain not in ("", "ai.onnx", None):
            continue  # detached by an earlier rewrite in this walk, or not an ONNX op
        for rule in by_op.get(node.op, ()):
            key = (node.name, rule.name)
            try:
                result = rule.match(node, graph)
            except Refused as e:
                stats.refused[key] = e.reason
                continue
            if result:
                stats.refused.pop(key, None)
                rule.rewrite(rewriter, node, result)
                stats.applied[rule.name] += 1
                applied += 1
                break
    return applied
