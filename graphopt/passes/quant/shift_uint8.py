"""int8 activations of a lowered graph -> uint8, exactly: every value + 128, every zero point + 128.

Used by lower-int8 (activations="uint8"). An int8 activation q with zero point z stands for
s * (q - z); the uint8 q + 128 with zero point z + 128 stands for the same. So:
  QuantizeLinear, QLinearConv, QLinearMatMul  writing it: y zero point z + 128 (uint8); the
      saturation to [-128, 127] becomes saturation to [0, 255], shifted by the same 128;
  DequantizeLinear, QLinearConv, QLinearMatMul, ConvInteger, MatMulInteger  reading it: input
      zero point z + 128 (the integer sums of q - z are the same);
  Max, Concat: their constant inputs + 128 (max commutes with adding 128);
  MaxPool, Flatten, Reshape, Concat: otherwise unchanged (they move or compare values, which the
      shift keeps).
Tensors joined by an op whose inputs and output share one type (the last two rows, and a QLinear
op's input and output) are shifted together or not at all. A group is kept int8, with the reason,
when one of its tensors is a graph input or output or is written or read by another op, or a zero
point is computed at run time. Nothing changes in a graph where no integer op (anything but
QuantizeLinear and DequantizeLinear) reads or writes an int8 activation: a QDQ model stays QDQ.
Weights are not activations: they stay int8 (u8 x s8 is the form x86 VNNI and onnxruntime run fast).
`u8s8_inexact()` says whether this host's onnxruntime computes u8 x s8 exactly: where its kernels
add pairs of products in 16 bits with saturation (measured: onnxruntime 1.32 on an AMD EPYC Zen 5,
QLinearConv off by up to 31 on random operands), lower-int8's activations="auto" keeps int8.
"""
from __future__ import annotations

import functools

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from graphopt.ir import ort
from graphopt.ir.graph import is_graph_input, is_graph_output, producer
from graphopt.passes.base import Refusal, Refused
from graphopt.pattern import Rewriter

SHIFT = 128
# op -> input slots that may hold an activation, and the slot of its zero point (None: no zero point).
READS: dict[str, tuple[tuple[int, int | None], ...] | None] = {
    "DequantizeLinear": ((0, 2),), "QLinearConv": ((0, 2),), "QLinearMatMul": ((0, 2),),
    "ConvInteger": ((0, 2),), "MatMulInteger": ((0, 2),),
    "MaxPool": ((0, None),), "Flatten": ((0, None),), "Reshape": ((0, None),),
    "Concat": None, "Max": None,  # None: every input
}
# op -> the zero point slot that sets its output's type, or None when the output takes its inputs' type.
WRITES: dict[str, int | None] = {"QuantizeLinear": 2, "QLinearConv": 7, "QLinearMatMul": 7,
                                 "MaxPool": None, "Flatten": None, "Reshape": None, "Concat": None, "Max": None}
JOINED = ("MaxPool", "Flatten", "Reshape", "Concat", "Max", "QLinearConv", "QLinearMatMul")
QDQ = ("QuantizeLinear", "DequantizeLinear")


def _is_int8(t: gs.Tensor | None) -> bool:
    return t is not None and not t.is_empty() and t.dtype is not None and np.dtype(t.dtype) == np.int8


def _zero_point(node: gs.Node, slot: int) -> gs.Tensor | None:
    return node.inputs[slot] if len(node.inputs) > slot and not node.inputs[slot].is_empty() else None


def int8_activations(graph: gs.Graph) -> set[str]:
    """Names of the activation tensors that are int8: graph inputs so typed and outputs of the ops
    in WRITES, by their zero point's type or, for the type-preserving ops, their first input's."""
    found = {t.name for t in graph.inputs if _is_int8(t)}
    for node in graph.nodes:  # topological order
        if node.op not in WRITES or not node.outputs:
            continue
        slot = WRITES[node.op]
        if slot is None:
            first = node.inputs[0]
            int8 = first.name in found or (isinstance(first, gs.Constant) and _is_int8(first))
        else:
            int8 = _is_int8(_zero_point(node, slot)) or node.attrs.get("output_dtype") == TensorProto.INT8
        if int8:
            found.add(node.outputs[0].name)
    return found


