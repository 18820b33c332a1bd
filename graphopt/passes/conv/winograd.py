"""winograd: 3x3 stride-1 convolutions as Winograd minimal filtering F(m x m, 3 x 3) (Lavin &
Gray 2016), in standard ONNX ops, or marked for graphopt's TVM codegen.

Matches: 2-D Conv, 3x3 float32 constant weight, stride 1, dilation 1, group 1, constant bias or
none, static channels and spatial dims (the batch may be symbolic).
Rewrites: emit="onnx": weight to U = G g G^T, input transform as a fixed-kernel Conv (keeping the
conv's name), MatMul over the alpha^2 points, output transform as a ConvTranspose, crop, bias.
emit="tvm": the conv becomes ir.ops' WinogradConv marker (its body is the plain conv). With
select="measure", per conv the fastest of direct and each variant within its bound (`ctx.latency`,
else onnxruntime); decisions record timings, errors and why. Run it after pruning and quantization.
Refuses: stride, kernel, dilation or group other than above, dynamic channels or spatial dims, a
weight not constant, shared or a graph output, a bias computed at run time, types other than float32.
Guarantees: TOLERANCE(rtol, atol x max(1, max|y|)) of its tile (`BOUNDS`: F(2x2) 1e-4, F(4x4) 3e-4,
F(6x6) 1e-3, 5-10x the worst measured); idempotent, except select="measure" (it times afresh).
Verified by: tests/passes/conv/test_winograd.py against onnxruntime; measured errors and speed in
docs/passes/winograd.md.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.ir import ort
from graphopt.ir.errors import PipelineError, Refused
from graphopt.ir.graph import export, np_dtype, opset, producer
from graphopt.ir.ops import DOMAIN, WINOGRAD_CONV, declare, is_winograd_conv, winograd_attrs, winograd_function
from graphopt.ir.verify import SHAPES_INFERRED, TOPOSORTED
from graphopt.passes.base import (TOLERANCE, Layer, LayerOptions, LayerPass, PassContext, PassInfo, PassResult,
                                  Semantics, option)
from graphopt.passes.conv import winograd_transforms as wt
from graphopt.passes.weights import check_weight
from graphopt.pattern import Rewriter

DIRECT = "direct"
# Error allowed per element: atol x max(1, max |reference|) + rtol x |reference|, 5-10x the worst
# error measured (the digits CNN on N(0, 1) inputs, logits up to 38; docs/passes/winograd.md). atol
# scales with the output's magnitude because Winograd's rounding error does.
BOUNDS: dict[int, Semantics] = {2: TOLERANCE(1e-4, 1e-4, scaled=True), 4: TOLERANCE(3e-4, 3e-4, scaled=True),
                                6: TOLERANCE(1e-3, 1e-3, scaled=True)}
# What `plan` picks for a conv: the tile, and what was measured to choose it (empty when not timed).
Choice = tuple[int, dict]


@dataclass(frozen=True)
class Options(LayerOptions):
    tile: int = option(4, f"m of F(m x m, 3x3), one of {', '.join(map(str, wt.TILES))}")
    select: str = option("all", "'all' (every matched conv with `tile`) or 'measure' (per conv, the fastest of "
                                "direct and each variant within its bound, timed on the target)")
    emit: str = option("onnx", "'onnx' (the rewrite in standard ops) or 'tvm' (mark for graphopt's TVM codegen)")

    def __post_init__(self):
        if self.tile not in wt.TILES:
            raise PipelineError(f"winograd: tile={self.tile} must be one of {', '.join(map(str, wt.TILES))}")
        if self.select not in ("all", "measure"):
            raise PipelineError(f"winograd: select={self.select!r} must be 'all' or 'measure'")
        if self.emit not in ("onnx", "tvm"):
            raise PipelineError(f"winograd: emit={self.emit!r} must be 'onnx' or 'tvm'")


@dataclass(frozen=True)
class Conv3x3:
    """What `examine` binds: the conv's operands and static sizes; pads are (top, left, bottom, right)."""
    x: gs.Tensor
    weight: gs.Constant
    bias: gs.Constant | None
    channels: int
    filters: int
    height: int
    width: int
    pads: tuple[int, int, int, int]

    @property
    def out_hw(self) -> tuple[int, int]:
        top, left, bottom, right = self.pads
        return self.height + top + bottom - 2, self.width + left + right - 2


