"""graphopt's WinogradConv op (`graphopt.ir.ops`) -> TVM's Winograd convolution F(m x m, 3 x 3).

graphopt's winograd pass (`emit="tvm"`) marks a 3x3 convolution (stride 1, dilation 1, group 1,
constant weights) as graphopt's WinogradConv op with `pads` (ONNX order) and `tile` (m, one
of `ops.WINOGRAD_TILES`). It becomes one kernel computing TOPI's NCHW Winograd stages: the data
transform (`data_pack`), the batched GEMM over the alpha x alpha tile positions (`bgemm`, alpha =
m + 2) and the inverse transform (`inverse`); a bias add and the activations after it fuse into the kernel's
output. The weight transform U = G w G^T is done here, once, in float64 numpy with TOPI's own G,
so that U matches the data and inverse transforms TOPI generates and no kernel runs it per call.

Layout: the kernel reads and writes NCHW, the layout TOPI's precomputed-weight Winograd has (its
NHWC variant recomputes the weight transform in every call). graphopt's CPU pipeline turns plain
convolutions to NHWC; a Winograd kernel between two of them gets a transpose on each side, while
chains of Winograd layers and the elementwise ops between them stay NCHW without any.

MetaSchedule tunes the kernel as one task (data transform, bgemm and inverse transform together,
the inverse with TOPI's Winograd rule; see `_tunable` for the two hints removed), and
`cpu_schedules` gives it a default schedule (`winograd_schedule`), dispatched on the stage tags
(`TAGS`) set here.
"""
from __future__ import annotations

import functools

import numpy as np

from graphopt.codegen.cpu_schedules import KERNEL_TAG
from graphopt.ir import ops
from graphopt.ir.errors import CodegenError

KERNEL = 3
# TOPI's block of each stage -> the tag (KERNEL_TAG) it gets here, which the CPU scheduler dispatches on.
TAGS = {stage: f"winograd_{stage}" for stage in ("data_pack", "bgemm", "inverse")}
# Tile counts are made multiples of this where that costs at most MAX_EXTRA_TILES times the work.
VECTOR_TILES = 16
MAX_EXTRA_TILES = 1.5


def convert(bb, inputs, attrs: dict):
    """The frontend converter for graphopt's WinogradConv: `(bb, inputs, attrs) -> relax.Expr`."""
    import tvm
    from tvm import relax

    data, weight = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    tile = int(attrs.get("tile", 0))
    pads = tuple(int(p) for p in attrs.get("pads", (0, 0, 0, 0)))
    if tile not in ops.WINOGRAD_TILES:
        raise CodegenError(f"{ops.WINOGRAD_CONV}: tile must be one of {ops.WINOGRAD_TILES}, not {tile}")
    if len(pads) != 4:
        raise CodegenError(f"{ops.WINOGRAD_CONV}: pads must be 4 ints (top, left, bottom, right), "
                           f"not {list(pads)}")
    if not isinstance(weight, tvm.ir.GenericConst):
        raise CodegenError(f"{ops.WINOGRAD_CONV}: the weights must be a constant (an initializer)")
    w = weight.value.numpy()
    shape = [int(d) for d in data.ty.shape.values]
    if w.ndim != 4 or w.shape[2:] != (KERNEL, KERNEL) or shape[1] != w.shape[1]:
        raise CodegenError(f"{ops.WINOGRAD_CONV}: weights of shape {list(w.shape)} are not 3x3 over the "
                           f"input's {shape[1]} channels")
    func, out_shape = _kernel(shape, str(data.ty.dtype), w.shape[0], tile, pads)
    kernel = bb.add_func(func, f"winograd_f{tile}x{tile}")
    out = bb.emit(relax.call_tir(kernel, [data, relax.const(weight_transform(w, tile))],
                                 relax.TensorType(out_shape, str(data.ty.dtype))))
    if bias is None:
        return out
    return bb.emit(relax.op.add(out, relax.op.reshape(bias, (1, w.shape[0], 1, 1))))