def _joined(node: gs.Node) -> list[gs.Variable]:
    """The tensors `node` requires to have one type: its activation inputs and its output."""
    data = node.inputs[:1] if node.op in ("QLinearConv", "QLinearMatMul", "MaxPool", "Flatten", "Reshape") \
        else node.inputs
    return [t for t in [*data, node.outputs[0]] if isinstance(t, gs.Variable) and not t.is_empty()]


def groups(graph: gs.Graph, int8: set[str]) -> list[list[gs.Variable]]:
    """The int8 activation tensors and the tensors the ops tie their types to, in groups."""
    seen: set[str] = set()
    result = []
    for seed in graph.tensors().values():
        if seed.name not in int8 or seed.name in seen or not isinstance(seed, gs.Variable):
            continue
        group, work = [], [seed]
        seen.add(seed.name)
        while work:
            t = work.pop()
            group.append(t)
            for node in [producer(t), *t.outputs]:
                if node is None or node.op not in JOINED or not node.outputs:
                    continue
                for u in _joined(node):
                    if u.name not in seen:
                        seen.add(u.name)
                        work.append(u)
        result.append(group)
    return result


def check_shiftable(graph: gs.Graph, group: list[gs.Variable], int8: set[str]) -> None:
    """Raises `Refused` when `group` cannot be shifted."""
    for t in group:
        if is_graph_input(graph, t) or is_graph_output(graph, t):
            kind = "input" if is_graph_input(graph, t) else "output"
            raise Refused(f"'{t.name}' is a graph {kind}; its type is kept")
        if t.name not in int8:
            raise Refused(f"'{t.name}' is not int8 but shares its type with int8 tensors")
        node = producer(t)
        if node is None or node.op not in WRITES or node.outputs[0] is not t:
            raise Refused(f"'{t.name}' is written by {node.op if node else 'no node'}, which the shift does not know")
        zero_points = [(node, WRITES[node.op])]
        for reader in t.outputs:
            slots = READS.get(reader.op, ())
            allowed = range(len(reader.inputs)) if slots is None else [i for i, _ in slots]
            if reader.op not in READS or any(x is t and i not in allowed for i, x in enumerate(reader.inputs)):
                raise Refused(f"'{t.name}' is read by {reader.op} '{reader.name}', which the shift does not know")
            zero_points += [(reader, z) for i, z in slots or () if reader.inputs[i] is t]
        for n, slot in zero_points:
            if slot is not None and not isinstance(_zero_point(n, slot), (gs.Constant, type(None))):
                raise Refused(f"the zero point of {n.op} '{n.name}' is computed at run time")


def _integer(group: list[gs.Variable]) -> bool:
    """Whether an integer op (one the shift knows, not QuantizeLinear or DequantizeLinear) reads or
    writes the group."""
    return any(n is not None and n.op in JOINED + ("ConvInteger", "MatMulInteger")
               for t in group for n in [producer(t), *t.outputs])


def _shifted(values: np.ndarray) -> np.ndarray:
    return (np.asarray(values).astype(np.int16) + SHIFT).astype(np.uint8)


def _shift_constant(rw: Rewriter, node: gs.Node, slot: int) -> None:
    """A new uint8 constant for input `slot` (absent: a zero point of 0 in the int8 data's type).
    New rather than changed in place: another node may read the old one, whose type is kept."""
    zp = _zero_point(node, slot)
    values = _shifted(np.int8(0) if zp is None else zp.values)
    rw.set_input(node, slot, rw.constant(f"{zp.name if zp is not None else node.name}_uint8", values))


