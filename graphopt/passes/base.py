"""The pass contract: a name, typed options, declared semantics and invariants, and `run`.

A pass rewrites a `gs.Graph` in place and returns a `PassResult`: whether it changed the graph,
its free-form `stats`, and the typed per-layer record the report, the CLI and the tests read
(`refused`, `skipped`, `decisions`). What it guarantees numerically is declared as `Semantics`,
which the fidelity instrument and the test helper enforce: EXACT (equal up to float rounding),
TOLERANCE(rtol, atol), LOSSY(metric, bound).

There are two ways to write a pass, by what it rewrites:
- `RewritePass`: local pattern rules applied to a fixed point (the cleanup passes).
- `LayerPass`: examine -> plan -> rewrite over the layers of some op types, for passes that
  decide per layer, often from all layers at once (pruning, factorization, quantization,
  Winograd). Any helper refuses a layer by raising `Refused(reason)`.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.ir import fidelity
from graphopt.ir.errors import PipelineError, Refused
from graphopt.pattern import Rewriter, Rule, apply_rules

__all__ = ["EXACT", "LOSSY", "TOLERANCE", "Layer", "LayerFilter", "LayerOptions", "LayerPass", "NoOptions",
           "Pass", "PassContext", "PassInfo", "PassResult", "Refusal", "Refused", "RewritePass", "Semantics",
           "option"]


@dataclass(frozen=True)
class Semantics:
    kind: str  # "exact" | "tolerance" | "lossy"
    rtol: float = 0.0
    atol: float = 0.0
    metric: str = ""
    bound: float = 0.0
    # TOLERANCE only: atol is a fraction of the output's largest magnitude (as EXACT's always is),
    # for rewrites whose rounding error grows with the values (Winograd), not a fixed step (int8).
    scaled: bool = False

    def describe(self) -> str:
        if self.kind == "exact":
            return "EXACT (equal up to float rounding)"
        if self.kind == "tolerance":
            scale = " x max(1, max|y|)" if self.scaled else ""
            return f"TOLERANCE(rtol={self.rtol:g}, atol={self.atol:g}{scale})"
        return f"LOSSY({self.metric} >= {self.bound:g})"

    def violation(self, reference: np.ndarray, candidate: np.ndarray) -> str | None:
        """Why `candidate` breaks these semantics against `reference`, or None. LOSSY never breaks."""
        if self.kind == "lossy":
            return None
        return fidelity.bound_violation(reference, candidate, self.rtol, self.atol,
                                        scaled=self.kind == "exact" or self.scaled, bound=self.describe())


EXACT = Semantics("exact", rtol=fidelity.EXACT_RTOL, atol=fidelity.EXACT_ATOL)


def TOLERANCE(rtol: float, atol: float, scaled: bool = False) -> Semantics:  # noqa: N802 - reads like the contract
    return Semantics("tolerance", rtol=rtol, atol=atol, scaled=scaled)


def LOSSY(metric: str, bound: float) -> Semantics:  # noqa: N802
    return Semantics("lossy", metric=metric, bound=bound)


@dataclass(frozen=True)
class PassInfo:
    semantics: Semantics = EXACT
    # Opset 7 dropped Dropout's is_test and BatchNormalization's spatial quirks; the top is what
    # the installed onnx knows, so a newer model is refused rather than misread.
    opset: tuple[int, int] = (7, onnx.defs.onnx_opset_version())
    requires: frozenset = frozenset()
    ensures: frozenset = frozenset()
    idempotent: bool = True
    # The pass chooses by timing candidates on the deployment target (PassContext.latency); the
    # CLI compiles a timer for the target only for such passes.
    needs_latency: bool = False


@dataclass(frozen=True)
class Refusal:
    """A node a pass left alone, and why (`rule`: which rule or sub-pass refused, where several may)."""
    node: str
    reason: str
    rule: str = ""

    def as_dict(self) -> dict:
        return {"node": self.node, "reason": self.reason, **({"rule": self.rule} if self.rule else {})}


@dataclass
class PassResult:
    """`refused`: unsafe or useless rewrites; `skipped`: layers the options left out; `decisions`:
    per layer, what the pass did to it or chose for it (and why, for passes that measure)."""
    modified: bool
    stats: dict = field(default_factory=dict)
    refused: list[Refusal] = field(default_factory=list)
    skipped: list[Refusal] = field(default_factory=list)
    decisions: dict[str, dict] = field(default_factory=dict)

    def refuse(self, node: str, reason: str) -> None:
        self.refused.append(Refusal(node, reason))

    def skip(self, node: str, reason: str) -> None:
        self.skipped.append(Refusal(node, reason))


@dataclass
class PassContext:
    """What a pass may need beyond the graph: data, a seed, verification and progress hooks."""
    feeds: dict[str, np.ndarray] | None = None
    # Whether `feeds` are the user's calibration data (--data) rather than random inputs: data-aware
    # methods are the default only on real data.
    from_data: bool = False
    seed: int = 0
    verify: bool = True
    progress: Callable[[str, int, int], None] | None = None
    # Times a model (median ms) on the deployment target, for passes that choose by measuring
    # (winograd's select="measure"); None means onnxruntime on this host. The CLI sets it to the
    # compiled TVM function when a target is given, so passes never import codegen.
    latency: Callable[[onnx.ModelProto, dict[str, np.ndarray]], float] | None = None


@dataclass(frozen=True)
class NoOptions:
    pass


class Pass:
    """Subclasses set `name`, `info`, optionally `Options` (a frozen dataclass), and `run`."""

    name: ClassVar[str]
    info: ClassVar[PassInfo] = PassInfo()
    Options: ClassVar[type] = NoOptions

    def __init__(self, **options: Any):
        self.options = make_options(self.name, self.Options, options)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        changed = {f.name: getattr(self.options, f.name) for f in dataclasses.fields(self.options)
                   if getattr(self.options, f.name) != f.default}
        args = ",".join(f"{k}={v!r}" for k, v in changed.items())
        return f"{self.name}({args})" if args else self.name


class RewritePass(Pass):
    """A pass made of pattern rules applied to a fixed point."""

    rules: ClassVar[tuple[Rule, ...]] = ()

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats = apply_rules(graph, self.rules)
        refused = [Refusal(node, reason, rule) for (node, rule), reason in stats.refused.items()]
        return PassResult(stats.modified, {"applied": dict(stats.applied), "walks": stats.walks}, refused)


def option(default: Any, help: str) -> Any:  # noqa: A002 - the name `graphopt passes NAME` prints
    """A pass option with its help text: `tile: int = option(4, "m of F(m x m, 3x3)")`."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class LayerOptions:
    """Options every layer pass takes: which layers it may touch."""
    include: tuple[str, ...] = option((), "only these layers: node names or op types, shell patterns "
                                          "(conv*, Gemm); a pattern that matches no layer is an error")
    exclude: tuple[str, ...] = option((), "never these layers (same patterns as include)")


