"""PassManager: runs passes in order, timing each, with instruments around every pass.

Instruments see each pass before and after it runs. `VerifyInstrument` checks onnx.checker,
the named invariants and the graph's interface; `FidelityInstrument` runs the model in
onnxruntime, holds every pass to its declared semantics and applies the quality gate
(graphopt.passes.gate). An exception that is
not a GraphoptError escaping a pass is a bug: it is wrapped in a `PassError` naming the pass and
the passes before it.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import fidelity, ort, stream, verify
from graphopt.ir.errors import GateError, GraphoptError, ModelError, PassError, VerificationError
from graphopt.ir.graph import opset
from graphopt.ir.opset import upgrade_in_place
from graphopt.passes.base import Pass, PassContext, PassResult, Refusal
from graphopt.passes.gate import Gate, lossy_violation


@dataclass
class PassRecord:
    name: str
    modified: bool
    seconds: float
    stats: dict = field(default_factory=dict)
    refused: list[Refusal] = field(default_factory=list)
    skipped: list[Refusal] = field(default_factory=list)
    decisions: dict[str, dict] = field(default_factory=dict)
    fidelity: dict | None = None
    top1: float | None = None  # percent, on the held-aside samples (Gate.top1)

    @classmethod
    def of(cls, name: str, result: PassResult, seconds: float) -> "PassRecord":
        return cls(name, result.modified, seconds, result.stats, result.refused, result.skipped, result.decisions)

    @property
    def result(self) -> PassResult:
        return PassResult(self.modified, self.stats, self.refused, self.skipped, self.decisions)

    def as_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if v is not None}
        out["refused"] = [r.as_dict() for r in self.refused]
        out["skipped"] = [r.as_dict() for r in self.skipped]
        return out


class Instrument:
    def before_pass(self, pass_: Pass, graph: gs.Graph, index: int, total: int) -> None:
        pass

    def after_pass(self, pass_: Pass, graph: gs.Graph, record: PassRecord) -> None:
        pass


class VerifyInstrument(Instrument):
    """onnx.checker, the always-on invariants, the pass's `ensures`, and an unchanged interface."""

    def __init__(self, graph: gs.Graph):
        self.signature = verify.Signature.of(graph)

    def after_pass(self, pass_, graph, record):
        problems = verify.check(graph, verify.ALWAYS + tuple(sorted(pass_.info.ensures)))
        problems += self.signature.differences(verify.Signature.of(graph))
        if problems:
            raise VerificationError(f"pass '{pass_.name}' left an invalid graph: " + "; ".join(problems[:5]))


class FidelityInstrument(Instrument):
    """Records each pass's fidelity against the original model's outputs on `feeds` in onnxruntime;
    when `enforce`, holds EXACT and TOLERANCE passes to their bounds and LOSSY passes to theirs
    (unless the `gate` is the user's), all against the model they were given; then the gate."""

    def __init__(self, reference: dict[str, np.ndarray], feeds: dict[str, np.ndarray],
                 gate: Gate | None = None, enforce: bool = True):
        self.reference, self.feeds = reference, feeds
        self.gate = gate or Gate(reference)
        self.enforce = enforce
        # Each pass is held to its bound against the model it was given, not the original: after
        # quantize (LOSSY), lower-int8 is measured against the QDQ model.
        self.given = reference
        # The outputs of the graph as the last modifying pass left it (None until one has).
        self.latest: dict[str, np.ndarray] | None = None

    def after_pass(self, pass_, graph, record):
        if not record.modified:
            return
        outputs = ort.run(graph, self.feeds)
        broken = fidelity.turned_non_finite(self.given, outputs)
        if broken:  # a cosine of NaN would slip past every bound: this is the pass failing
            raise VerificationError(f"pass '{pass_.name}' turned output '{broken}' NaN/Inf where it was finite "
                                    f"before the pass; nothing written")
        record.fidelity = {k: v.as_dict() for k, v in fidelity.compare(self.reference, outputs).items()}
        accuracy = self.gate.top1(outputs)
        if accuracy is not None:
            record.top1 = round(accuracy, 4)
        if self.enforce:
            self._hold_to_semantics(pass_, outputs)
        self.gate.check(pass_.name, outputs)
        self.given = self.latest = outputs

    def _hold_to_semantics(self, pass_, outputs):
        semantics = pass_.info.semantics
        if semantics.kind == "lossy":
            why = None if self.gate.user_set else lossy_violation(semantics.bound, self.given, outputs)
            if why:
                raise GateError(f"pass '{pass_.name}': {why}; nothing written")
            return
        for name, ref in self.given.items():
            why = semantics.violation(ref, outputs[name])
            if why:
                raise VerificationError(f"pass '{pass_.name}' broke its semantics on output '{name}': {why}")


class SizeInstrument(Instrument):
    """The model's serialized size after each pass, in pass order (graphopt.ir.stream.size: counted
    without reading a weight), for Deep Compression's staged table."""

    def __init__(self):
        self.sizes: list[int] = []

    def after_pass(self, pass_, graph, record):
        self.sizes.append(stream.size(graph))


class PassManager:
    def __init__(self, passes, verify: bool = True, instruments: tuple[Instrument, ...] = ()):
        self.passes = list(passes)
        self.verify = verify
        self.instruments = list(instruments)

    def run(self, graph: gs.Graph, ctx: PassContext | None = None) -> list[PassRecord]:
        ctx = ctx or PassContext(verify=self.verify)
        instruments = ([VerifyInstrument(graph)] if self.verify else []) + self.instruments
        # Passes key refusals, decisions and include/exclude by node name; exporters leave some empty.
        verify.name_nodes(graph)
        records = []
        for i, pass_ in enumerate(self.passes):
            for inst in instruments:
                inst.before_pass(pass_, graph, i, len(self.passes))
            start = time.perf_counter()
            try:
                result = self._run_one(pass_, graph, ctx)
            except (GraphoptError, KeyboardInterrupt):
                raise
            except Exception as e:  # noqa: BLE001 - a bug in the pass: name it
                raise PassError(pass_.name, [p.name for p in self.passes[:i]], e) from e
            record = PassRecord.of(pass_.name, result, time.perf_counter() - start)
            for inst in instruments:
                inst.after_pass(pass_, graph, record)
            records.append(record)
        return records

    @staticmethod
    def _run_one(pass_: Pass, graph: gs.Graph, ctx: PassContext) -> PassResult:
        low, high = pass_.info.opset
        version = opset(graph)
        if version > high:
            return PassResult(False, skipped=[Refusal("", f"opset {version} is newer than the pass's range {low}..{high}")])
        if version < low:
            # Older exporters write opset 9-12: upgrade (verified EXACT) rather than skip the pass.
            try:
                upgrade_in_place(graph, low, ctx.feeds, verify=ctx.verify)
            except ModelError as e:
                return PassResult(False, skipped=[Refusal(e.node or "", f"opset {version} is below the pass's range "
                                                              f"{low}..{high} and cannot be upgraded: {e.what}")])
            verify.name_nodes(graph)
        for name in sorted(pass_.info.requires):
            establish = verify.INVARIANTS[name].establish
            if establish:
                establish(graph)
        result = pass_.run(graph, ctx)
        if version < low:
            # The graph changed even where the pass did not: the report shows the upgrade, and the
            # instruments check it.
            result.stats["opset"] = f"{version} -> {low}"
            result.modified = True
        return result
