"""ONNX -> Relax: TVM's ONNX frontend, plus the operators graphopt converts itself.

TVM 0.27's frontend has no QLinearConv, QLinearMatMul, ConvInteger, MatMulInteger, LSTM, GRU or
RNN, and knows nothing of graphopt's own ops (`graphopt.ir.ops`, e.g. the convolutions graphopt's
winograd pass marks for TVM). `CONVERTERS` maps those op types to converters with the frontend's
converter signature, `(bb, inputs, attrs) -> relax.Expr`, where `inputs` holds `relax.Constant`
for initializers (weights are bound, not parameters). The importer is the frontend's own,
subclassed only at its two op-dispatch points (and where it names the node it converts, for
errors), so every other op converts exactly as TVM converts it. Before import, `shape_fold` makes
the shape computations of the now static-shaped model constants, which TVM's converters need.
graphopt's own ops convert only from their domain (`ops.DOMAIN`): an op of the same name from
another domain is not graphopt's, and is left to TVM, which has no converter for it.
"""
from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Mapping

import onnx
import onnx.inliner

from graphopt.codegen import int8_import, recurrent, shape_fold, winograd
from graphopt.codegen.targets import tvm_error_summary
from graphopt.ir import ops
from graphopt.ir.errors import CodegenError

# Each module adds `CONVERTERS: dict[str, Callable]`, imported here explicitly (no registration
# by import side effect): graphopt.codegen.int8_import (QLinearConv, QLinearMatMul, ConvInteger,
# MatMulInteger), graphopt.codegen.recurrent (LSTM, GRU, RNN) and graphopt.codegen.winograd
# (graphopt's own ops, ops.DOMAIN).
CONVERTERS: Mapping[str, Callable] = {**int8_import.CONVERTERS, **recurrent.CONVERTERS, **winograd.CONVERTERS}
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
    graphopt's converters added, on the model with its shape computations folded for
    `shape_dict` (`shape_fold`). A node that fails to convert raises CodegenError naming it."""
    from tvm.relax.frontend.onnx import onnx_frontend

    model = shape_fold.prepare(_inline_functions(model), shape_dict)

    class Importer(onnx_frontend.ONNXGraphImporter):
        current: onnx.NodeProto | None = None

        def _check_for_unsupported_ops(self, graph):
            # The frontend's check reads only the nodes: hand it the ones it converts, without
            # copying the graph's weights.
            theirs = onnx.GraphProto()
            theirs.node.extend(n for n in graph.node if n.op_type not in CONVERTERS or foreign(n))
            super()._check_for_unsupported_ops(theirs)

        def _parse_value_proto(self, value_proto):
            # The frontend names each node by this call just before converting it (and the
            # graph outputs after the last): the node an error is about.
            self.current = value_proto if isinstance(value_proto, onnx.NodeProto) else None
            return super()._parse_value_proto(value_proto)

        def _convert_operator(self, op_name, inputs, attrs, opset):
            if op_name not in CONVERTERS:
                return super()._convert_operator(op_name, inputs, attrs, opset)
            return self.bb.normalize(CONVERTERS[op_name](self.bb, inputs, attrs))

    importer = Importer(shape_dict, "float32", keep_params_in_input=False, sanitize=True)
    try:
        # The frontend prints its own note on stdout before re-raising; the error says it all.
        with contextlib.redirect_stdout(io.StringIO()):
            return importer.from_onnx(model.graph, _opset(model))
    except Exception as e:  # noqa: BLE001 - converters raise anything; the node is what matters
        _close_block(importer)
        if importer.current is None:
            raise
        raise CodegenError(node_error(importer.current, e)) from e


# What TVM's converters say when a shape they need is a tensor computed at run time.
_RUN_TIME_SHAPE = ("ShapeExpr", "to be Shape", "statically known", "Dynamic", "dynamic", "must be a constant",
                   "could not be inferred")


def _inline_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Model-local functions (torch exports blocks such as SqueezeExcitation as functions) inlined,
    since TVM's frontend converts only ops; graphopt's own ops stay, for its converters."""
    own = {(ops.DOMAIN, ops.WINOGRAD_CONV)}
    if all((f.domain, f.name) in own for f in model.functions):
        return model
    return onnx.inliner.inline_selected_functions(model, sorted(own), exclude=True)


def node_error(node: onnx.NodeProto, error: BaseException) -> str:
    """One line naming `node`, saying why it did not convert and, where graphopt knows, what helps."""
    reason = str(error) if isinstance(error, CodegenError) else tvm_error_summary(error)
    where = f"node '{node.name or '(unnamed)'}' ({node.op_type})"
    if any(p in reason for p in _RUN_TIME_SHAPE):
        return (f"cannot convert {where}: a shape it reads is computed at run time and could not be "
                f"folded to a constant; graphopt folds shape computations once every input has a static "
                f"shape (give them with --input-shape NAME=D0,D1,...), but not a shape computed from "
                f"tensor values (an input's values, NonZero) (TVM: {reason})")
    return f"cannot convert {where}: {reason}"


def _close_block(importer) -> None:
    """End the binding block the frontend leaves open when a converter raises, so that TVM does
    not warn about it on stderr when the builder is freed."""
    with contextlib.suppress(Exception):
        importer.bb._end_block()


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
