"""The default CPU schedule of TOPI's Winograd convolution (graphopt.codegen.winograd), used by
`cpu_schedules.schedule` for the kernels the Winograd converter tagged (`winograd.TAGS`)."""
from __future__ import annotations

import math

from graphopt.codegen import winograd
from graphopt.codegen.cpu_schedules import (Simd, _epilogue, _inline_into_last, _largest_divisor,
                                            _loops_by_iter, _plan, _schedule_reduction, _split_init,
                                            _vectorize_innermost)

# Transformed weights U (bytes) below which the three stages run fused per group of tiles
# (`_fused_bgemm`): each group then reads all of U again, and its parallel loop has only P / (tiles
# per group) iterations. Measured on Zen 5 (1 MiB L2), 2 cores, F(4x4), against the stages run
# one after another: 64 channels at 56x56 (U 0.6 MiB) 0.68 -> 0.61 ms, 128 at 28x28 (2.3 MiB)
# 0.59 -> 0.49 ms; slower at 256 channels, 14x14: 0.41 -> 1.0 ms (U 9 MiB, one group of 16
# tiles), and F(2x2) 0.47 -> 0.56 ms (U 4 MiB).
_WINOGRAD_FUSED_WEIGHT_BYTES = 3 << 20


def schedule_winograd(sch, blocks: list, tagged: dict, simd: Simd) -> bool:
    """TOPI's NCHW Winograd kernel: data transform, batched GEMM, inverse transform, output.

    The tile count P is the contiguous axis of every intermediate: the transforms are
    vectorized along P, each tile's input gathered once (with its padding checks) into a small
    buffer the data transform then reads along the lanes; the batched GEMM is register-blocked
    as `_schedule_reduction` blocks it. With small enough weights (`_WINOGRAD_FUSED_WEIGHT_BYTES`)
    all three stages run per group of tiles (`_fused_bgemm`), else each stage runs in parallel
    over its own tiles, the GEMM with the reduction schedule. The output stage and its fused
    epilogue are vectorized. The transforms' tile loops are not unrolled: unrolled (as
    MetaSchedule's Winograd rules do) they took LLVM 20 s for one F(4x4) kernel and ran slower,
    1.3 ms against 1.0 ms at 64 channels, 56x56. `tagged` maps the stages' tags to their
    blocks; False when it lacks a stage.
    """
    if not all(tag in tagged for tag in winograd.TAGS.values()):
        return False
    data_pack, bgemm, inverse = (tagged[winograd.TAGS[stage]] for stage in ("data_pack", "bgemm", "inverse"))
    for block in blocks:
        if not sch.get(block).reads:  # a transform matrix, computed from constants
            sch.compute_inline(block)
    input_tile = sch.get_producers(data_pack)[0]
    sch.compute_inline(sch.get_producers(input_tile)[0])  # the padding
    sch.transform_layout(input_tile, ("write", 0), lambda ci, p, eps, nu: (eps, nu, ci, p))
    # Vectorized along P, the inverse transform's stores are contiguous in this layout (TOPI's
    # puts P before the 4 x 4 outputs of a tile and made every store a scatter; measured 1.45 ->
    # 1.30 ms at 64 channels, 56x56, F(4x4), one core).
    sch.transform_layout(inverse, ("write", 0), lambda co, p, vh, vw: (co, vh, vw, p))
    weights = math.prod(int(it.dom.extent) for it in sch.get(bgemm).iter_vars) // int(
        sch.get(bgemm).iter_vars[3].dom.extent)  # alpha x alpha x channels x filters
    if 4 * weights < _WINOGRAD_FUSED_WEIGHT_BYTES:
        pack_loop = _fused_bgemm(sch, bgemm, inverse, data_pack, simd)
        if pack_loop is None:
            return False
    else:
        pack_loop = _tiled_transform(sch, data_pack, tiled=(2, 3), simd=simd)
        if not _schedule_reduction(sch, bgemm, simd, fuse_epilogue=False):
            return False
        _tiled_transform(sch, inverse, tiled=(0, 1), simd=simd)
    sch.compute_at(input_tile, pack_loop, preserve_unit_loops=True)
    *tile_loops, lane = _reordered(sch, input_tile, (0, 2, 3, 1))
    for loop in tile_loops:  # 1.9 -> 1.3 ms at 64 channels, 56x56 (the padding checks fold)
        sch.unroll(loop)
    sch.vectorize(lane)
    output = sch.get_consumers(inverse)[0]
    for block in _inline_into_last(sch, [output, *_epilogue(sch, output)]):
        _vectorize_innermost(sch, block, simd)
    return True


