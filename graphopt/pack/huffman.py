"""Canonical Huffman coding of integer symbols (alphabets of at most 256), as Deep Compression's
last stage codes weight indices and sparse-index gaps.

A coded stream is self-delimiting: the alphabet size, one code length per symbol, the byte count
of the bit stream and the bits (most significant bit first). Only the lengths are stored: the
codes follow from them (canonical order: by length, then by symbol), so the table costs one byte
a symbol. Code lengths are capped at `MAX_BITS` so that the decoder is one table lookup per symbol
and a hostile length table cannot make it allocate more than 2**MAX_BITS entries.
"""
from __future__ import annotations

import heapq

import numba
import numpy as np

from graphopt.pack.varint import Corrupt, Reader, varint

MAX_BITS = 16
ALPHABET = 256


def code_lengths(counts: np.ndarray) -> np.ndarray:
    """Huffman code lengths (0 for unused symbols) for symbol `counts`, none longer than MAX_BITS.

    Over the cap, counts are halved (kept >= 1) and the tree rebuilt: the flattened code costs a
    fraction of a bit on the rarest symbols only, and the loop ends since equal counts give a
    balanced tree of depth log2(256) = 8.
    """
    counts = np.asarray(counts, dtype=np.int64)
    used = np.flatnonzero(counts)
    lengths = np.zeros(len(counts), np.uint8)
    if len(used) == 1:  # a single symbol still needs one bit to be a code
        lengths[used[0]] = 1
        return lengths
    weights = counts[used].copy()
    while True:
        depth = _tree_depths(weights)
        if depth.max(initial=0) <= MAX_BITS:
            lengths[used] = depth
            return lengths
        weights = np.maximum(weights >> 1, 1)


def _tree_depths(weights: np.ndarray) -> np.ndarray:
    # Heap of (weight, tiebreak, leaves below); merging adds one to every leaf's depth.
    depth = np.zeros(len(weights), np.int64)
    heap = [(int(w), i, [i]) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    tiebreak = len(heap)
    while len(heap) > 1:
        w1, _, a = heapq.heappop(heap)
        w2, _, b = heapq.heappop(heap)
        depth[a] += 1
        depth[b] += 1
        heapq.heappush(heap, (w1 + w2, tiebreak, a + b))
        tiebreak += 1
    return depth


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """The canonical code of each symbol for these lengths (0 where the length is 0)."""
    codes = np.zeros(len(lengths), np.int64)
    code, prev = 0, 0
    for sym in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[sym]) - prev
        prev = int(lengths[sym])
        codes[sym] = code
        code += 1
    return codes


def encode(symbols: np.ndarray, alphabet: int = ALPHABET) -> bytes:
    """`symbols` (integers in [0, alphabet)) as a self-delimiting canonical Huffman stream."""
    symbols = np.ascontiguousarray(symbols, dtype=np.uint8 if alphabet <= 256 else np.int64)
    counts = np.bincount(symbols, minlength=alphabet)
    # Trailing unused symbols are not stored: the table is as long as the largest symbol used.
    size = int(np.flatnonzero(counts)[-1]) + 1 if symbols.size else 0
    lengths = code_lengths(counts[:size])
    codes = canonical_codes(lengths)
    nbits = int(np.dot(counts[:size], lengths.astype(np.int64))) if size else 0
    out = np.zeros((nbits + 7) // 8, np.uint8)
    if symbols.size:
        _pack_bits(symbols, codes, lengths.astype(np.int64), out)
    return varint(size) + lengths.tobytes() + varint(len(out)) + out.tobytes()


def decode(reader: Reader, count: int) -> np.ndarray:
    """Read one stream written by `encode` from `reader`; `count` symbols, as uint8."""
    size = reader.varint()
    if size > ALPHABET:
        raise Corrupt(f"Huffman alphabet of {size} symbols (at most {ALPHABET})")
    lengths = np.frombuffer(reader.take(size), np.uint8).astype(np.int64)
    nbytes = reader.varint()
    bits = reader.take(nbytes)
    if count == 0:
        return np.zeros(0, np.uint8)
    # Before allocating `count` symbols: each costs at least one bit.
    if count > 8 * nbytes:
        raise Corrupt(f"Huffman stream of {nbytes} bytes cannot hold {count} symbols")
    table = _decode_table(lengths)
    buf = np.zeros(nbytes + 3, np.uint8)  # zero padding: the last lookups read past the end
    buf[:nbytes] = np.frombuffer(bits, np.uint8)
    out = np.empty(count, np.uint8)
    if _unpack_bits(buf, 8 * nbytes, count, table, out) < 0:
        raise Corrupt("Huffman stream holds an invalid code or ends early")
    return out


def _decode_table(lengths: np.ndarray) -> np.ndarray:
    """Entry for every MAX_BITS-bit prefix: length << 8 | symbol, 0 where no code starts so."""
    if lengths.max(initial=0) > MAX_BITS:
        raise Corrupt(f"Huffman code length over {MAX_BITS} bits")
    # Kraft: codes that overlap would make the table ambiguous.
    if int(np.sum(np.where(lengths > 0, 1 << (MAX_BITS - lengths), 0))) > 1 << MAX_BITS:
        raise Corrupt("Huffman code lengths do not form a prefix code")
    table = np.zeros(1 << MAX_BITS, np.int32)
    codes = canonical_codes(lengths.astype(np.uint8))
    for sym in np.flatnonzero(lengths):
        shift = MAX_BITS - int(lengths[sym])
        table[int(codes[sym]) << shift:(int(codes[sym]) + 1) << shift] = int(lengths[sym]) << 8 | int(sym)
    return table


@numba.njit(cache=True, nogil=True)
def _pack_bits(symbols, codes, lengths, out):  # pragma: no cover - compiled
    acc = np.int64(0)
    held = 0
    o = 0
    for s in symbols:
        n = lengths[s]
        acc = (acc << n) | codes[s]
        held += n
        while held >= 8:
            held -= 8
            out[o] = (acc >> held) & 0xFF
            o += 1
        acc &= (np.int64(1) << held) - 1  # keep only the bits not yet written
    if held:
        out[o] = (acc << (8 - held)) & 0xFF


@numba.njit(cache=True, nogil=True)
def _unpack_bits(buf, nbits, count, table, out):  # pragma: no cover - compiled
    pos = 0
    for i in range(count):
        b = pos >> 3
        window = (np.int64(buf[b]) << 16) | (np.int64(buf[b + 1]) << 8) | np.int64(buf[b + 2])
        entry = table[(window >> (8 - (pos & 7))) & 0xFFFF]
        if entry == 0:
            return -1
        pos += entry >> 8
        if pos > nbits:
            return -1
        out[i] = entry & 0xFF
    return pos
