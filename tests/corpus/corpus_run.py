"""Run one pass family on one corpus model through graphopt's Python API and classify the outcome.

Outcomes (what issue 13 asks of every cell of the model x pass table):
- "modified": the pass changed the model (and, with verify on, EXACT/TOLERANCE passes stayed in
  their bounds: the PassManager's FidelityInstrument raises otherwise);
- "refused": it changed nothing and said why: refused/skipped reasons in its record; or the model
  has no op the pass rewrites (a canonical model, a CNN for factorize-svd); or a one-line ModelError
  or PipelineError (a model graphopt will not take, options it will not run);
- "failed": anything else: a crash (PassError, an exception that is not a GraphoptError), a broken
  bound (VerificationError), any other GraphoptError (onnxruntime failing on inputs it accepts
  alone, a DataError on them), a message of several lines, or a pass that changed nothing and
  said nothing while the model holds ops it rewrites.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

import graphopt
from graphopt.ir.errors import ModelError, PipelineError
from graphopt.report import pass_outcome

# Pass family -> the pipeline that runs it. lower-int8 needs the QDQ model quantize writes.
FAMILIES: dict[str, str] = {
    "canonicalize": "canonicalize",
    "quantize": "quantize",
    "lower-int8": "quantize,lower-int8",
    "prune-magnitude": "prune-magnitude",
    "prune-n-m": "prune-n-m",
    "prune-channels": "prune-channels",
    "factorize-svd": "factorize-svd(energy=0.95)",
    "factorize-tucker": "factorize-tucker(energy=0.95)",
    "winograd": "winograd",
}
# The ops each family's last pass rewrites: where the model has none with a constant operand,
# changing nothing needs no reason.
PRUNABLE = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
REWRITES: dict[str, frozenset] = {
    "canonicalize": frozenset(), "quantize": frozenset({"Conv", "Gemm", "MatMul"}),
    "prune-magnitude": PRUNABLE, "prune-n-m": PRUNABLE, "prune-channels": PRUNABLE,
    "factorize-svd": frozenset({"Gemm", "MatMul"}), "factorize-tucker": frozenset({"Conv"}),
    "winograd": frozenset({"Conv"}),
}


@dataclass
class Outcome:
    status: str                  # modified | refused | failed
    message: str                 # why refused or failed; what changed when modified
    seconds: float
    result: graphopt.Optimized | None = None

    def line(self) -> str:
        return f"{self.status}: {self.message}"


def run(path: Path, family: str, feeds: dict[str, np.ndarray]) -> Outcome:
    """Load `path` and run the family's pipeline with `feeds` as data, verification on."""
    start = time.perf_counter()
    try:
        # The table measures what each pass does to each model: a LOSSY pass's own cosine bound
        # (which would stop it with exit 4, as on the CLI) is lowered to any cosine here.
        result = graphopt.optimize(graphopt.load(path), FAMILIES[family], data=feeds, latency=False,
                                   min_cosine=-1.0)
    except (ModelError, PipelineError) as e:
        status = "refused" if "\n" not in str(e).strip() else "failed"
        return Outcome(status, f"{type(e).__name__}: {e}", time.perf_counter() - start)
    except Exception as e:  # noqa: BLE001 - every other error is an outcome to record, not to raise
        return Outcome("failed", f"{type(e).__name__}: {e}", time.perf_counter() - start)
    return _classify(result, family, path, time.perf_counter() - start)


def _classify(result: graphopt.Optimized, family: str, path: Path, seconds: float) -> Outcome:
    records = result.report["passes"]
    last = records[-1]
    if last["modified"]:
        return Outcome("modified", pass_outcome(last) or f"{last['name']}: modified", seconds, result)
    if last["refused"] or last["skipped"]:
        return Outcome("refused", pass_outcome(last), seconds, result)
    if family == "lower-int8":
        # lower-int8 lowers what quantize wrote: with no QDQ layer, quantize's reasons are the reasons.
        quantize = records[0]
        if quantize["modified"]:
            return Outcome("failed", "lower-int8: changed nothing and said nothing, after quantize wrote QDQ "
                                     "layers", seconds, result)
        if quantize["refused"] or quantize["skipped"]:
            return Outcome("refused", pass_outcome(quantize), seconds, result)
    present = REWRITES["quantize" if family == "lower-int8" else family] & _weighted_ops(
        onnx.load(str(path), load_external_data=False).graph)
    if not present:
        return Outcome("refused", pass_outcome(last), seconds, result)
    return Outcome("failed", f"{last['name']}: changed nothing and said nothing, with {sorted(present)} "
                             "in the model", seconds, result)


def _weighted_ops(graph: onnx.GraphProto) -> set[str]:
    """Op types of the nodes that read a constant (an initializer or a Constant node, perhaps through
    Identity, Cast, Transpose or DequantizeLinear): the layers a layer pass looks for."""
    constant = {t.name for t in graph.initializer}
    for node in graph.node:  # exporters write nodes in topological order
        if node.op_type == "Constant" or (node.op_type in _WEIGHT_FORMS and node.input and node.input[0] in constant):
            constant.update(node.output)
    return {n.op_type for n in graph.node if n.op_type not in _WEIGHT_FORMS and any(i in constant for i in n.input)}


_WEIGHT_FORMS = frozenset({"Identity", "Cast", "Transpose", "DequantizeLinear"})


def min_cosine(result: graphopt.Optimized) -> float | None:
    """The lowest output cosine against the original model (None where no output is float)."""
    values = [v["cosine"] for v in result.report["fidelity"]["outputs"].values() if v.get("cosine") is not None]
    return min(values) if values else None


def survival_problems(original: onnx.ModelProto, saved: onnx.ModelProto) -> list[str]:
    """What of the model's own data a pass lost: metadata_props, doc strings, producer, input and
    output names and order, model-local functions."""
    problems = []

    def same(what: str, before, after) -> None:
        if before != after:
            problems.append(f"{what}: {_short(before)} became {_short(after)}")

    same("metadata_props", {p.key: p.value for p in original.metadata_props},
         {p.key: p.value for p in saved.metadata_props})
    same("doc_string", original.doc_string, saved.doc_string)
    same("graph doc_string", original.graph.doc_string, saved.graph.doc_string)
    same("producer", (original.producer_name, original.producer_version), (saved.producer_name, saved.producer_version))
    initializers = {t.name for t in original.graph.initializer}
    same("inputs", [i.name for i in original.graph.input if i.name not in initializers],
         [i.name for i in saved.graph.input if i.name not in {t.name for t in saved.graph.initializer}])
    same("outputs", [o.name for o in original.graph.output], [o.name for o in saved.graph.output])
    same("functions", sorted((f.domain, f.name) for f in original.functions),
         sorted((f.domain, f.name) for f in saved.functions))
    return problems


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