def _fused_bgemm(sch, bgemm, inverse, data_pack, simd: Simd):
    """The three stages fused per group of P (the GEMM's register tile's P), in parallel over the
    groups: the group's data transform (all alpha x alpha x channels of it, kept in L2 for the
    GEMM), then per group of output channels the GEMM's register tile at every alpha x alpha
    position and the inverse transform of those results while they are in L1: neither
    intermediate streams through memory whole. Returns the data transform's loop over one
    vector of tiles, where the input gather goes; None without a register plan."""
    plan = _plan(sch.get(bgemm), simd)
    loops = _loops_by_iter(sch, bgemm)
    if plan is None or plan.register is None or loops is None or len(loops) != 5:
        return None
    eps, nu, ci = loops[0], loops[1], loops[4]
    co_0, co_1 = sch.split(loops[plan.register], [None, plan.register_tile])
    p_0, p_1, lane = sch.split(loops[plan.vector], [None, plan.vectors, plan.lanes])
    sch.reorder(p_0, co_0, eps, nu, ci, co_1, p_1, lane)
    accumulators = sch.cache_write(bgemm, 0, "global")  # kept in registers, as in _schedule_reduction
    sch.reverse_compute_at(accumulators, nu)
    sch.reverse_compute_at(inverse, co_0)
    sch.parallel(p_0)
    sch.compute_at(data_pack, p_0, preserve_unit_loops=True)  # one input channel is a unit loop
    d_eps, d_nu, d_ci, d_p, r_a, r_b = sch.get_loops(data_pack)[1:]
    d_outer, d_lane = sch.split(d_p, [None, plan.lanes])
    sch.reorder(d_ci, d_outer, d_eps, d_nu, r_a, r_b, d_lane)
    sch.vectorize(d_lane)
    _split_init(sch, data_pack, r_a, first=3)
    sch.unroll(co_1)
    sch.unroll(p_1)
    sch.vectorize(lane)
    _split_init(sch, bgemm, ci, first=4)
    _vectorize_innermost(sch, accumulators, simd, first=4)
    co, p, *others = sch.get_loops(inverse)[2:]
    p_outer, p_lane = sch.split(p, [None, plan.lanes])
    sch.reorder(co, p_outer, *others, p_lane)
    sch.vectorize(p_lane)
    _split_init(sch, inverse, others[2], first=4)
    return d_outer


def _tiled_transform(sch, block_rv, tiled: tuple[int, int], simd: Simd):
    """Loops (tiled outer, tiled inner / lanes, the other four, lanes), the outer two fused in
    parallel; returns that parallel loop."""
    loops = sch.get_loops(block_rv)
    others = [lp for i, lp in enumerate(loops) if i not in tiled]
    inner = int(sch.get(loops[tiled[1]]).extent)
    outer, lane = sch.split(loops[tiled[1]], [None, _largest_divisor(inner, simd.lanes, power_of_two=True)])
    sch.reorder(loops[tiled[0]], outer, *others, lane)
    tiles = sch.fuse(loops[tiled[0]], outer)
    sch.parallel(tiles)
    sch.vectorize(lane)
    _split_init(sch, block_rv, others[2], first=1)
    return tiles


def _reordered(sch, block_rv, order: tuple[int, ...]) -> list:
    """The block's innermost len(order) loops, reordered."""
    loops = sch.get_loops(block_rv)[-len(order):]
    sch.reorder(*(loops[i] for i in order))
    return [loops[i] for i in order]
