"""Pattern matching and rewriting over gs.Graph. Knows no pass."""
from graphopt.pattern.driver import Rule, RewriteStats, apply_rules
from graphopt.pattern.pattern import Any, Const, MatchResult, Op
from graphopt.pattern.rewriter import Rewriter, check_replacement

__all__ = ["Any", "Const", "MatchResult", "Op", "Rewriter", "Rule", "RewriteStats", "apply_rules",
           "check_replacement"]