def shift(rw: Rewriter, group: list[gs.Variable]) -> None:
    names = {t.name for t in group}
    edited: set[int] = set()
    for t in group:
        for node in [producer(t), *t.outputs]:
            if id(node) in edited:
                continue
            edited.add(id(node))
            if node.op in ("Max", "Concat"):  # a constant operand holds activation values too
                for i, x in enumerate(node.inputs):
                    if isinstance(x, gs.Constant):
                        _shift_constant(rw, node, i)
                continue
            if node.op in WRITES and WRITES[node.op] is not None and node.outputs[0].name in names:
                _shift_constant(rw, node, WRITES[node.op])
                if "output_dtype" in node.attrs:
                    rw.set_attr(node, "output_dtype", TensorProto.UINT8)
            for slot, zslot in READS.get(node.op) or ():
                if zslot is not None and node.inputs[slot].name in names:
                    _shift_constant(rw, node, zslot)
    for t in group:
        t.dtype = np.uint8


def to_uint8(graph: gs.Graph) -> tuple[int, list[Refusal]]:
    """Shift every int8 activation group, if an integer op reads or writes one. Returns (tensors
    shifted, refusals against each kept group's first tensor)."""
    rw, shifted, refused = Rewriter(graph), 0, []
    int8 = int8_activations(graph)
    found = groups(graph, int8)
    if not any(_integer(g) for g in found):
        return 0, []
    for group in found:
        try:
            check_shiftable(graph, group, int8)
        except Refused as e:
            refused.append(Refusal(group[0].name, e.reason, "uint8-activations"))
            continue
        shift(rw, group)
        shifted += len(group)
    if shifted:
        rw.commit()
    return shifted, refused


@functools.cache
def u8s8_inexact() -> str | None:
    """Why onnxruntime on this host does not compute u8 x s8 exactly, or None when it does: a
    MatMulInteger and a QLinearConv whose every product is 255 x 127, where 16-bit pair sums
    (x86 pmaddubsw without VNNI's 32-bit accumulation) saturate, against the exact sums."""
    from onnx import TensorProto, helper, numpy_helper

    k = 64
    x = np.full((1, k), 255, np.uint8)
    w = np.full((k, 1), 127, np.int8)
    exact = 255 * 127 * k
    matmul = helper.make_model(helper.make_graph(
        [helper.make_node("MatMulInteger", ["x", "w"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 1])], [numpy_helper.from_array(w, "w")]),
        opset_imports=[helper.make_opsetid("", 13)])
    got = int(ort.run(matmul, {"x": x})["y"][0, 0])
    if got != exact:
        return f"onnxruntime's MatMulInteger u8 x s8 gives {got}, not {exact} (16-bit saturation on this CPU)"
    # QLinearConv: y = x * w * (sx * sw / sy) = 255 * 127 * k * 1/(255 * 127 * k) * 100 = 100 exactly.
    conv = helper.make_model(helper.make_graph(
        [helper.make_node("QLinearConv", ["x", "sx", "zx", "w", "sw", "zw", "sy", "zy"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, k, 1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 1, 1, 1])],
        [numpy_helper.from_array(np.array(1.0, np.float32), "sx"), numpy_helper.from_array(np.array(0, np.uint8), "zx"),
         numpy_helper.from_array(w.reshape(1, k, 1, 1), "w"), numpy_helper.from_array(np.array(1.0, np.float32), "sw"),
         numpy_helper.from_array(np.array(0, np.int8), "zw"),
         numpy_helper.from_array(np.array(exact / 100.0, np.float32), "sy"),
         numpy_helper.from_array(np.array(0, np.uint8), "zy")]), opset_imports=[helper.make_opsetid("", 13)])
    got = int(ort.run(conv, {"x": x.reshape(1, k, 1, 1)})["y"].ravel()[0])
    if got != 100:
        return f"onnxruntime's QLinearConv u8 x s8 gives {got}, not 100 (16-bit saturation on this CPU)"
    return None
