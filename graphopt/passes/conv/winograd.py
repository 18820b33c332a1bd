"""winograd: 3x3 stride-1 convolutions as Winograd minimal filtering F(m x m, 3 x 3) (Lavin &
Gray 2016), in standard ONNX ops, or marked for graphopt's TVM codegen.

Matches: 2-D Conv with a 3x3 float32 constant weight, stride 1, dilation 1, group 1, a constant
bias or none, static channels and spatial dims (the batch may be symbolic); `include` / `exclude`
pick convs by node name.
Rewrites (emit="onnx"), m = `tile`, alpha = m + 2: the weight becomes U = G g G^T [alpha^2, K, C]
(alpha^2 / 9 times the parameters); Reshape [N*C, 1, H, W] -> Conv with the fixed B^T d B kernel
[alpha^2, 1, alpha, alpha] at stride m, padded as the conv plus bottom/right to whole tiles ->
Reshape, Transpose [N, alpha^2, C, tiles] -> MatMul with U (the channel sums, batched over the
alpha^2 points) -> Transpose, Reshape [N*K, alpha^2, tiles_h, tiles_w] -> ConvTranspose with the
A^T M A kernel [alpha^2, 1, m, m] at stride m -> Reshape to NCHW -> Slice where m does not divide
the output -> Add bias. emit="tvm" replaces the conv by `ai.graphopt::WinogradConv` (same inputs
and outputs; attributes pads and tile), a model-local function whose body is the 3x3 Conv, so the
model stays valid ONNX that onnxruntime runs unchanged and the codegen lowers to Winograd.
select="measure" times the conv alone, direct and as each variant (`ctx.latency`, else onnxruntime
here), and keeps the fastest variant whose error on N(0, 1) inputs is within its bound, or the
direct conv; stats record the timings, errors and why (with emit="tvm" and no `ctx.latency` there
is nothing to time, and every conv is marked with `tile`). In onnxruntime the rewrite is 0.65x to
1.1x as fast as its direct conv (64 and 128 channels, F(4x4)); the TVM lowering is the fast path.
Run it after pruning and quantization: those would take the transform kernels for weights.
Refuses, with the reason in stats: stride != 1, a kernel other than 3x3, dilation != 1, groups,
dynamic channels or spatial dims, a weight that is not a constant, is shared or is a graph output,
a bias computed at run time, and types other than float32.
Guarantees: TOLERANCE(rtol, atol x max(1, max|y|)) per variant (`BOUNDS`; an instance declares its tile's, the class
the loosest): F(2x2) 1e-4, F(4x4) 3e-4, F(6x6) 1e-3, 5-10x the worst error measured. Max abs error
against onnxruntime's direct conv, 64 -> 64 channels, 30x30, N(0, 1) inputs, He-scaled weights
(|y| <= 6.7): F(2x2) 2.9e-6, F(4x4) 1.5e-5, F(6x6) 7.2e-5 (4e-7, 2e-6, 1e-5 of max |y|; the direct
conv itself is 2.8e-6 off float64). Digits CNN logits, test set (|logits| <= 19): 3.8e-6, 9.5e-6,
2.3e-5, accuracy unchanged for every variant; N(0, 1) inputs (|logits| <= 38): 1.8e-5, 3.8e-5,
1.0e-4. Idempotent: no matched conv is left (select="measure" is not: it times afresh).
Verified by: tests/passes/conv/test_winograd.py against onnxruntime.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.ir import ort
from graphopt.ir.errors import PipelineError
from graphopt.ir.graph import export, np_dtype, opset
from graphopt.ir.verify import SHAPES_INFERRED, TOPOSORTED
from graphopt.passes.base import TOLERANCE, Pass, PassContext, PassInfo, PassResult, Semantics
from graphopt.passes.conv import winograd_transforms as wt
from graphopt.passes.weights import weight_refusal
from graphopt.pattern import MatchResult, Rewriter

DOMAIN = "ai.graphopt"
MARKER = "WinogradConv"
DIRECT = "direct"
# Error allowed per element: atol x max(1, max |reference|) + rtol x |reference|, 5-10x the worst
# error measured (the digits CNN on N(0, 1) inputs, logits up to 38; see the docstring). atol scales
# with the output's magnitude because Winograd's rounding error does.
BOUNDS: dict[int, Semantics] = {2: TOLERANCE(1e-4, 1e-4, scaled=True), 4: TOLERANCE(3e-4, 3e-4, scaled=True),
                                6: TOLERANCE(1e-3, 1e-3, scaled=True)}


@dataclass(frozen=True)
class Options:
    """`tile` m of F(m x m, 3x3); `select` "all" (every matched conv with `tile`) or "measure"
    (per conv, the fastest of direct and each variant within its bound); `emit` "onnx" (the
    rewrite) or "tvm" (mark for the TVM codegen); `include` / `exclude` by node name."""
    tile: int = 4
    select: str = "all"
    emit: str = "onnx"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self):
        if self.tile not in wt.TILES:
            raise PipelineError(f"winograd: tile={self.tile} must be one of {', '.join(map(str, wt.TILES))}")
        if self.select not in ("all", "measure"):
            raise PipelineError(f"winograd: select={self.select!r} must be 'all' or 'measure'")
        if self.emit not in ("onnx", "tvm"):
            raise PipelineError(f"winograd: emit={self.emit!r} must be 'onnx' or 'tvm'")


@dataclass(frozen=True)
class Layer:
    """What a match binds: the conv's operands and static sizes; pads are (top, left, bottom, right)."""
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


