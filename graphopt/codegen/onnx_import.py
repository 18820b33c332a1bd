"""ONNX -> Relax: TVM's ONNX frontend, plus the operators graphopt converts itself.

TVM 0.27's frontend has no QLinearConv, QLinearMatMul, ConvInteger or MatMulInteger, and knows
nothing of graphopt's own ops (`graphopt.ir.ops`, e.g. the convolutions graphopt's winograd pass
marks for TVM). `CONVERTERS` maps those op types to converters with the frontend's converter
signature, `(bb, inputs, attrs) -> relax.Expr`, where `inputs` holds `relax.Constant` for
initializers (weights are bound, not parameters). The importer is the frontend's own, subclassed
only at its two op-dispatch points, so every other op converts exactly as TVM converts it.
graphopt's own ops convert only from their domain (`ops.DOMAIN`): an op of the same name from
another domain is not graphopt's, and is left to TVM, which has no converter for it.
"""
from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Mapping

import onnx

from graphopt.codegen import int8_import, winograd
from graphopt.codegen.targets import tvm_error_summary
from graphopt.ir import ops
from graphopt.ir.errors import CodegenError

# Each module adds `CONVERTERS: dict[str, Callable]`, imported here explicitly (no registration
# by import side effect): graphopt.codegen.int8_import (QLinearConv, QLinearMatMul, ConvInteger,
# MatMulInteger) and graphopt.codegen.winograd (graphopt's own ops, ops.DOMAIN).
CONVERTERS: Mapping[str, Callable] = {**int8_import.CONVERTERS, **winograd.CONVERTERS}
_OWN_OPS = frozenset(winograd.CONVERTERS)


def known_ops() -> frozenset[str]:
    """Every op type this importer converts (graphopt's own ops only from their domain: `foreign`)."""
    from tvm.relax.frontend.onnx import onnx_frontend

    return frozenset(onnx_frontend._get_convert_map()) | frozenset(CONVERTERS)


def foreign(node: onnx.NodeProto) -> bool:
    """Whether `node` has the type of one of graphopt's own ops from another domain than
    `ops.DOMAIN`: not graphopt's op, and no converter takes it."""
    return node.op_type in _OWN_OPS and node.domain != ops.DOMAIN


def from_onnx(model: onnx.ModelProto, shape_dict: dict[str, list[int]]):
    """`tvm.relax.frontend.onnx.from_onnx(model, shape_dict, keep_params_in_input=False)` with
    graphopt's converters added. A converter's failure raises CodegenError naming the node."""
    from tvm.relax.frontend.onnx import onnx_frontend

    by_type: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        by_type.setdefault(node.op_type, []).append(node)
    seen: dict[str, int] = {}

    class Importer(onnx_frontend.ONNXGraphImporter):
        def _check_for_unsupported_ops(self, graph):
            # The frontend's check reads only the nodes: hand it the ones it converts, without
            # copying the graph's weights.
            theirs = onnx.GraphProto()
            theirs.node.extend(n for n in graph.node if n.op_type not in CONVERTERS or foreign(n))
            super()._check_for_unsupported_ops(theirs)

        def _convert_operator(self, op_name, inputs, attrs, opset):
            # The frontend converts nodes in graph order, so the k-th call for an op type is the
            # k-th node of that type: the node an error names.
            seen[op_name] = seen.get(op_name, 0) + 1
            try:
                if op_name not in CONVERTERS:
                    return super()._convert_operator(op_name, inputs, attrs, opset)
                return self.bb.normalize(CONVERTERS[op_name](self.bb, inputs, attrs))
            except Exception as e:  # noqa: BLE001 - converters raise anything; the node is what matters
                nodes = by_type.get(op_name, [])
                node = nodes[seen[op_name] - 1] if seen[op_name] <= len(nodes) else None
                where = f"node '{node.name or '(unnamed)'}' ({op_name})" if node is not None else op_name
                raise CodegenError(f"cannot convert {where}: {tvm_error_summary(e)}") from e

    importer = Importer(shape_dict, "float32", keep_params_in_input=False, sanitize=True)
    # The frontend prints its own note on stdout before re-raising; the error above says it all.
    with contextlib.redirect_stdout(io.StringIO()):
        return importer.from_onnx(model.graph, _opset(model))


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