def _kernel(shape: list[int], dtype: str, filters: int, tile: int, pads: tuple[int, ...]):
    """TOPI's NCHW Winograd kernel taking the input and U: (PrimFunc, output shape)."""
    from tvm import te
    from tvm.topi.nn.conv2d import _conv2d_winograd_nchw_impl

    n, channels, height, width = shape
    out_h, out_w = height + pads[0] + pads[2] - KERNEL + 1, width + pads[1] + pads[3] - KERNEL + 1
    if out_h < 1 or out_w < 1:
        raise CodegenError(f"{ops.WINOGRAD_CONV}: a {height}x{width} input with pads {list(pads)} has no output")
    # TOPI's NCHW kernel pads by `pads` only, yet reads whole tiles: where m does not divide the
    # output it reads past the padded input, and the garbage leaks into the last tile's outputs
    # through the transforms. Padding the bottom and right up to whole tiles (and beyond, see
    # _tile_grid) and cropping the output afterwards keeps every read in bounds.
    tiles_h, tiles_w = _tile_grid(n, -(-out_h // tile), -(-out_w // tile))
    extra_h, extra_w = tiles_h * tile - out_h, tiles_w * tile - out_w
    padding = (pads[0], pads[1], pads[2] + extra_h, pads[3] + extra_w)
    x = te.placeholder(shape, dtype, "x")
    u = te.placeholder((tile + KERNEL - 1, tile + KERNEL - 1, channels, filters), dtype, "u")
    # TOPI's public wrapper fixes m = 4; its implementation takes the tile size.
    y = _conv2d_winograd_nchw_impl(x, u, 1, padding, 1, dtype, tile, pre_computed=True)
    out_shape = (n, filters, out_h, out_w)
    if extra_h or extra_w:
        y = te.compute(out_shape, lambda *i: y(*i), name="winograd_crop")
    # int64 indices, as emit_te makes them: FuseTIR matches buffers against Relax shapes.
    return _tunable(te.create_prim_func([x, u, y], index_dtype_override="int64")), out_shape


CONVERTERS = {ops.WINOGRAD_CONV: convert}


def _tile_grid(batch: int, rows: int, cols: int) -> tuple[int, int]:
    """Tile rows and columns to compute: at least `rows` x `cols`, and more where that makes the
    tile count P a multiple of VECTOR_TILES for at most MAX_EXTRA_TILES more work.

    P is the contiguous axis of every intermediate and the one the kernels vectorize: at 56x56,
    F(4x4) has 14 x 14 = 196 tiles, which 4-lane vectors divide at best; 14 x 16 fill AVX-512's
    16 lanes for 14% more tiles (the extra ones read zeros and are cropped).
    """
    grids = [(r, c) for r in range(rows, rows + VECTOR_TILES) for c in range(cols, cols + VECTOR_TILES)
             if batch * r * c % VECTOR_TILES == 0 and r * c <= MAX_EXTRA_TILES * rows * cols]
    return min(grids, key=lambda g: (g[0] * g[1], g), default=(rows, cols))


def _tunable(func):
    """TOPI's kernel with each stage's block tagged (`TAGS`), and without two hints with which
    MetaSchedule's evolutionary search in TVM 0.27 fails on it ("The block no longer exists in the
    IRModule"); without them it runs:

    - U marked layout-free, which invites the RewriteLayout postprocessor; the layout transform
      it adds would also run on every call, as graphopt's build does not fold it into the
      constant. U is laid out as the bgemm reads it already.
    - `data_pack`'s custom CPU rule; the generic rules tune the data transform instead (the
      inverse transform keeps its rule).

    The tags are block annotations: FuseTIR keeps those when it fuses the bias and activations
    into the kernel, and drops the PrimFunc's attributes.
    """
    from tvm import s_tir

    sch = s_tir.Schedule(func.without_attr("layout_free_buffers"))
    sch.unannotate(sch.get_sblock("data_pack"), "schedule_rule")
    for block, tag in TAGS.items():
        sch.annotate(sch.get_sblock(block), KERNEL_TAG, tag)
    return sch.mod["main"].without_attr("global_symbol")  # bb.add_func names it


def weight_transform(weights: np.ndarray, tile: int) -> np.ndarray:
    """U[eps, nu, ci, co] = (G w[co, ci] G^T)[eps, nu], the layout TOPI's bgemm reads."""
    g = transform_matrices(tile)[2]
    u = np.einsum("ak,ockl,bl->abco", g, weights.astype(np.float64), g)
    return np.ascontiguousarray(u.astype(weights.dtype))


@functools.cache
def transform_matrices(tile: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TOPI's (A, B, G) for F(tile x tile, 3 x 3) as float64 arrays.

    TOPI hands them out only as TE tensors whose bodies select among the constants; each entry is
    read back by simplifying that body at the entry's indices.
    """
    from tvm.topi.nn.winograd_util import winograd_transform_matrices

    return tuple(_values(m) for m in winograd_transform_matrices(tile, KERNEL, "float64"))


def _values(matrix) -> np.ndarray:
    from tvm.sym import Analyzer

    i, j = (axis.var for axis in matrix.op.axis)
    rows, cols = (int(d) for d in matrix.shape)
    values = np.empty((rows, cols))
    for r in range(rows):
        for c in range(cols):
            analyzer = Analyzer()
            analyzer.bind(i, r)
            analyzer.bind(j, c)
            values[r, c] = analyzer.simplify(matrix.op.body[0]).value
    return values