def examine(node: gs.Node, graph: gs.Graph) -> Conv3x3 | None:
    """Binds the conv, or raises `Refused` with why it cannot be rewritten. Pure."""
    if is_winograd_conv(node) or len(node.inputs) < 2:
        return None  # a marker is a conv this pass already rewrote
    weight = node.inputs[1]
    w_shape = weight.shape
    if w_shape is None or len(w_shape) != 4:
        raise Refused(f"weight '{weight.name}' is not 4-D: only 2-D convolutions are rewritten")
    kernel = tuple(node.attrs.get("kernel_shape", w_shape[2:]))
    if kernel != (3, 3):
        raise Refused(f"kernel is {'x'.join(map(str, kernel))}, not 3x3")
    if tuple(node.attrs.get("strides", (1, 1))) != (1, 1):
        raise Refused(f"stride {list(node.attrs['strides'])} is not 1")
    if tuple(node.attrs.get("dilations", (1, 1))) != (1, 1):
        raise Refused(f"dilation {list(node.attrs['dilations'])} is not 1")
    if node.attrs.get("group", 1) != 1:
        raise Refused(f"group={node.attrs['group']}: grouped and depthwise convs are not rewritten")
    check_weight(graph, weight, "winograd")
    bias = node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
    if bias is not None and not isinstance(bias, gs.Constant):
        raise Refused(f"bias '{bias.name}' is computed at run time")
    x = node.inputs[0]
    shape = x.shape
    if shape is None or len(shape) != 4 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape[1:]):
        raise Refused(f"input '{x.name}' has dynamic channels or spatial dims {shape}")
    for t in (x, weight, bias):
        if t is not None and t.dtype is not None and np_dtype(t.dtype) != np.float32:
            raise Refused(f"'{t.name}' is {np_dtype(t.dtype).name}: only float32 convs are rewritten")
    _, c, h, w = shape
    return Conv3x3(x, weight, bias, int(c), int(w_shape[0]), int(h), int(w), _pads(node))


def _pads(node: gs.Node) -> tuple[int, int, int, int]:
    auto = node.attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto == "VALID":
        return (0, 0, 0, 0)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        return (1, 1, 1, 1)  # a 3x3 kernel at stride 1 pads 2 in all, split evenly either way
    top, left, bottom, right = node.attrs.get("pads", (0, 0, 0, 0))
    if min(top, left, bottom, right) < 0:
        raise Refused(f"negative pads {[top, left, bottom, right]}")
    return (int(top), int(left), int(bottom), int(right))


