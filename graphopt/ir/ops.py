"""graphopt's own ops: the contract between the passes that emit them, the cost model, codegen and
the tests. Each is an ONNX model-local function in the `ai.graphopt` domain whose body is the
standard computation, so a marked model stays valid ONNX that onnxruntime runs unchanged; codegen
recognises the op and lowers it its own way.

WinogradConv(X, W[, B]) -> Y, attributes `pads` (top, left, bottom, right) and `tile` (m of
F(m x m, 3x3), one of WINOGRAD_TILES): a 3x3, stride-1, ungrouped Conv that the TVM codegen
computes with Winograd kernels, weights transformed offline.
"""
from __future__ import annotations

from typing import List

import onnx
import onnx_graphsurgeon as gs

DOMAIN = "ai.graphopt"
DOMAIN_VERSION = 1
WINOGRAD_CONV = "WinogradConv"
WINOGRAD_TILES = (2, 4, 6)


def is_winograd_conv(node: gs.Node | onnx.NodeProto) -> bool:
    if isinstance(node, onnx.NodeProto):
        return node.op_type == WINOGRAD_CONV and node.domain == DOMAIN
    return node.op == WINOGRAD_CONV and node.domain == DOMAIN


def winograd_attrs(pads: tuple[int, int, int, int], tile: int) -> dict:
    if tile not in WINOGRAD_TILES:
        raise ValueError(f"{WINOGRAD_CONV}: tile must be one of {WINOGRAD_TILES}, not {tile}")
    return {"pads": [int(p) for p in pads], "tile": int(tile)}


def winograd_function(opset: int) -> gs.Function:
    """The function body onnxruntime runs: the plain 3x3 Conv, `pads` passed by reference."""
    x, w, b, y = (gs.Variable(v) for v in ("X", "W", "B", "Y"))
    conv = gs.Node("Conv", "conv", {"kernel_shape": [3, 3], "pads": gs.Node.AttributeRef("pads", List[int])},
                   inputs=[x, w, b], outputs=[y])
    return gs.Function(WINOGRAD_CONV, DOMAIN, nodes=[conv], inputs=[x, w, b], outputs=[y],
                       import_domains=[onnx.helper.make_opsetid("", opset)], attrs={"pads": None, "tile": None})


def declare(graph: gs.Graph, function: gs.Function, opset: int) -> None:
    """Add `function` (once) and the `ai.graphopt` opset import to `graph`."""
    if not any(f.name == function.name and f.domain == function.domain for f in graph.functions):
        graph.functions.append(function)
    domains = list(graph.import_domains or [onnx.helper.make_opsetid("", opset)])
    if not any(d.domain == DOMAIN for d in domains):
        graph.import_domains = domains + [onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION)]
