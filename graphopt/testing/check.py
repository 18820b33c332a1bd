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


# Integer ops whose uint8 activation onnxruntime multiplies with u8 x s8 kernels: op -> (activation
# slot, its zero point's slot, the weight's slot, the output zero point's slot or None).
U8S8_OPS = {"MatMulInteger": (0, 2, 1, None), "ConvInteger": (0, 2, 1, None),
            "QLinearConv": (0, 2, 3, 7), "QLinearMatMul": (0, 2, 3, 7)}


def integer_reference(model: onnx.ModelProto | gs.Graph, feeds: dict[str, np.ndarray],
                      **session) -> dict[str, np.ndarray]:
    """The outputs integer kernels are checked against: onnxruntime's; where this CPU's
    onnxruntime sums u8 x s8 products in 16 bits with saturation (shift_uint8.u8s8_inexact),
    onnxruntime's on `signed_reference(model)`, the same integers through its exact s8 x s8 kernels."""
    from graphopt.passes.quant.shift_uint8 import u8s8_inexact

    proto = export(model) if isinstance(model, gs.Graph) else model
    return ort.run(proto if u8s8_inexact() is None else signed_reference(proto), feeds, **session)


def signed_reference(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every uint8 activation of a u8 x s8 integer op (and its zero point) moved to
    int8 by subtracting 128, and a uint8 output moved back: exactly the same integers (an 8-bit
    value q with zero point z stands for q - z either way), computed by s8 x s8 kernels."""
    from onnx import TensorProto, helper, shape_inference

    m = shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in [*m.graph.input, *m.graph.value_info, *m.graph.output]}
    types.update({t.name: t.data_type for t in m.graph.initializer})
    nodes: list[onnx.NodeProto] = []
    counter = iter(range(1 << 30))

    def moved(name: str, by: int, to: int) -> str:
        """Cast(Cast(name, int32) + by, to), as new nodes; the new tensor's name."""
        k = next(counter)
        wide, shifted, out = f"{name}__s32_{k}", f"{name}__shift_{k}", f"{name}__moved_{k}"
        nodes.extend([helper.make_node("Cast", [name], [wide], to=TensorProto.INT32),
                      helper.make_node("Add", [wide, f"__by_{by}"], [shifted]),
                      helper.make_node("Cast", [shifted], [out], to=to)])
        return out

    for node in m.graph.node:
        slots = U8S8_OPS.get(node.op_type)
        if slots is None or types.get(node.input[slots[0]]) != TensorProto.UINT8 \
                or types.get(node.input[slots[2]]) != TensorProto.INT8:
            nodes.append(node)
            continue
        x, xz, _, yz = slots
        inputs = list(node.input) + [""] * (max(slots[:3]) + 1 - len(node.input))
        inputs[x] = moved(inputs[x], -128, TensorProto.INT8)
        inputs[xz] = moved(inputs[xz], -128, TensorProto.INT8) if inputs[xz] else "__by_-128_int8"
        outputs = list(node.output)
        if yz is not None and types.get(node.output[0]) == TensorProto.UINT8:
            inputs[yz] = moved(inputs[yz], -128, TensorProto.INT8)
            outputs[0] = node.output[0] + "__signed"
        signed = helper.make_node(node.op_type, inputs, outputs, name=node.name, domain=node.domain)
        signed.attribute.extend(node.attribute)
        nodes.append(signed)
        if outputs[0] != node.output[0]:
            nodes.append(helper.make_node("Cast", [moved(outputs[0], 128, TensorProto.UINT8)], [node.output[0]],
                                          to=TensorProto.UINT8))
    constants = [onnx.numpy_helper.from_array(np.array(-128, np.int32), "__by_-128"),
                 onnx.numpy_helper.from_array(np.array(128, np.int32), "__by_128"),
                 onnx.numpy_helper.from_array(np.array(-128, np.int8), "__by_-128_int8")]
    out = onnx.ModelProto()
    out.CopyFrom(m)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(constants)
    return out
