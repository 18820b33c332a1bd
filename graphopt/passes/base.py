"""The pass contract: a name, typed options, declared semantics and invariants, and `run`.

A pass rewrites a `gs.Graph` in place and returns `PassResult(modified, stats)`. What it
guarantees numerically is declared as `Semantics`, which the fidelity instrument and the test
helper enforce: EXACT (equal up to float rounding), TOLERANCE(rtol, atol), LOSSY(metric, bound).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.ir.errors import PipelineError
from graphopt.pattern import Rule, apply_rules


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
        ref = np.asarray(reference, np.float64)
        out = np.asarray(candidate, np.float64)
        if ref.shape != out.shape:
            return f"shape {out.shape} != {ref.shape}"
        # Rounding error of reassociated float32 sums scales with the output's magnitude.
        scale = max(1.0, float(np.max(np.abs(ref)))) if ref.size else 1.0
        atol = self.atol * scale if self.kind == "exact" or self.scaled else self.atol
        err = np.abs(out - ref)
        limit = atol + self.rtol * np.abs(ref)
        if np.all(err <= limit) and np.all(np.isfinite(out) == np.isfinite(ref)):
            return None
        return f"max abs error {float(np.nanmax(err)):.3g} exceeds {self.describe()}"


EXACT = Semantics("exact", rtol=1e-4, atol=1e-5)


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


@dataclass
class PassResult:
    modified: bool
    stats: dict = field(default_factory=dict)


@dataclass
class PassContext:
    """What a pass may need beyond the graph: data, a seed, verification and progress hooks."""
    feeds: dict[str, np.ndarray] | None = None
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
        return PassResult(stats.modified, stats.as_dict())


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