@dataclass(frozen=True)
class LayerFilter:
    """`include` / `exclude` as fnmatch patterns over node names and op types."""
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @staticmethod
    def matches(pattern: str, node: gs.Node) -> bool:
        return fnmatch.fnmatchcase(node.name or "", pattern) or fnmatch.fnmatchcase(node.op, pattern)

    def check(self, pass_name: str, nodes: Iterable[gs.Node]) -> None:
        """A pattern that names none of `nodes` (the pass's candidate layers) is a typo: say so."""
        nodes = list(nodes)
        for key, patterns in (("include", self.include), ("exclude", self.exclude)):
            unknown = [p for p in patterns if not any(self.matches(p, n) for n in nodes)]
            if unknown:
                names = ", ".join(n.name for n in nodes[:12]) + (", ..." if len(nodes) > 12 else "")
                ops = ", ".join(sorted({n.op for n in nodes}))
                raise PipelineError(f"{pass_name}: {key}={'|'.join(unknown)} matches no layer this pass works on "
                                    f"(ops: {ops or 'none'}; layers: {names or 'none'})")

    def skip_reason(self, node: gs.Node) -> str | None:
        if self.include and not any(self.matches(p, node) for p in self.include):
            return "not in include"
        if any(self.matches(p, node) for p in self.exclude):
            return "excluded"
        return None


@dataclass
class Layer:
    """A node a layer pass works on, and what `examine` bound for it."""
    node: gs.Node
    match: Any

    @property
    def name(self) -> str:
        return self.node.name


