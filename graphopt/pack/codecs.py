"""The codecs one tensor's data bytes can be stored with; `encode_best` measures each that applies
and keeps the smallest, so the choice is by size, not by guessing from the type.

- raw: the bytes as they are.
- zlib: raw deflate at level 6: level 9 costs several times the time on skewed data for a few bytes.
- shuffle-zlib: the bytes regrouped by byte position within an element (all first bytes, then
  all second bytes, ...) then deflated: the exponent bytes of floats become a long, repetitive run.
- huffman: Huffman over the elements themselves, for index tensors (bytes, or 4-bit nibbles).
- sparse: Deep Compression's relative indexing: the gaps between nonzero elements Huffman-coded
  (a gap of 255 or more costs one 255 filler per 255 zeros), and the nonzero elements coded on
  their own by the best of the codecs above.
Every codec is lossless on any bytes; one that does not apply (the length is not a multiple of the
element width) is simply not a candidate.
"""
from __future__ import annotations

import lzma
import zlib

import numpy as np

from graphopt.pack import huffman
from graphopt.pack.varint import Corrupt, Reader, varint
from graphopt.pack.wire import NIBBLE

RAW, ZLIB, LZMA, HUFFMAN, SPARSE, SHUFFLE = range(6)
NAMES = {RAW: "raw", ZLIB: "zlib", LZMA: "lzma", HUFFMAN: "huffman", SPARSE: "sparse", SHUFFLE: "shuffle-zlib"}
_WIDTHS = (NIBBLE, 1, 2, 4, 8, 16)
_FILLER = 255  # a gap symbol meaning "255 zeros, and no nonzero element yet"
# Below this share of zero elements relative indexing cannot win: every nonzero costs a gap symbol.
_MIN_ZERO_SHARE = 0.1
ZLIB_LEVEL = 6
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


def encode_best(data: bytes, width: int, sparse: bool = True) -> tuple[int, bytes]:
    """The smallest (codec, blob) for `data`, whose elements are `width` bytes wide (NIBBLE: 4
    bits); `sparse` False leaves relative indexing out (its own values use this)."""
    best = (RAW, bytes(data))
    candidates = [(ZLIB, _zlib)]
    if width >= 2 and len(data) % width == 0:
        candidates.append((SHUFFLE, _shuffle))
    if width in (NIBBLE, 1):
        candidates.append((HUFFMAN, _huffman))
    if sparse and (width == NIBBLE or len(data) % width == 0):
        candidates.append((SPARSE, _sparse))
    for codec, encoder in candidates:
        blob = encoder(data, width)
        if blob is not None and len(blob) < len(best[1]):
            best = (codec, blob)
    return best


def decode(codec: int, blob: memoryview, length: int) -> bytes:
    """The `length` bytes `blob` codes; raises Corrupt if it does not code exactly that many."""
    if codec == RAW:
        out = bytes(blob)
    elif codec == ZLIB:
        out = inflate(blob, length)
    elif codec == LZMA:
        out = unxz(blob, length)
    elif codec in (HUFFMAN, SPARSE, SHUFFLE):
        r = Reader(blob)
        width = r.u8()
        if width not in _WIDTHS:
            raise Corrupt(f"element width {width} in a {NAMES[codec]} tensor")
        out = {HUFFMAN: _unhuffman, SPARSE: _unsparse, SHUFFLE: _unshuffle}[codec](r, width, length)
        if r.left():
            raise Corrupt(f"{r.left()} stray bytes after a {NAMES[codec]} tensor")
    else:
        raise Corrupt(f"unknown codec {codec}")
    if len(out) != length:
        raise Corrupt(f"a {NAMES[codec]} tensor decodes to {len(out)} bytes, not the {length} declared")
    return out


def deflate(data: bytes | memoryview) -> bytes:
    c = zlib.compressobj(ZLIB_LEVEL, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def inflate(blob: memoryview, length: int) -> bytes:
    d = zlib.decompressobj(-15)
    try:
        out = d.decompress(blob, length)  # at most `length` bytes, whatever the stream claims
    except zlib.error as e:
        raise Corrupt(f"zlib data is damaged ({e})") from None
    if not d.eof or d.unconsumed_tail or d.unused_data:
        raise Corrupt("zlib data does not end where the declared size does")
    return out


def xz(data: bytes | memoryview) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)