def rewrite_onnx(rw: Rewriter, node: gs.Node, conv: Conv3x3, tile: int) -> None:
    """Replace `node` by the F(tile x tile, 3x3) subgraph of standard ONNX ops."""
    m, alpha = tile, tile + 2
    a2, c, k = alpha * alpha, conv.channels, conv.filters
    out_h, out_w = conv.out_hw
    th, tw = -(-out_h // m), -(-out_w // m)
    n = conv.x.shape[0]
    batch = n if isinstance(n, (int, np.integer)) else None
    name, out = node.name, node.outputs[0]
    top, left, bottom, right = conv.pads
    rw.remove(node)

    def step(op: str, inputs: list, shape: list | None, attrs: dict | None = None, result: gs.Tensor | None = None):
        result = result if result is not None else rw.variable(f"{name}_wino_{op.lower()}", np.float32, shape)
        rw.add_node(op, inputs, [result], attrs, name=f"{name}_wino_{op.lower()}")
        return result

    def ints(role: str, values: list[int]) -> gs.Constant:
        return rw.constant(f"{name}_wino_{role}", np.array(values, np.int64))

    # The input transform reads each channel as an image of its own, so one fixed kernel serves
    # every channel; it pads as the conv did, plus bottom/right rows and columns of zeros that
    # make the grid of m x m output tiles whole.
    extra_h, extra_w = th * m - out_h, tw * m - out_w
    planes = step("Reshape", [conv.x, ints("planes", [-1, 1, conv.height, conv.width])],
                  [batch and batch * c, 1, conv.height, conv.width])
    kernel = rw.constant(f"{name}_wino_input_transform", wt.input_kernel(m).astype(np.float32))
    v = step("Conv", [planes, kernel], [batch and batch * c, a2, th, tw],
             {"kernel_shape": [alpha, alpha], "strides": [m, m],
              "pads": [top, left, bottom + extra_h, right + extra_w]})
    # The input transform is the one Conv left: it keeps the conv's name (the detached node is
    # dropped on commit), so include/exclude still find the layer on a second run, which refuses it.
    producer(v).name = name
    v = step("Reshape", [v, ints("tiles", [-1, c, a2, th * tw])], [n, c, a2, th * tw])
    v = step("Transpose", [v], [n, a2, c, th * tw], {"perm": [0, 2, 1, 3]})
    u = rw.constant(f"{conv.weight.name}_winograd", wt.weight_transform(conv.weight.values, m).astype(np.float32))
    prod = step("MatMul", [u, v], [n, a2, k, th * tw])
    prod = step("Transpose", [prod], [n, k, a2, th * tw], {"perm": [0, 2, 1, 3]})
    prod = step("Reshape", [prod, ints("points", [-1, a2, th, tw])], [batch and batch * k, a2, th, tw])
    # A^T M A writes each tile's m x m block at stride m without overlap: a ConvTranspose, which
    # also puts the blocks in place (a 6-D Transpose that onnxruntime runs slowly otherwise).
    blocks = rw.constant(f"{name}_wino_output_transform",
                         wt.output_matrix(m).T.reshape(a2, 1, m, m).astype(np.float32))
    y = step("ConvTranspose", [prod, blocks], [batch and batch * k, 1, th * m, tw * m],
             {"kernel_shape": [m, m], "strides": [m, m]})
    cropped = (th * m, tw * m) != (out_h, out_w)
    last = conv.bias is None and not cropped
    y = step("Reshape", [y, ints("image", [-1, k, th * m, tw * m])], [n, k, th * m, tw * m],
             result=out if last else None)
    if cropped:
        y = step("Slice", [y, ints("starts", [0, 0]), ints("ends", [out_h, out_w]), ints("axes", [2, 3])],
                 [n, k, out_h, out_w], result=out if conv.bias is None else None)
    if conv.bias is not None:
        bias = rw.constant(f"{conv.bias.name}_winograd", conv.bias.values.reshape(k, 1, 1))
        step("Add", [y, bias], None, result=out)


def mark(rw: Rewriter, node: gs.Node, conv: Conv3x3, tile: int) -> None:
    """Replace `node` by the WinogradConv marker (graphopt.ir.ops), which graphopt's TVM codegen lowers."""
    inputs, outputs, name = list(node.inputs), list(node.outputs), node.name
    declare(rw.graph, winograd_function(opset(rw.graph)), opset(rw.graph))
    rw.remove(node)
    marker = rw.add_node(WINOGRAD_CONV, inputs, outputs, winograd_attrs(conv.pads, tile), name=name)
    marker.domain = DOMAIN
    marker.name = name  # the marker stands for the conv; the detached conv is dropped on commit


def single_layer(graph: gs.Graph, node: gs.Node, conv: Conv3x3) -> gs.Graph:
    """The conv alone, on a static input (batch 1 where the graph's is symbolic), for timing."""
    n = conv.x.shape[0]
    batch = int(n) if isinstance(n, (int, np.integer)) else 1
    x = gs.Variable("x", np.float32, [batch, conv.channels, conv.height, conv.width])
    y = gs.Variable("y", np.float32, [batch, conv.filters, *conv.out_hw])
    operands = [x, gs.Constant("w", conv.weight.values)]
    if conv.bias is not None:
        operands.append(gs.Constant("b", conv.bias.values))
    direct = gs.Node("Conv", node.name, {"kernel_shape": [3, 3], "pads": list(conv.pads)}, operands, [y])
    return gs.Graph([direct], [x], [y], import_domains=[onnx.helper.make_opsetid("", opset(graph))])


def candidate(layer_graph: gs.Graph, tile: int, emit: str) -> onnx.ModelProto:
    """`layer_graph` with its conv rewritten as F(tile x tile, 3x3), or marked when emit="tvm"."""
    g = layer_graph.copy()
    node = g.nodes[0]
    rw = Rewriter(g)
    (mark if emit == "tvm" else rewrite_onnx)(rw, node, examine(node, g), tile)
    rw.commit()
    return export(g)


def measure(graph: gs.Graph, node: gs.Node, conv: Conv3x3, ctx: PassContext, emit: str) -> tuple[int | None, dict]:
    """(the tile to use, or None for the direct conv; what was measured and why)."""
    layer_graph = single_layer(graph, node, conv)
    direct = export(layer_graph)
    x = layer_graph.inputs[0]
    feeds = {"x": np.random.default_rng(ctx.seed).standard_normal(x.shape).astype(np.float32)}
    reference = ort.run(direct, feeds)["y"]
    timer = ctx.latency or ort.latency_ms
    timings = {DIRECT: timer(direct, feeds)}
    errors, rejected = {}, []
    for tile in wt.TILES:
        label = wt.variant(tile)
        # The error is the ONNX rewrite's: the arithmetic the variant does on any backend.
        rewritten = candidate(layer_graph, tile, "onnx")
        out = ort.run(rewritten, feeds)["y"]
        errors[label] = float(np.max(np.abs(out - reference)))
        why = BOUNDS[tile].violation(reference, out)
        if why:
            rejected.append(f"{label}: {why}")
            continue
        timings[label] = timer(rewritten if emit == "onnx" else candidate(layer_graph, tile, emit), feeds)
    chosen = min(timings, key=timings.get)
    rival = min((k for k in timings if k != chosen), key=timings.get, default=None)
    reason = f"{chosen} is the fastest ({timings[chosen]:.4g} ms"
    reason += f"; next {rival} {timings[rival]:.4g} ms)" if rival else ")"
    reason += f"; rejected {'; '.join(rejected)}" if rejected else ""
    decision = {"chosen": chosen, "timings_ms": {k: round(v, 5) for k, v in timings.items()},
                "max_abs_error": {k: float(f"{v:.3g}") for k, v in errors.items()}, "reason": reason}
    tile = next((t for t in wt.TILES if wt.variant(t) == chosen), None)
    return tile, decision


class Winograd(LayerPass):
    name = "winograd"
    info = PassInfo(BOUNDS[max(wt.TILES)], opset=(11, onnx.defs.onnx_opset_version()),
                    requires=frozenset({TOPOSORTED, SHAPES_INFERRED}))
    Options = Options
    ops = ("Conv",)

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        # The bound depends on the variants this instance may emit; timing decides afresh on each
        # run, so a conv kept direct may be rewritten by the next one.
        bound = BOUNDS[max(wt.TILES)] if o.select == "measure" else BOUNDS[o.tile]
        self.info = replace(type(self).info, semantics=bound, idempotent=o.select == "all",
                            needs_latency=o.select == "measure")

    def candidates(self, graph: gs.Graph) -> list[gs.Node]:
        # A marker stands for the conv it replaced: include/exclude still name it on a second run.
        return super().candidates(graph) + [n for n in graph.nodes if is_winograd_conv(n)]

    examine = staticmethod(examine)

    def plan(self, layers: list[Layer], graph: gs.Graph, ctx: PassContext,
             result: PassResult) -> list[tuple[Layer, Choice]]:
        o = self.options
        result.stats.update({"emit": o.emit, "select": o.select})
        if not self._timed(ctx) and o.select == "measure":
            # onnxruntime runs the marker as the plain conv, so timing it here cannot tell variants apart.
            result.stats["select"] = ("all: no timer for the target to measure with, every conv marked with "
                                      f"tile={o.tile}")
        planned = super().plan(layers, graph, ctx, result)
        result.stats["rewritten"] = len(planned)
        return planned

    def plan_layer(self, layer: Layer, graph: gs.Graph, ctx: PassContext, result: PassResult) -> Choice | None:
        if not self._timed(ctx):
            return self.options.tile, {}
        tile, measured = measure(graph, layer.node, layer.match, ctx, self.options.emit)
        if tile is None:  # the direct conv is the fastest: left as it is, the choice recorded
            result.skip(layer.name, measured["reason"])
            result.decisions[layer.name] = measured
            return None
        return tile, measured

    def rewrite(self, rw: Rewriter, layer: Layer, plan: Choice) -> dict:
        tile, measured = plan
        (mark if self.options.emit == "tvm" else rewrite_onnx)(rw, layer.node, layer.match, tile)
        return {**_cost(layer.match, tile), **measured}

    def _timed(self, ctx: PassContext) -> bool:
        o = self.options
        return o.select == "measure" and (o.emit == "onnx" or ctx.latency is not None)


def _cost(conv: Conv3x3, tile: int) -> dict:
    """Multiplications per image: the direct conv's against the channel products of the tiles."""
    out_h, out_w = conv.out_hw
    tiles = [-(-out_h // tile), -(-out_w // tile)]
    kc = conv.filters * conv.channels
    return {"variant": wt.variant(tile), "tiles": tiles,
            "multiplies": {"direct": kc * 9 * out_h * out_w, "winograd": kc * (tile + 2) ** 2 * tiles[0] * tiles[1]}}