def examine(graph: gs.Graph, node: gs.Node) -> MatchResult:
    """Binds `layer` (a `Layer`), or says why the conv cannot be rewritten. Pure."""
    if len(node.inputs) < 2:
        return MatchResult.no_match()
    weight = node.inputs[1]
    w_shape = weight.shape
    if w_shape is None or len(w_shape) != 4:
        return MatchResult.fail(f"weight '{weight.name}' is not 4-D: only 2-D convolutions are rewritten")
    kernel = tuple(node.attrs.get("kernel_shape", w_shape[2:]))
    if kernel != (3, 3):
        return MatchResult.fail(f"kernel is {'x'.join(map(str, kernel))}, not 3x3")
    if tuple(node.attrs.get("strides", (1, 1))) != (1, 1):
        return MatchResult.fail(f"stride {list(node.attrs['strides'])} is not 1")
    if tuple(node.attrs.get("dilations", (1, 1))) != (1, 1):
        return MatchResult.fail(f"dilation {list(node.attrs['dilations'])} is not 1")
    if node.attrs.get("group", 1) != 1:
        return MatchResult.fail(f"group={node.attrs['group']}: grouped and depthwise convs are not rewritten")
    why = weight_refusal(graph, weight, "winograd")
    if why:
        return MatchResult.fail(why)
    bias = node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
    if bias is not None and not isinstance(bias, gs.Constant):
        return MatchResult.fail(f"bias '{bias.name}' is computed at run time")
    x = node.inputs[0]
    shape = x.shape
    if shape is None or len(shape) != 4 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape[1:]):
        return MatchResult.fail(f"input '{x.name}' has dynamic channels or spatial dims {shape}")
    for t in (x, weight, bias):
        if t is not None and t.dtype is not None and np_dtype(t.dtype) != np.float32:
            return MatchResult.fail(f"'{t.name}' is {np_dtype(t.dtype).name}: only float32 convs are rewritten")
    pads = _pads(node)
    if isinstance(pads, str):
        return MatchResult.fail(pads)
    _, c, h, w = shape
    return MatchResult.ok(layer=Layer(x, weight, bias, int(c), int(w_shape[0]), int(h), int(w), pads))


def _pads(node: gs.Node) -> tuple[int, int, int, int] | str:
    auto = node.attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto == "VALID":
        return (0, 0, 0, 0)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        return (1, 1, 1, 1)  # a 3x3 kernel at stride 1 pads 2 in all, split evenly either way
    top, left, bottom, right = node.attrs.get("pads", (0, 0, 0, 0))
    if min(top, left, bottom, right) < 0:
        return f"negative pads {[top, left, bottom, right]}"
    return (int(top), int(left), int(bottom), int(right))