class LayerPass(Pass):
    """examine -> plan -> rewrite over the nodes of `ops` (default domain), with one refusal type.

    - `examine(node, graph)`: pure; returns what the rewrite needs (the match), None when the node
      is not a layer of this pass (silently), or raises `Refused(reason)`.
    - `plan(layers, graph, ctx, result)`: decides for all accepted layers at once (a global
      threshold, a sensitivity-spread budget, calibration); by default `plan_layer` per layer.
      Returns (layer, plan) pairs to rewrite; a layer left out is left as it is.
    - `plan_layer(layer, graph, ctx, result)`: one layer's plan, None to leave it, or `Refused`.
    - `rewrite(rw, layer, plan)`: changes the graph through the rewriter; returns the layer's
      decision (recorded in `result.decisions`) or None.

    Every layer is examined and planned before any is rewritten, so matching never sees a
    half-rewritten graph. Options derived from `LayerOptions` give `include` / `exclude`.
    """

    ops: ClassVar[tuple[str, ...]] = ()

    def examine(self, node: gs.Node, graph: gs.Graph) -> Any:
        raise NotImplementedError

    def plan(self, layers: list[Layer], graph: gs.Graph, ctx: PassContext, result: PassResult) -> list[tuple[Layer, Any]]:
        planned = []
        for layer in layers:
            try:
                plan = self.plan_layer(layer, graph, ctx, result)
            except Refused as e:
                result.refuse(layer.name, e.reason)
                continue
            if plan is not None:
                planned.append((layer, plan))
        return planned

    def plan_layer(self, layer: Layer, graph: gs.Graph, ctx: PassContext, result: PassResult) -> Any:
        return layer.match

    def rewrite(self, rw: Rewriter, layer: Layer, plan: Any) -> dict | None:
        raise NotImplementedError

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(False)
        planned = self.plan(self.select(graph, result), graph, ctx, result)
        rw = Rewriter(graph)
        for layer, plan in planned:
            decision = self.rewrite(rw, layer, plan)
            if decision is not None:
                result.decisions[layer.name] = decision
        if rw.changes:
            rw.commit()
        result.modified = rw.changes > 0
        return result

    def candidates(self, graph: gs.Graph) -> list[gs.Node]:
        """The nodes this pass looks at, in graph order."""
        return [n for n in graph.nodes if n.op in self.ops and n.domain in ("", "ai.onnx", None)]

    def _inside_subgraphs(self, graph: gs.Graph, result: PassResult) -> None:
        """Layers inside If/Loop/Scan bodies are left as they are; say so per control-flow node."""
        for node in graph.nodes:
            found = sum(len(self.candidates(body)) for body in _bodies(node))
            if found:
                result.skip(node.name, f"{found} {'/'.join(self.ops)} layer(s) inside its {node.op} body: "
                                       "subgraphs are left as they are")

    def layer_filter(self) -> LayerFilter:
        o = self.options
        return LayerFilter(o.include, o.exclude) if isinstance(o, LayerOptions) else LayerFilter()

    def skip_reason(self, position: int, nodes: list[gs.Node]) -> str | None:
        """Why options other than include/exclude leave out candidate `nodes[position]` (the
        first or last layer, say); None to examine it."""
        return None

    def select(self, graph: gs.Graph, result: PassResult) -> list[Layer]:
        """Examine every candidate the options let through; record refusals and skips."""
        nodes = self.candidates(graph)
        chosen = self.layer_filter()
        chosen.check(self.name, nodes)
        self._inside_subgraphs(graph, result)
        layers = []
        for position, node in enumerate(nodes):
            why = chosen.skip_reason(node) or self.skip_reason(position, nodes)
            if why:
                result.skip(node.name, why)
                continue
            try:
                match = self.examine(node, graph)
            except Refused as e:
                result.refuse(node.name, e.reason)
                continue
            if match is not None:
                layers.append(Layer(node, match))
        return layers


def _bodies(node: gs.Node) -> list[gs.Graph]:
    """The subgraphs of a control-flow node (If branches, Loop and Scan bodies), nested ones too."""
    found = []
    for value in node.attrs.values():
        for body in value if isinstance(value, list) else [value]:
            if isinstance(body, gs.Graph):
                found += [body] + [b for inner in body.nodes for b in _bodies(inner)]
    return found


def option_help(cls: type) -> list[tuple[str, Any, str]]:
    """(name, default, help) of each option of an options dataclass, for `graphopt passes NAME`."""
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        rows.append((f.name, default, f.metadata.get("help", "")))
    return rows


def make_options(pass_name: str, cls: type, values: dict[str, Any]):
    """Build `cls(**values)`, coercing strings from the CLI and naming what is wrong."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = set(values) - set(fields)
    if unknown:
        known = ", ".join(fields) or "none"
        raise PipelineError(f"pass '{pass_name}' has no option {', '.join(sorted(unknown))} (options: {known})")
    coerced = {k: _coerce(pass_name, k, v, hints[k]) for k, v in values.items()}
    return cls(**coerced)


def _coerce(pass_name: str, key: str, value: Any, hint) -> Any:
    base = typing.get_origin(hint) or hint
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if base in (typing.Union, types.UnionType):
        if value is None:
            return None
        for a in args:
            try:
                return _coerce(pass_name, key, value, a)
            except PipelineError:
                continue
        raise PipelineError(f"pass '{pass_name}': option {key}={value!r} is not {hint}")
    if base is tuple:
        items = value.split("|") if isinstance(value, str) else list(value)
        return tuple(_coerce(pass_name, key, v, args[0] if args else str) for v in items)
    ok = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(base)
    if ok and isinstance(value, ok) and not (base is not bool and isinstance(value, bool)):
        return base(value)
    if isinstance(value, str) and base in (int, float):  # items of a "a|b" list arrive as text
        try:
            return base(value)
        except ValueError:
            pass
    raise PipelineError(f"pass '{pass_name}': option {key}={value!r} must be {getattr(base, '__name__', base)}")
