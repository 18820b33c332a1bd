"""Packed int8 convolution and matmul kernels on Intel AMX tiles (Sapphire Rapids and later).

The same computation and interface as `int8_kernels.conv_kernel` (NHWC uint8 data, weights packed
by `pack_weights`, an int32 bias with the data's zero point folded in, the same requantization
epilogue), with the reduction done by AMX's `tdpbusd`: C[M, N] += A[M, K] (uint8) x B[K, N] (int8),
in tiles of at most 16 rows x 64 bytes held in eight tile registers.

- A tile: `rows` output pixels (consecutive along W, so one row stride apart in the padded
  input) x `chunk` input channels of one kernel tap (rh, rw): `chunk` contiguous bytes per pixel.
- B tile: the weights of one tap, `chunk / 4` rows of 16 output channels x 4 input channels,
  exactly the layout of `int8_kernels.pack_weights` ([OC/16, KH, KW, IC/4, 16, 4]) with input
  channels padded to a multiple of `chunk` (zeros), so one B tile is `chunk / 4` rows 64 bytes apart.
- C tile: `rows` pixels x 16 int32 output channels, kept in a tile over the whole reduction
  (taps x channel chunks), then stored to a 1 KiB buffer and requantized on its way out.

A step loads P A tiles and Q B tiles and runs P x Q `tdpbusd` (P, Q in {1, 2}: at most 2 x 2 C
+ 2 A + 2 B = 8 tiles). The output width is computed in whole tiles (pixels past it read the
zero-point padding and are dropped); output channels in blocks of 16 (zero weights past OC, as
the VNNI kernel). The 64-byte tile configuration is loaded at the start of each parallel task
(tile state is per thread) and released at its end.

The tile instructions are emitted through `TileOps`: `INTRINSICS` calls LLVM's AMX intrinsics
with immediate tile numbers (`llvm.x86.ldtilecfg`, `tilezero`, `tileloadd64`, `tdpbusd`,
`tilestored64`, `tilerelease`), which LLVM 22 inside TVM 0.27 accepts and lowers to the
instructions one for one. Tests substitute plain TIR with AMX's documented semantics, so that the
loop nest, offsets, strides and the tile configuration run on CPUs without AMX.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from graphopt.codegen import int8_kernels
from graphopt.codegen.int8_kernels import OPAQUE, INSTRUCTION, SCHEDULED, ConvShape, DotInstruction, Requant

if TYPE_CHECKING:
    import tvm

MAX_ROWS = 16      # rows of a tile
MAX_BYTES = 64     # bytes of a tile row
LANES = 16         # int32 columns of a C tile; also the VNNI kernel's output block


class TileOps(Protocol):
    """Emits one AMX instruction into the TIR being built (under a `tvm.script.ir_builder`).

    Offsets are in elements of `buffer`, strides in bytes."""

    def configure(self, config) -> None: ...
    def zero(self, tile: int) -> None: ...
    def load(self, tile: int, buffer, offset, stride: int) -> None: ...
    def dot(self, c: int, a: int, b: int) -> None: ...
    def store(self, tile: int, buffer, offset, stride: int) -> None: ...
    def release(self) -> None: ...


class Intrinsics:
    """The AMX instructions, as LLVM intrinsics with immediate tile numbers."""

    def configure(self, config) -> None:
        _call("llvm.x86.ldtilecfg", config.access_ptr("r"))

    def zero(self, tile: int) -> None:
        from tvm.script.ir_builder import tirx as T

        _call("llvm.x86.tilezero", T.int8(tile))

    def load(self, tile: int, buffer, offset, stride: int) -> None:
        from tvm.script.ir_builder import tirx as T

        _call("llvm.x86.tileloadd64", T.int8(tile), buffer.access_ptr("r", offset=offset), T.int64(stride))

    def dot(self, c: int, a: int, b: int) -> None:
        from tvm.script.ir_builder import tirx as T

        # tdpbusd dst, src1, src2: unsigned bytes of src1 times signed bytes of src2.
        _call("llvm.x86.tdpbusd", T.int8(c), T.int8(a), T.int8(b))

    def store(self, tile: int, buffer, offset, stride: int) -> None:
        from tvm.script.ir_builder import tirx as T

        _call("llvm.x86.tilestored64", T.int8(tile), buffer.access_ptr("w", offset=offset), T.int64(stride))

    def release(self) -> None:
        _call("llvm.x86.tilerelease")


def _call(name: str, *args) -> None:
    from tvm.script.ir_builder import tirx as T

    T.evaluate(T.call_llvm_intrin("void", name, *args))


INTRINSICS = Intrinsics()


@dataclass(frozen=True)
class Plan:
    """How one convolution maps onto tiles; every field is a compile-time constant. Tile
    registers (immediates in the instructions): C tiles 0-3, A tiles 4-5, B tiles 6-7."""

    shape: ConvShape
    chunk: int           # K bytes per tdpbusd: input channels of one tap, a multiple of 4, <= 64
    channels: int        # input channels padded to a multiple of `chunk`
    rows: int            # output pixels per A and C tile, <= 16
    pixel_tiles: int     # P: A tiles per step
    channel_tiles: int   # Q: B tiles per step
    out_w: int           # output width computed: whole tiles, >= the real one
    padded_h: int        # the packed input's height and width
    padded_w: int

    @property
    def blocks(self) -> int:
        """Output channel blocks of LANES."""
        return -(-self.shape.oc // LANES)

    def c_tile(self, p: int, q: int) -> int:
        return p * self.channel_tiles + q

    def a_tile(self, p: int) -> int:
        return 4 + p

    def b_tile(self, q: int) -> int:
        return 6 + q

    def config(self) -> bytes:
        """LDTILECFG's 64 bytes: palette 1 at byte 0, start row 0, each tile's bytes per row as a
        little-endian uint16 at 16 + 2i and its rows at 48 + i; unused tiles and reserved bytes 0."""
        config = bytearray(64)
        config[0] = 1

        def put(tile: int, rows: int, colsb: int) -> None:
            config[16 + 2 * tile:18 + 2 * tile] = colsb.to_bytes(2, "little")
            config[48 + tile] = rows

        for p in range(self.pixel_tiles):
            put(self.a_tile(p), self.rows, self.chunk)
            for q in range(self.channel_tiles):
                put(self.c_tile(p, q), self.rows, LANES * 4)
        for q in range(self.channel_tiles):
            put(self.b_tile(q), self.chunk // 4, LANES * 4)
        return bytes(config)


def plan(shape: ConvShape) -> Plan:
    """The tiling of `shape`: K chunks as even as 64-byte rows allow, W tiles as even as 16 rows
    allow (padding at most a few pixels and channels), 2 x 2 C tiles where the counts are even."""
    chunk, channels = _chunking(shape.c)
    oh, ow = shape.out_hw
    w_tiles = -(-ow // MAX_ROWS)
    rows = -(-ow // w_tiles)
    out_w = w_tiles * rows
    top, left = shape.pads[0], shape.pads[1]
    padded_h = max(shape.h + top, (oh - 1) * shape.strides[0] + (shape.kh - 1) * shape.dilations[0] + 1)
    padded_w = max(shape.w + left, (out_w - 1) * shape.strides[1] + (shape.kw - 1) * shape.dilations[1] + 1)
    blocks = -(-shape.oc // LANES)
    return Plan(shape, chunk, channels, rows, 2 if w_tiles % 2 == 0 else 1, 2 if blocks % 2 == 0 else 1,
                out_w, padded_h, padded_w)


def _chunking(channels: int) -> tuple[int, int]:
    """(chunk, padded channels): the fewest chunks of at most 64 bytes, as even as multiples of 4 allow."""
    quads = -(-channels // 4)
    chunks = -(-quads // (MAX_BYTES // 4))
    chunk = -(-quads // chunks) * 4
    return chunk, chunks * chunk


def pack_weights(w: np.ndarray, inst: DotInstruction) -> np.ndarray:
    """OIHW int8 weights as `int8_kernels.pack_weights` lays them out for `inst` (VNNI's: 16 lanes),
    input channels zero-padded to the plan's `channels` so each tap's B tiles are whole."""
    _check(inst)
    oc, ic, kh, kw = w.shape
    _, channels = _chunking(ic)
    padded = np.zeros((oc, channels, kh, kw), np.int8)
    padded[:, :ic] = w
    return int8_kernels.pack_weights(padded, inst)


def _check(inst: DotInstruction) -> None:
    if inst.lanes != LANES or inst.data_dtype != "uint8":
        raise ValueError(f"AMX kernels take VNNI's operands (uint8 data, {LANES} lanes), not {inst.name}'s")


def conv_kernel(shape: ConvShape, data_dtype: str, zero_point: int, inst: DotInstruction,
                requant: Requant | None, tiles: TileOps | None = None) -> tvm.tirx.PrimFunc:
    """The PrimFunc (x, packed w, bias[OCp] int32, [scale[OCp] float32], out), as
    `int8_kernels.conv_kernel`'s; `tiles` emits the AMX instructions (`INTRINSICS` by default)."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    _check(inst)
    tiles = INTRINSICS if tiles is None else tiles
    layout = plan(shape)
    oh, ow = shape.out_hw
    ocp = layout.blocks * LANES
    with IRBuilder() as builder, T.prim_func():
        T.func_attr({"tirx.noalias": True})
        x = T.arg("x", T.buffer((shape.n, shape.h, shape.w, shape.c), data_dtype))
        w = T.arg("w", T.buffer((layout.blocks, shape.kh, shape.kw, layout.channels // 4, LANES, 4), "int8"))
        bias = T.arg("bias", T.buffer((ocp,), "int32"))
        scale = None if requant is None else T.arg("scale", T.buffer((ocp,), "float32"))
        out = T.arg("out", T.buffer((shape.n, oh, ow, shape.oc), "int32" if requant is None else requant.dtype))
        shift = int8_kernels.kernel_zero_point(0, data_dtype, inst)
        data = _pack(x, layout, shift, zero_point + shift)
        _tiles_loop(layout, data, w, tiles,
                    lambda acc, ch: _epilogue(acc + bias[ch], None if scale is None else scale[ch], requant), out)
    func = builder.get()
    return (func.with_attr(SCHEDULED, True).with_attr("op_pattern", OPAQUE)
            .with_attr(INSTRUCTION, "amx"))


def _epilogue(value, scale, requant: Requant | None):
    return value if requant is None else int8_kernels.requantize(value, scale, requant)


def _pack(x, layout: Plan, shift: int, pad_value: int):
    """The data padded with its zero point to the plan's height, width and channels, shifted to
    uint8; `x` itself when it already is that."""
    from tvm import tirx
    from tvm.script.ir_builder import tirx as T

    s = layout.shape
    if shift == 0 and layout.channels == s.c and (layout.padded_h, layout.padded_w) == (s.h, s.w):
        return x
    top, left = s.pads[0], s.pads[1]
    xp = T.alloc_buffer((s.n, layout.padded_h, layout.padded_w, layout.channels), "uint8")
    with T.parallel(0, s.n * layout.padded_h) as t:
        n, h = t // layout.padded_h, t % layout.padded_h
        with T.serial(0, layout.padded_w) as w_, T.serial(0, layout.channels) as c:
            inside = tirx.all(h >= top, h < s.h + top, w_ >= left, w_ < s.w + left, c < s.c)
            value = x[n, tirx.min(tirx.max(h - top, 0), s.h - 1), tirx.min(tirx.max(w_ - left, 0), s.w - 1),
                      tirx.min(c, s.c - 1)]
            # The shift is a sign-bit flip, which LLVM emits as one xor.
            value = (value.astype("int32") + shift).astype("uint8")
            T.buffer_store(xp, tirx.if_then_else(inside, value, tirx.const(pad_value, "uint8")), [n, h, w_, c])
    return xp


def _tiles_loop(layout: Plan, data, w, tiles: TileOps, finish, out) -> None:
    """For each (image, block of Q x 16 channels, output row, group of P x rows pixels), in
    parallel: the C tiles accumulated over every tap and channel chunk, then `finish`ed out."""
    from tvm.script.ir_builder import tirx as T

    s = layout.shape
    oh, _ = s.out_hw
    p_count, q_count = layout.pixel_tiles, layout.channel_tiles
    groups_w, groups_c = layout.out_w // (layout.rows * p_count), layout.blocks // q_count
    with T.parallel(0, s.n * groups_c * oh * groups_w) as t:
        n = t // (groups_c * oh * groups_w)
        block = t // (oh * groups_w) % groups_c * q_count
        y, x0 = t // groups_w % oh, t % groups_w * p_count * layout.rows
        config = T.alloc_buffer((64,), "uint8", scope="local")
        for i, byte in enumerate(layout.config()):
            T.buffer_store(config, T.uint8(byte), [i])
        tiles.configure(config)
        for p in range(p_count):
            for q in range(q_count):
                tiles.zero(layout.c_tile(p, q))
        with T.serial(0, s.kh) as rh, T.serial(0, s.kw) as rw, T.serial(0, layout.channels // layout.chunk) as k:
            for p in range(p_count):
                pixel = (x0 + p * layout.rows) * s.strides[1] + rw * s.dilations[1]
                row = (n * layout.padded_h + y * s.strides[0] + rh * s.dilations[0]) * layout.padded_w + pixel
                tiles.load(layout.a_tile(p), data, row * layout.channels + k * layout.chunk,
                           s.strides[1] * layout.channels)
            for q in range(q_count):
                tap = ((block + q) * s.kh + rh) * s.kw + rw
                tiles.load(layout.b_tile(q), w, (tap * (layout.channels // 4) + k * (layout.chunk // 4)) * LANES * 4,
                           LANES * 4)
            for p in range(p_count):
                for q in range(q_count):
                    tiles.dot(layout.c_tile(p, q), layout.a_tile(p), layout.b_tile(q))
        acc = T.alloc_buffer((MAX_ROWS * LANES,), "int32", scope="local")
        for p in range(p_count):
            for q in range(q_count):
                tiles.store(layout.c_tile(p, q), acc, 0, LANES * 4)
                _write_tile(layout, acc, finish, out, n, y, x0 + p * layout.rows, (block + q) * LANES)
        tiles.release()


def _write_tile(layout: Plan, acc, finish, out, n, y, x, channel) -> None:
    """out[n, y, x + r, channel + l] = finish(acc[r, l], channel + l) for the pixels and channels
    that exist (the tiles' last ones may be padding)."""
    from tvm.script.ir_builder import tirx as T

    s = layout.shape
    _, ow = s.out_hw
    with T.serial(0, layout.rows) as r, _when(x + r < ow if layout.out_w != ow else None):
        whole = s.oc % LANES == 0
        with (T.vectorized(0, LANES) if whole else T.serial(0, LANES)) as lane, \
                _when(None if whole else channel + lane < s.oc):
            T.buffer_store(out, finish(acc[r * LANES + lane], channel + lane), [n, y, x + r, channel + lane])


@contextlib.contextmanager
def _when(condition):
    """The body under `if condition`, or unconditionally when `condition` is None."""
    from tvm.script.ir_builder import tirx as T

    if condition is None:
        yield
        return
    with T.If(condition), T.Then():
        yield