def unxz(blob: memoryview, length: int) -> bytes:
    d = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    try:
        out = d.decompress(bytes(blob), max_length=length)
    except lzma.LZMAError as e:
        raise Corrupt(f"lzma data is damaged ({e})") from None
    if not d.eof or d.unused_data:
        raise Corrupt("lzma data does not end where the declared size does")
    return out


def _zlib(data: bytes, width: int) -> bytes:
    return deflate(data)


def _shuffle(data: bytes, width: int) -> bytes:
    planes = np.frombuffer(data, np.uint8).reshape(-1, width).T
    return bytes([width]) + deflate(np.ascontiguousarray(planes).tobytes())


def _unshuffle(r: Reader, width: int, length: int) -> bytes:
    if width < 2 or length % width:
        raise Corrupt(f"shuffle of {width}-byte elements over {length} bytes")
    planes = np.frombuffer(inflate(r.take(r.left()), length), np.uint8)
    if planes.size != length:
        raise Corrupt("shuffled data is short")
    return np.ascontiguousarray(planes.reshape(width, -1).T).tobytes()


def _symbols(data: bytes, width: int) -> np.ndarray:
    """The elements as Huffman symbols: bytes, or nibbles (low half of each byte first)."""
    raw = np.frombuffer(data, np.uint8)
    if width != NIBBLE:
        return raw
    return np.stack([raw & 0x0F, raw >> 4], axis=1).reshape(-1)


def _from_nibbles(symbols: np.ndarray) -> bytes:
    if symbols.size and symbols.max() > 0x0F:
        raise Corrupt("a 4-bit tensor holds a symbol over 15")
    pairs = symbols.reshape(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).astype(np.uint8).tobytes()


def _huffman(data: bytes, width: int) -> bytes:
    return bytes([width]) + huffman.encode(_symbols(data, width))


def _unhuffman(r: Reader, width: int, length: int) -> bytes:
    if width not in (NIBBLE, 1):
        raise Corrupt(f"Huffman over {width}-byte elements")
    symbols = huffman.decode(r, 2 * length if width == NIBBLE else length)
    return _from_nibbles(symbols) if width == NIBBLE else symbols.tobytes()


def _sparse(data: bytes, width: int) -> bytes | None:
    if width == NIBBLE:
        elements = _symbols(data, width)
        nonzero = elements != 0
        values = elements[nonzero].tobytes()  # one nibble value (1..15) a byte
    else:
        elements = np.frombuffer(data, np.uint8).reshape(-1, width)
        nonzero = elements.any(axis=1)  # an element is zero when all its bytes are (+0.0, not -0.0)
        values = elements[nonzero].tobytes()
    if nonzero.size == 0 or nonzero.mean() > 1 - _MIN_ZERO_SHARE:
        return None
    positions = np.flatnonzero(nonzero)
    gaps = np.diff(positions, prepend=-1) - 1
    fillers = gaps // _FILLER
    symbols = np.full(int(fillers.sum()) + len(positions), _FILLER, np.uint8)
    symbols[np.cumsum(fillers + 1) - 1] = gaps % _FILLER
    codec, blob = encode_best(values, 1 if width == NIBBLE else width, sparse=False)
    return (bytes([width]) + varint(len(symbols)) + huffman.encode(symbols)
            + bytes([codec]) + varint(len(blob)) + blob)


def _unsparse(r: Reader, width: int, length: int) -> bytes:
    count = length * 2 if width == NIBBLE else length // width
    if width != NIBBLE and length % width:
        raise Corrupt(f"{length} bytes are not whole {width}-byte elements")
    gaps = huffman.decode(r, r.varint()).astype(np.int64)
    steps = np.where(gaps == _FILLER, _FILLER, gaps + 1)
    positions = (np.cumsum(steps) - 1)[gaps != _FILLER]
    if positions.size and positions[-1] >= count:
        raise Corrupt(f"a nonzero element at {positions[-1]} in a tensor of {count}")
    size = 1 if width == NIBBLE else width
    codec = r.u8()
    if codec == SPARSE:  # the encoder never nests it; refusing keeps a crafted file from recursing
        raise Corrupt("sparse values coded as sparse again")
    values = np.frombuffer(decode(codec, r.take(r.varint()), positions.size * size), np.uint8)
    if width == NIBBLE:
        elements = np.zeros(count, np.uint8)
        elements[positions] = values
        return _from_nibbles(elements)
    elements = np.zeros((count, width), np.uint8)
    elements[positions] = values.reshape(-1, width)
    return elements.tobytes()
