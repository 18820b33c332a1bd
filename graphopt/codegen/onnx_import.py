"""ONNX -> Relax: TVM's ONNX frontend, plus the operators graphopt converts itself.

TVM 0.27's frontend has no QLinearConv, QLinearMatMul, ConvInteger, MatMulInteger, LSTM, GRU,
RNN or com.microsoft's DynamicQuantizeLSTM (and a DynamicQuantizeLinear that differs from
onnxruntime's on all-zero data), nor the ai.onnx.ml ops (Scaler, Normalizer, Binarizer,
TreeEnsemble*), and knows nothing of graphopt's own ops (`graphopt.ir.ops`, e.g. the
convolutions graphopt's winograd pass marks for TVM). `CONVERTERS` maps those op types to
converters with the frontend's converter signature, `(bb, inputs, attrs) -> relax.Expr`, where
`inputs` holds `relax.Constant` for initializers (weights are bound, not parameters). The
importer is the frontend's own, subclassed only at its two op-dispatch points (and where it
names the node it converts, for errors), so every other op converts exactly as TVM converts it.
Before import, `shape_fold` makes the shape computations of the now static-shaped model
constants, which TVM's converters need, and `decode_codebooks` turns weights stored as a codebook
and indices (graphopt's cluster-weights, ternarize, binarize) back into float initializers: TVM
0.27's frontend cannot read their UINT4 indices, and a constant weight is what its Conv and dense
kernels pre-pack.
graphopt's own ops convert only from their domain (`ops.DOMAIN`): an op of the same name from
another domain is not graphopt's, and is left to TVM, which has no converter for it.
Loop converts in graphopt.codegen.control_flow (`control_flow.OPS`), which needs the importer
itself to convert the body graph, so it is dispatched before `CONVERTERS`.
Shapes only the run knows (NonZero, a Range as long as an input's value) are kept expressible by
`dynamic_shapes`' hooks around every other op, and `dataflow_split` keeps TVM's fusion from
moving a kernel before the dimension it uses is known; static models pass through both unchanged.
"""
from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Mapping

import numpy as np
import onnx
import onnx.inliner
from onnx import numpy_helper

from graphopt.codegen import (dynamic_quant, dynamic_quant_lstm, int8_import, ml_ops, recurrent, shape_fold,
                              winograd)
from graphopt.codegen import control_flow, min_max
from graphopt.codegen import dataflow_split, dynamic_shapes, label_encoder, one_hot
from graphopt.codegen.targets import tvm_error_summary
from graphopt.ir import ops
from graphopt.ir.errors import CodegenError

# Each module adds `CONVERTERS: dict[str, Callable]`, imported here explicitly (no registration
# by import side effect): graphopt.codegen.int8_import (QLinearConv, QLinearMatMul, ConvInteger,
# MatMulInteger), graphopt.codegen.dynamic_quant (DynamicQuantizeLinear, replacing TVM's),
# graphopt.codegen.dynamic_quant_lstm (com.microsoft DynamicQuantizeLSTM),
# graphopt.codegen.recurrent (LSTM, GRU, RNN), graphopt.codegen.ml_ops (ai.onnx.ml
# Scaler, Normalizer, Binarizer, TreeEnsembleClassifier, TreeEnsembleRegressor),
# graphopt.codegen.dynamic_shapes (Reshape, Tile and ConstantOfShape by shapes computed at run
# time, replacing TVM's), graphopt.codegen.one_hot (OneHot, replacing TVM's), graphopt.codegen.label_encoder
# (ai.onnx.ml LabelEncoder on numbers; string lookups run on the host: host_encoders),
# graphopt.codegen.min_max (Clip, Max and Min, replacing TVM's, for channels-last epilogues) and
# graphopt.codegen.winograd (graphopt's own ops, ops.DOMAIN).
CONVERTERS: Mapping[str, Callable] = {**int8_import.CONVERTERS, **recurrent.CONVERTERS, **winograd.CONVERTERS,
                                     **ml_ops.CONVERTERS, **dynamic_quant.CONVERTERS, **dynamic_quant_lstm.CONVERTERS,
                                     **dynamic_shapes.CONVERTERS, **one_hot.CONVERTERS, **label_encoder.CONVERTERS,
                                     **min_max.CONVERTERS}
_OWN_OPS = frozenset(winograd.CONVERTERS)


def known_ops() -> frozenset[str]:
    """Every op type this importer converts (graphopt's own ops only from their domain: `foreign`)."""
    from tvm.relax.frontend.onnx import onnx_frontend

    return frozenset(onnx_frontend._get_convert_map()) | frozenset(CONVERTERS) | control_flow.OPS


def foreign(node: onnx.NodeProto) -> bool:
    """Whether `node` has the type of one of graphopt's own ops from another domain than
    `ops.DOMAIN`: not graphopt's op, and no converter takes it."""
    return node.op_type in _OWN_OPS and node.domain != ops.DOMAIN


