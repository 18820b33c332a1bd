"""`check_pass`: the one helper every pass test uses.

onnx.checker before and after; strict ONNX shape inference on the rewritten model, which must
agree with every shape the rewrite declared; onnxruntime (graph optimisations off) on the original
and the rewritten model for several input seeds; outputs compared by the pass's declared
semantics; the pass run a second time to check idempotence. Returns the rewritten graph and the first run's
result so the test can assert what matched.
"""
from __future__ import annotations


import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.ir import fidelity, ort
from graphopt.ir.data import input_specs, random_feeds
from graphopt.ir.graph import export
from graphopt.passes.base import Pass, PassContext, PassResult
from graphopt.passes.manager import PassManager


def as_graph(model: onnx.ModelProto | gs.Graph) -> gs.Graph:
    return model.copy() if isinstance(model, gs.Graph) else gs.import_onnx(model)


def check_pass(model: onnx.ModelProto | gs.Graph, pass_: Pass, inputs: list[dict] | None = None,
               seeds: tuple[int, ...] = (0, 1), expect_modified: bool | None = True
               ) -> tuple[gs.Graph, PassResult, dict]:
    """Run `pass_` (verified by the PassManager) and hold its output to its semantics.

    Returns (graph, result, worst fidelity per output) where fidelity maps output name to the
    lowest cosine similarity seen over all inputs.
    """
    graph = as_graph(model)
    original = export(graph)
    onnx.checker.check_model(original)
    feeds_list = inputs or [random_feeds(input_specs(graph), seed=s, batch=2) for s in seeds]
    references = [ort.run(original, f) for f in feeds_list]

    record = PassManager([pass_], verify=True).run(graph, PassContext(seed=seeds[0]))[0]
    result = record.result
    rewritten = export(graph)
    onnx.checker.check_model(rewritten)
    check_declared_shapes(rewritten)
    if expect_modified is not None:
        assert result.modified == expect_modified, f"{pass_!r} modified={result.modified}: {result.stats}"

    worst: dict[str, float] = {}
    for feeds, reference in zip(feeds_list, references):
        outputs = ort.run(rewritten, feeds)
        assert set(outputs) == set(reference), f"outputs changed: {sorted(reference)} -> {sorted(outputs)}"
        for name, ref in reference.items():
            assert outputs[name].shape == ref.shape, f"{name}: shape {ref.shape} -> {outputs[name].shape}"
            why = pass_.info.semantics.violation(ref, outputs[name])
            assert why is None, f"{pass_!r} on output {name}: {why}"
            cos = fidelity.measure(ref, outputs[name]).cosine
            worst[name] = min(worst.get(name, 1.0), cos)

    if pass_.info.idempotent:
        again = PassManager([pass_], verify=True).run(graph, PassContext(seed=seeds[0]))[0]
        assert not again.modified, f"{pass_!r} is not idempotent: second run changed {again.stats}"
    return graph, result, worst


def check_declared_shapes(model: onnx.ModelProto) -> None:
    """Strict shape inference must agree with every shape the model declares.

    onnxruntime re-infers shapes and runs a model whose declared shapes are wrong, but the cost
    model (MACs) and later passes read the declared ones.
    """
    try:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError as e:
        raise AssertionError(f"declared shapes disagree with ONNX shape inference: {e}") from None


def ops(graph: gs.Graph) -> list[str]:
    return [n.op for n in graph.nodes]


def refusals(result: PassResult) -> list[str]:
    """All refusal reasons of a pass run."""
    return [r.reason for r in result.refused]


def rng_array(shape, seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)
