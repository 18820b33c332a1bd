"""Default schedules for CPU kernels that nothing else scheduled: what untuned x86 and aarch64
libraries run (see `cpu_pipeline` for where they apply).

A reduction kernel (convolution, matmul, pooling) becomes a register-blocked micro-kernel: the
output's contiguous axis in SIMD vectors, a second output axis unrolled so that each vector
loaded from one operand is reused from registers while the other operand is broadcast, the
reduction loops around that block, the fused epilogue (bias, BatchNorm, residual add, ReLU)
applied to each tile while it is in registers, and the tiles spread over the cores. Injective
kernels (padding, transposes, elementwise chains) are vectorized and, when large, parallel.
Kernels graphopt's converters build carry a tag (`KERNEL_TAG`) on their blocks and get the
schedule for that kernel (Winograd's: `winograd_schedule`). Anything else keeps TVM's unscheduled
loops: correct, only slow.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# Vector registers left for the loaded vectors and the broadcast value besides the accumulators.
_SPARE_REGISTERS = 4
# Accumulators of a convolution's register tile, at most. Measured on AVX-512 (Zen 5), one core,
# 1x1 convolutions: 16 -> 96 channels at 112x112 0.52 -> 0.37 ms (2 x 14 -> 2 x 7), 32 -> 192 at
# 28x28 0.108 -> 0.090 ms, 64 -> 256 at 56x56 1.02 -> 0.91 ms; 3x3 convolutions equal. A matmul's
# tile keeps the whole register budget: 128x768x3072 runs 1.2x slower in 3 x 4 than in 3 x 8.
_CONV_ACCUMULATORS = 14
# A convolution with at most this many input channels per group (depthwise, an RGB stem) reads its
# padding through bounds checks instead of a padded copy of its input: the copy costs more than
# the checks, one per few FMAs. Measured on Zen 5, one core: depthwise 3x3 96 channels 112x112
# stride 2 0.45 -> 0.13 ms, 56x56 stride 1 0.097 -> 0.056 ms; 3x3 3 -> 32 channels at 112x112
# 0.30 -> 0.21 ms; with 64 to 512 channels the checks cost up to 4%, so those keep the copy.
_INLINE_PADDING_DEPTH = 8
# Kernels smaller than these run on one core: waking the thread pool costs microseconds.
_PARALLEL_MIN_ELEMENTS = 1 << 14
_PARALLEL_MIN_MACS = 1 << 20
# The block annotation naming a block's kernel and stage, e.g. "winograd_bgemm": set when the
# kernel is built at conversion, it survives fusion, which drops a PrimFunc's attributes.
KERNEL_TAG = "graphopt.kernel"


@dataclass(frozen=True)
class Simd:
    """The vector unit a schedule is shaped for: float32 lanes per register, register count."""

    lanes: int
    registers: int

    @property
    def accumulators(self) -> int:
        return self.registers - _SPARE_REGISTERS


def simd_of(target) -> Simd:
    """The SIMD unit of an LLVM target (a `tvm.target.Target`).

    Read from the features LLVM enables for the target, not from `llvm_get_vector_width`, which
    reports 512 bits for a generic x86-64 target.
    """
    from tvm.target.codegen import target_has_features

    if target_has_features("avx512f", target):
        return Simd(lanes=16, registers=32)
    if target_has_features("avx2", target):
        return Simd(lanes=8, registers=16)
    if target_has_features("neon", target):
        return Simd(lanes=4, registers=32)
    return Simd(lanes=4, registers=16)  # SSE2, the x86-64 baseline


# -- reductions --------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    """How one reduction block is tiled: indices into its block iter vars, and tile sizes."""

    vector: int        # the output's contiguous axis, in SIMD vectors
    lanes: int
    vectors: int       # vectors per tile along `vector`
    register: int | None   # the axis unrolled so that the vector operand is reused from registers
    register_tile: int


def _vars_in(expr) -> set:
    import tvm_ffi
    from tvm import tirx

    found = set()
    tvm_ffi.structural_walk(expr, (tirx.Var, found.add), order="post")
    return found


def _index_vars(region) -> list[set]:
    return [_vars_in(r.min) for r in region.region]


def _largest_divisor(n: int, limit: int, power_of_two: bool = False) -> int:
    """The largest divisor of n that is at most `limit` (a power of two if asked); at least 1."""
    for d in range(min(n, limit), 0, -1):
        if n % d == 0 and (not power_of_two or d & (d - 1) == 0):
            return d
    return 1


def _plan(block, simd: Simd) -> _Plan | None:
    """Choose the vector and register axes of a reduction such as `out[...] += a[...] * b[...]`;
    None when the output's last index is not one spatial axis.

    The vector axis is the one the output's last index uses: stores are contiguous. The operand
    whose last index also uses it is loaded as vectors; the register axis is an output axis that
    operand does not depend on, so one loaded vector feeds a whole row of accumulators while the
    other operand is broadcast.
    """
    iters = list(block.iter_vars)
    spatial = [i for i, it in enumerate(iters) if it.iter_type == it.DataPar]
    extents = [int(it.dom.extent) for it in iters]
    out_index = _index_vars(block.writes[0])
    if not out_index:
        return None
    var_at = {it.var: i for i, it in enumerate(iters)}
    last = [var_at[v] for v in out_index[-1] if v in var_at and var_at[v] in spatial]
    if len(last) != 1:
        return None
    vector = last[0]
    lanes = _largest_divisor(extents[vector], simd.lanes, power_of_two=True)
    streamed = [_index_vars(r) for r in block.reads if not r.source.same_as(block.writes[0].source)]
    # Of the operands loaded as vectors, the one that depends on the fewest axes (a depthwise
    # convolution's weights rather than its input) leaves the most axes to reuse it along.
    vector_loads = [set().union(*idx) for idx in streamed if idx and iters[vector].var in idx[-1]]
    used = min(vector_loads, key=len) if vector_loads else set()
    # The output axis nearest the contiguous one: one tile's broadcast values then lie close together.
    candidates = [var_at[v] for index in reversed(out_index[:-1]) for v in index
                  if v in var_at and var_at[v] in spatial and v not in used and extents[var_at[v]] > 1]
    register = candidates[0] if candidates else None
    window = sum(it.iter_type != it.DataPar for it in iters) > 1  # a convolution's (ry, rx, rc)
    budget = min(simd.accumulators, _CONV_ACCUMULATORS) if window else simd.accumulators
    vectors, tile = _register_block(extents[vector] // lanes,
                                    extents[register] if register is not None else 1, budget)
    return _Plan(vector, lanes, vectors, register, tile)


def _register_block(vectors: int, rows: int, budget: int) -> tuple[int, int]:
    """How many vectors by how many rows one tile holds in accumulators, as exact divisors of the
    extents within the register budget: as many accumulators as possible; then two vectors per
    row, since one leaves a broadcast load per FMA and more re-stream the vector operand (the
    weights, in NHWC) from L2 for fewer rows; then as many rows as possible. Measured on 3x3
    convolutions with 64 and 128 channels: 2x14 runs 1.2-1.3x faster than 4x7 and 1.1x than 1x28."""
    # The accumulators and the v vectors loaded per step must fit in the registers with the
    # broadcast value: more spill accumulators to the stack on every step.
    shapes = [(v, r) for v in range(1, min(vectors, budget) + 1) if vectors % v == 0
              for r in range(1, min(rows, budget // v) + 1) if rows % r == 0
              and v * (r + 1) < budget + _SPARE_REGISTERS]
    return max(shapes, key=lambda s: (s[0] * s[1], -abs(s[0] - 2), s[1]))


def _loops_by_iter(sch, block_rv) -> list | None:
    """The block's loops in the order of its iter vars, when each loop binds exactly one of them
    (the form TOPI's operators lower to); None otherwise."""
    import tvm_ffi

    loops = sch.get_loops(block_rv)
    values = tvm_ffi.get_global_func("s_tir.schedule.GetSBlockRealize")(sch, block_rv).iter_values
    if len(values) != len(loops) or any(not v.same_as(sch.get(lp).loop_var) for v, lp in zip(values, loops)):
        return None
    return list(loops)


def _tile(sch, block_rv, plan: _Plan):
    """Split and reorder the reduction's loops: outer spatial tiles, then the reduction, then
    the register block. Returns (outer tile loops, reduction loops, register loops, lane loop).

    The tiles along the vector axis (output channels, a matmul's columns) are outermost: each
    tile's slice of the weights is then read from memory once and reused from cache for every
    row and pixel, where the other order streams all the weights once per row of the image.
    Measured on ResNet-18's 3x3 512-channel 7x7 convolution, one core: 7.9 -> 3.2 ms."""
    loops = _loops_by_iter(sch, block_rv)
    if loops is None:
        return None
    iters = sch.get(block_rv).iter_vars
    outer, register = [], []
    for i, (loop, it) in enumerate(zip(loops, iters)):
        if it.iter_type != it.DataPar:
            continue
        if i == plan.vector:
            tile, vectors, lane = sch.split(loop, [None, plan.vectors, plan.lanes])
            outer.insert(0, tile)
        elif i == plan.register:
            tile, unrolled = sch.split(loop, [None, plan.register_tile])
            outer.append(tile)
            register.insert(0, unrolled)
        else:
            outer.append(loop)
    reduction = [lp for lp, it in zip(loops, iters) if it.iter_type != it.DataPar]
    sch.reorder(*outer, *reduction, *register, vectors, lane)
    return outer, reduction, [*register, vectors], lane


def _epilogue(sch, block_rv) -> list:
    """The blocks downstream of `block_rv`'s result, in the kernel's order (a topological one).

    A chain (bias, ReLU) or a DAG that branches and joins again: SiLU is x * sigmoid(x), exact
    Gelu x * (1 + erf(x / sqrt 2)) / 2, both reading the biased sum twice."""
    names, frontier = set(), [block_rv]
    while frontier:
        fresh = [c for c in sch.get_consumers(frontier.pop()) if sch.get(c).name_hint not in names]
        names.update(sch.get(c).name_hint for c in fresh)
        frontier.extend(fresh)
    root = sch.get_sblock(sch.mod["main"].body.block.name_hint)
    return [b for b in sch.get_child_blocks(root) if sch.get(b).name_hint in names]


def _elements(sch, block_rv) -> int:
    return math.prod(int(d) for d in sch.get(block_rv).writes[0].source.shape)


def _schedule_reduction(sch, block_rv, simd: Simd, fuse_epilogue: bool = True) -> bool:
    """Tile the reduction and fuse its epilogue into each tile (unless told not to: its
    consumer is another reduction); False if it has no plan.

    The epilogue fused is the part with the reduction's own shape, inlined into its last block.
    What broadcasts beyond it (squeeze-excitation's gate, whose reduction is one value per
    channel and whose multiply spans the image) runs after, as a vectorized parallel loop of its
    own: fused into the tile it would run on one core, once per channel."""
    plan = _plan(sch.get(block_rv), simd)
    if plan is None:
        return False
    parallel = math.prod(int(it.dom.extent) for it in sch.get(block_rv).iter_vars) >= _PARALLEL_MIN_MACS
    downstream = _epilogue(sch, block_rv) if fuse_epilogue else []
    size = _elements(sch, block_rv)
    cut = next((i for i, b in enumerate(downstream) if _elements(sch, b) != size), len(downstream))
    fused, after = downstream[:cut], downstream[cut:]
    tiled = _tile(sch, block_rv, plan)
    if tiled is None:
        return False
    outer, reduction, unrolled, lane = tiled
    tile_loop = sch.fuse(*outer)
    for block in fused[:-1]:
        sch.compute_inline(block)
    # Accumulate the tile in a buffer of its own, which LLVM keeps in registers.
    writer = fused[-1] if fused else sch.cache_write(block_rv, 0, "global")
    sch.reverse_compute_at(writer, tile_loop)
    if parallel:
        sch.parallel(tile_loop)
    for loop in unrolled:
        sch.unroll(loop)
    sch.vectorize(lane)
    # Last: loops cannot be annotated once the update block has lost its init.
    _split_init(sch, block_rv, reduction[0], first=1)
    _vectorize_innermost(sch, writer, simd, first=1)
    for block in _inline_into_last(sch, after) if after else []:
        _vectorize_innermost(sch, block, simd)
    return True


def _split_init(sch, block_rv, loop, first: int) -> None:
    """Move the reduction's zeroing out above `loop`, into a block of its own whose loops from
    `first` on are unrolled but the innermost, which is vectorized: the zeroed tile is a few
    registers' worth."""
    init = sch.decompose_reduction(block_rv, loop)
    *unrolled, lane = sch.get_loops(init)[first:]
    for inner in unrolled:
        sch.unroll(inner)
    sch.vectorize(lane)


# -- injective kernels -------------------------------------------------------------------------
def _vectorize_innermost(sch, block_rv, simd: Simd, first: int = 0) -> None:
    """Fuse the block's loops from `first` on and vectorize them in whole vectors of the
    innermost dimension; parallelize the rest when at the root and large enough."""
    loops = sch.get_loops(block_rv)[first:]
    if not loops:
        return
    inner = int(sch.get(loops[-1]).extent)
    lanes = _largest_divisor(inner, simd.lanes, power_of_two=True)
    total = math.prod(int(sch.get(loop).extent) for loop in loops)
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    if lanes > 1:
        fused, vector = sch.split(fused, [None, lanes])
        sch.vectorize(vector)
    if first == 0 and total >= _PARALLEL_MIN_ELEMENTS:
        sch.parallel(fused)


# Positions along the input's contiguous axis per tile of a transpose: the cache lines (and pages)
# a tile's gathers touch stay in L1 (and the TLB) for the tile's next vectors. Measured on a
# 256x56x56 quantize + NCHW->NHWC transpose: 0.89 ms untiled, 0.21 ms in 8 x 16 tiles.
_TRANSPOSE_TILE = 8


def _schedule_transpose(sch, block_rv, simd: Simd) -> bool:
    """Tile a transposing block (its output's contiguous axis is not its input's) into tiles of
    `_TRANSPOSE_TILE` input-contiguous positions x one vector of output-contiguous ones, the
    vector innermost, the tiles parallel; False when the block is no transpose."""
    block = sch.get(block_rv)
    var_at = {it.var: i for i, it in enumerate(block.iter_vars)}
    out_index = _index_vars(block.writes[0])
    if not out_index or len(out_index[-1]) != 1:
        return False
    out_axis = var_at.get(next(iter(out_index[-1])))
    in_axes = [var_at.get(next(iter(index[-1]))) for index in map(_index_vars, block.reads)
               if len(index) == len(out_index) and len(index[-1]) == 1]
    in_axis = next((a for a in in_axes if a is not None and a != out_axis), None)
    loops = _loops_by_iter(sch, block_rv)
    if out_axis is None or in_axis is None or loops is None:
        return False
    extents = [int(it.dom.extent) for it in block.iter_vars]
    lanes = _largest_divisor(extents[out_axis], simd.lanes, power_of_two=True)
    tile = _largest_divisor(extents[in_axis], _TRANSPOSE_TILE)
    if lanes < 4 or tile < 4:
        return False
    in_outer, in_inner = sch.split(loops[in_axis], [None, tile])
    out_outer, out_inner = sch.split(loops[out_axis], [None, lanes])
    others = [loop for i, loop in enumerate(loops) if i not in (in_axis, out_axis)]
    sch.reorder(*others, in_outer, out_outer, in_inner, out_inner)
    sch.vectorize(out_inner)
    if math.prod(extents) >= _PARALLEL_MIN_ELEMENTS:
        sch.parallel(sch.fuse(*others, in_outer))
    return True


def _reduction_depth(block) -> int:
    """The extent of the innermost reduction axis: a convolution's input channels per group."""
    return int([it for it in block.iter_vars if it.iter_type != it.DataPar][-1].dom.extent)


def _is_copy(block) -> bool:
    import tvm
    from tvm import tirx

    return isinstance(block.body, tirx.BufferStore) and isinstance(block.body.value, tvm.ir.TensorLoad)


def _inline_into_last(sch, blocks: list) -> list:
    """Inline every block that can be into its consumers; the blocks left."""
    from tvm.s_tir.schedule import ScheduleError

    left = []
    for block in blocks[:-1]:
        try:
            sch.compute_inline(block)
        except ScheduleError:
            left.append(block)
    return [*left, blocks[-1]]


# -- one kernel --------------------------------------------------------------------------------
def schedule(func, simd: Simd):
    """A schedule for one unscheduled kernel, or None when it is none of the shapes handled here
    (it then compiles as TVM lowered it)."""
    from tvm import s_tir, tirx
    from tvm.s_tir.schedule import ScheduleError

    root = getattr(func.body, "block", None)
    if root is None:  # not in the block form TVM's operators lower to
        return None
    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock(root.name_hint))
    # TOPI's hand-written kernels (scatter, sort) are opaque blocks of loops that declare no regions,
    # which every schedule here reads: they keep their own loops.
    if not blocks or any(not sch.get(b).writes for b in blocks):
        return None
    if not all(isinstance(it.dom.extent, tirx.IntImm) for b in blocks for it in sch.get(b).iter_vars):
        return None  # tile sizes are chosen for static shapes, which graphopt's libraries have
    tagged = {str(sch.get(b).annotations[KERNEL_TAG]): b for b in blocks
              if KERNEL_TAG in sch.get(b).annotations}
    reducing = [b for b in blocks if any(it.iter_type != it.DataPar for it in sch.get(b).iter_vars)]
    try:
        if tagged:  # only the Winograd converter tags its kernels
            # Imported here: the Winograd schedule builds on this module's reduction schedule.
            from graphopt.codegen import winograd_schedule

            return sch if winograd_schedule.schedule_winograd(sch, blocks, tagged, simd) else None
        if not reducing:
            for block in _inline_into_last(sch, blocks):
                if not _schedule_transpose(sch, block, simd):
                    _vectorize_innermost(sch, block, simd)
            return sch
        if len(reducing) != 1:  # no schedule here handles several reductions in one kernel
            return None
        producers = blocks[:blocks.index(reducing[0])]
        if not _schedule_reduction(sch, reducing[0], simd):
            return None
        inline_padding = _reduction_depth(sch.get(reducing[0])) <= _INLINE_PADDING_DEPTH
        for block in producers:
            if _is_copy(sch.get(block)) or inline_padding:
                sch.compute_inline(block)  # e.g. the padding of an unpadded convolution
            else:
                _vectorize_innermost(sch, block, simd)
        return sch
    except ScheduleError:
        return None