def from_onnx(model: onnx.ModelProto, shape_dict: dict[str, list[int]]):
    """`tvm.relax.frontend.onnx.from_onnx(model, shape_dict, keep_params_in_input=False)` with
    graphopt's converters added, on the model with its shape computations folded for
    `shape_dict` (`shape_fold`). A node that fails to convert raises CodegenError naming it."""
    from tvm.relax.frontend.onnx import onnx_frontend

    model = shape_fold.prepare(decode_codebooks(_inline_functions(model)), shape_dict)
    read_by = dynamic_shapes.readers(model.graph)

    class Importer(onnx_frontend.ONNXGraphImporter):
        current: onnx.NodeProto | None = None

        def _check_for_unsupported_ops(self, graph):
            # The frontend's check reads only the nodes: hand it the ones it converts, without
            # copying the graph's weights.
            theirs = onnx.GraphProto()
            theirs.node.extend(n for n in graph.node if (n.op_type not in CONVERTERS or foreign(n))
                               and n.op_type not in control_flow.OPS)
            super()._check_for_unsupported_ops(theirs)

        def _parse_value_proto(self, value_proto):
            # The frontend names each node by this call just before converting it (and the
            # graph outputs after the last): the node an error is about.
            self.current = value_proto if isinstance(value_proto, onnx.NodeProto) else None
            return super()._parse_value_proto(value_proto)

        def _convert_operator(self, op_name, inputs, attrs, opset):
            if op_name in control_flow.OPS:
                return control_flow.convert(self, op_name, inputs, attrs)
            # Shapes only the run knows stay expressible around every op (dynamic_shapes).
            inputs = dynamic_shapes.broadcast_operands(self.bb, op_name, inputs)
            if op_name not in CONVERTERS:
                out = super()._convert_operator(op_name, inputs, attrs, opset)
            else:
                out = self.bb.normalize(CONVERTERS[op_name](self.bb, inputs, attrs))
            outputs = self.current.output if self.current is not None else ()
            return dynamic_shapes.settle(self.bb, out, {t for o in outputs for t in read_by.get(o, ())})

    importer = Importer(shape_dict, "float32", keep_params_in_input=False, sanitize=True)
    try:
        # The frontend prints its own note on stdout before re-raising; the error says it all.
        with contextlib.redirect_stdout(io.StringIO()):
            return dataflow_split.separate(importer.from_onnx(model.graph, _opset(model)))
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


def decode_codebooks(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with each Cast(indices) -> Gather(codebook, .) [-> Mul(., scale)] of initializers
    (graphopt.passes.quant.codebook's form) replaced by the float initializer it computes, and the
    initializers only those chains read removed. Exact: a gather copies, and numpy's float32
    multiply is the one the runtime does. `model` itself when there is none, else one copy."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    made = {n.output[0]: n for n in graph.node if n.output}
    chains = []
    for gather in graph.node:
        cast = made.get(gather.input[1]) if gather.op_type == "Gather" and len(gather.input) == 2 else None
        if cast is None or cast.op_type != "Cast" or cast.input[0] not in inits or gather.input[0] not in inits \
                or len(readers.get(cast.output[0], [])) != 1:
            continue
        nodes = [cast, gather]
        scale = readers.get(gather.output[0], [])
        if len(scale) == 1 and scale[0].op_type == "Mul" and scale[0].input[0] == gather.output[0] \
                and scale[0].input[1] in inits:
            nodes.append(scale[0])
        chains.append(nodes)
    if not chains:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph, inputs = out.graph, set()
    for cast, gather, *mul in chains:
        axis = next((a.i for a in gather.attribute if a.name == "axis"), 0)
        w = np.take(numpy_helper.to_array(inits[gather.input[0]]),
                    numpy_helper.to_array(inits[cast.input[0]]).astype(np.int64), axis=axis)
        if mul:
            w = w * numpy_helper.to_array(inits[mul[0].input[1]])
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), (mul[0] if mul else gather).output[0]))
        inputs |= {cast.input[0], gather.input[0], *(m.input[1] for m in mul)}
    kept = [n for n in graph.node if not _is_in(n, chains)]
    del graph.node[:]
    graph.node.extend(kept)
    # A subgraph may read an outer initializer by name: with one, every initializer stays.
    if not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in kept for a in n.attribute):
        read = {name for n in kept for name in n.input} | {o.name for o in graph.output}
        unused = [i for i in graph.initializer if i.name in inputs and i.name not in read]
        for i in unused:
            graph.initializer.remove(i)
    return out


def _is_in(node: onnx.NodeProto, chains: list[list[onnx.NodeProto]]) -> bool:
    return any(node.output[:1] == c.output[:1] for chain in chains for c in chain)


def node_error(node: onnx.NodeProto, error: BaseException) -> str:
    """One line naming `node`, saying why it did not convert and, where graphopt knows, what helps."""
    reason = str(error) if isinstance(error, CodegenError) else tvm_error_summary(error)
    where = f"node '{node.name or '(unnamed)'}' ({node.op_type})"
    # graphopt's own converters say exactly what is wrong; the hint is for TVM's words.
    if not isinstance(error, CodegenError) and any(p in reason for p in _RUN_TIME_SHAPE):
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