def rewrite(rw: Rewriter, node: gs.Node, layer: Layer, tile: int) -> None:
    """Replace `node` by the F(tile x tile, 3x3) subgraph of standard ONNX ops."""
    m, alpha = tile, tile + 2
    a2, c, k = alpha * alpha, layer.channels, layer.filters
    out_h, out_w = layer.out_hw
    th, tw = -(-out_h // m), -(-out_w // m)
    n = layer.x.shape[0]
    batch = n if isinstance(n, (int, np.integer)) else None
    name, out = node.name, node.outputs[0]
    top, left, bottom, right = layer.pads
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
    planes = step("Reshape", [layer.x, ints("planes", [-1, 1, layer.height, layer.width])],
                  [batch and batch * c, 1, layer.height, layer.width])
    kernel = rw.constant(f"{name}_wino_input_transform", wt.input_kernel(m).astype(np.float32))
    v = step("Conv", [planes, kernel], [batch and batch * c, a2, th, tw],
             {"kernel_shape": [alpha, alpha], "strides": [m, m],
              "pads": [top, left, bottom + extra_h, right + extra_w]})
    v = step("Reshape", [v, ints("tiles", [-1, c, a2, th * tw])], [n, c, a2, th * tw])
    v = step("Transpose", [v], [n, a2, c, th * tw], {"perm": [0, 2, 1, 3]})
    u = rw.constant(f"{layer.weight.name}_winograd", wt.weight_transform(layer.weight.values, m).astype(np.float32))
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
    last = layer.bias is None and not cropped
    y = step("Reshape", [y, ints("image", [-1, k, th * m, tw * m])], [n, k, th * m, tw * m],
             result=out if last else None)
    if cropped:
        y = step("Slice", [y, ints("starts", [0, 0]), ints("ends", [out_h, out_w]), ints("axes", [2, 3])],
                 [n, k, out_h, out_w], result=out if layer.bias is None else None)
    if layer.bias is not None:
        bias = rw.constant(f"{layer.bias.name}_winograd", layer.bias.values.reshape(k, 1, 1))
        step("Add", [y, bias], None, result=out)


def mark(rw: Rewriter, node: gs.Node, layer: Layer, tile: int) -> None:
    """Replace `node` by `ai.graphopt::WinogradConv`, the contract graphopt's TVM codegen lowers."""
    inputs, outputs, name = list(node.inputs), list(node.outputs), node.name
    rw.remove(node)
    marker = rw.add_node(MARKER, inputs, outputs, {"pads": list(layer.pads), "tile": tile}, name=name)
    marker.domain = DOMAIN
    marker.name = name  # the marker stands for the conv; the detached conv is dropped on commit


def declare_marker(graph: gs.Graph) -> None:
    """Add the WinogradConv function (a plain 3x3 Conv using `pads` by reference) and its opset."""
    if not any(f.name == MARKER and f.domain == DOMAIN for f in graph.functions):
        x, w, b, y = (gs.Variable(v) for v in ("X", "W", "B", "Y"))
        conv = gs.Node("Conv", "conv", {"kernel_shape": [3, 3], "pads": gs.Node.AttributeRef("pads", List[int])},
                       inputs=[x, w, b], outputs=[y])
        default = onnx.helper.make_opsetid("", opset(graph))
        graph.functions.append(gs.Function(MARKER, DOMAIN, nodes=[conv], inputs=[x, w, b], outputs=[y],
                                           import_domains=[default], attrs={"pads": None, "tile": None}))
    domains = list(graph.import_domains or [onnx.helper.make_opsetid("", opset(graph))])
    if not any(d.domain == DOMAIN for d in domains):
        graph.import_domains = domains + [onnx.helper.make_opsetid(DOMAIN, 1)]


def single_layer(graph: gs.Graph, node: gs.Node, layer: Layer) -> gs.Graph:
    """The conv alone, on a static input (batch 1 where the graph's is symbolic), for timing."""
    n = layer.x.shape[0]
    batch = int(n) if isinstance(n, (int, np.integer)) else 1
    x = gs.Variable("x", np.float32, [batch, layer.channels, layer.height, layer.width])
    y = gs.Variable("y", np.float32, [batch, layer.filters, *layer.out_hw])
    operands = [x, gs.Constant("w", layer.weight.values)]
    if layer.bias is not None:
        operands.append(gs.Constant("b", layer.bias.values))
    conv = gs.Node("Conv", node.name, {"kernel_shape": [3, 3], "pads": list(layer.pads)}, operands, [y])
    return gs.Graph([conv], [x], [y], import_domains=[onnx.helper.make_opsetid("", opset(graph))])


def candidate(layer_graph: gs.Graph, tile: int, emit: str) -> onnx.ModelProto:
    """`layer_graph` with its conv rewritten as F(tile x tile, 3x3), or marked when emit="tvm"."""
    g = layer_graph.copy()
    conv = g.nodes[0]
    layer = examine(g, conv)["layer"]
    rw = Rewriter(g)
    if emit == "tvm":
        declare_marker(g)
        mark(rw, conv, layer, tile)
    else:
        rewrite(rw, conv, layer, tile)
    rw.commit()
    return export(g)


def measure(graph: gs.Graph, node: gs.Node, layer: Layer, ctx: PassContext, emit: str) -> tuple[int | None, dict]:
    """(the tile to use, or None for the direct conv; what was measured and why)."""
    layer_graph = single_layer(graph, node, layer)
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
    stats = {"chosen": chosen, "timings_ms": {k: round(v, 5) for k, v in timings.items()},
             "max_abs_error": {k: float(f"{v:.3g}") for k, v in errors.items()}, "reason": reason}
    tile = next((t for t in wt.TILES if wt.variant(t) == chosen), None)
    return tile, stats


class Winograd(Pass):
    name = "winograd"
    info = PassInfo(BOUNDS[max(wt.TILES)], opset=(11, onnx.defs.onnx_opset_version()),
                    requires=frozenset({TOPOSORTED, SHAPES_INFERRED}))
    Options = Options

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        # The bound depends on the variants this instance may emit; timing decides afresh on each
        # run, so a conv kept direct may be rewritten by the next one.
        bound = BOUNDS[max(wt.TILES)] if o.select == "measure" else BOUNDS[o.tile]
        self.info = replace(type(self).info, semantics=bound, idempotent=o.select == "all")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        o = self.options
        found, refused, skipped = [], [], []
        for node in graph.nodes:
            if node.op != "Conv" or node.domain not in ("", "ai.onnx", None):
                continue
            if (o.include and node.name not in o.include) or node.name in o.exclude:
                skipped.append({"node": node.name, "reason": "excluded by include/exclude"})
                continue
            m = examine(graph, node)
            if m:
                found.append((node, m["layer"]))
            elif m.reason:
                refused.append({"node": node.name, "reason": m.reason})
        stats: dict = {"emit": o.emit, "select": o.select}
        timed = o.select == "measure"
        if timed and o.emit == "tvm" and ctx.latency is None:
            # onnxruntime runs the marker as the plain conv, so timing it here cannot tell variants apart.
            timed = False
            stats["select"] = f"all: no timer for the target to measure with, every conv marked with tile={o.tile}"
        layers: dict[str, dict] = {}
        plan = []
        for node, layer in found:
            tile, measured = measure(graph, node, layer, ctx, o.emit) if timed else (o.tile, {})
            if tile is None:
                skipped.append({"node": node.name, "reason": measured["reason"]})
                layers[node.name] = measured
                continue
            plan.append((node, layer, tile))
            layers[node.name] = {**_cost(layer, tile), **measured}
        if plan:
            rw = Rewriter(graph)
            if o.emit == "tvm":
                declare_marker(graph)
            for node, layer, tile in plan:
                (mark if o.emit == "tvm" else rewrite)(rw, node, layer, tile)
            rw.commit()
        stats.update({"rewritten": len(plan), "layers": layers, "refused": refused, "skipped": skipped})
        named = {n.name for n in graph.nodes} | {n.name for n, _, _ in plan}
        missing = sorted(set(o.include + o.exclude) - named)
        if missing:
            stats["not_found"] = missing
        return PassResult(bool(plan), stats)


def _cost(layer: Layer, tile: int) -> dict:
    """Multiplications per image: the direct conv's against the channel products of the tiles."""
    out_h, out_w = layer.out_hw
    tiles = [-(-out_h // tile), -(-out_w // tile)]
    kc = layer.filters * layer.channels
    return {"variant": wt.variant(tile), "tiles": tiles,
            "multiplies": {"direct": kc * 9 * out_h * out_w, "winograd": kc * (tile + 2) ** 2 * tiles[0] * tiles[1]}}
