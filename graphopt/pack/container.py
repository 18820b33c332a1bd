"""The .gopt container: an ONNX file stored smaller, which unpacks to the very same bytes.

Layout (numbers are base-128 varints unless said otherwise):

    magic b"GOPT" | version (1 byte) | original size | SHA-256 of the original (32 bytes)
    structure codec (1 byte) | structure size | structure blob size
    tensor count | per tensor: structure bytes before it, its size, codec (1 byte), blob size
    structure blob | the tensor blobs, in file order

The structure is the ONNX file with every tensor's data bytes cut out (names, nodes, shapes,
small tensors), compressed as one stream by the better of zlib and lzma. Each tensor's data is
coded by the codec `codecs.encode_best` measures smallest. Unpacking splices the pieces back and
checks the SHA-256; every size is checked against the file and the declared total before anything
is allocated or decompressed.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from graphopt.ir.errors import ModelError
from graphopt.pack import codecs, wire
from graphopt.pack.varint import Corrupt, Reader, varint

MAGIC = b"GOPT"
VERSION = 1
# Protobuf cannot parse a model over 2 GB, and external data is refused: no original is larger.
MAX_ORIGINAL = 2**31 - 1
# Smaller data fields stay in the structure stream, where a table entry would cost more than it saves.
MIN_PAYLOAD = 64
_SHA = 32


@dataclass
class PackStats:
    """Sizes for the report: the original, zlib alone (level 6, as gzip), the .gopt, and per codec what it
    coded."""

    original_bytes: int
    zlib_bytes: int
    packed_bytes: int = 0
    # codec name -> {"tensors": n, "bytes": coded size, "original_bytes": size before}
    codecs: dict[str, dict[str, int]] = field(default_factory=dict)
    structure_bytes: int = 0
    structure_codec: str = ""

    @property
    def ratio(self) -> float:
        return self.original_bytes / max(self.packed_bytes, 1)

    def as_dict(self) -> dict:
        return {"original_bytes": self.original_bytes, "zlib_bytes": self.zlib_bytes,
                "packed_bytes": self.packed_bytes, "ratio": round(self.ratio, 3),
                "structure": {"codec": self.structure_codec, "bytes": self.structure_bytes},
                "codecs": self.codecs}

    def line(self) -> str:
        return (f"{self.original_bytes} B -> {self.packed_bytes} B ({self.ratio:.1f}x smaller; "
                f"zlib alone {self.zlib_bytes} B)")


def pack_bytes(data: bytes, name: object = "<model>") -> tuple[bytes, PackStats]:
    """`data`, an ONNX file's bytes, as a .gopt container; raises ModelError naming `name`."""
    if len(data) > MAX_ORIGINAL:
        raise ModelError(name, f"{len(data)} bytes, over the {MAX_ORIGINAL}-byte limit of an ONNX file")
    try:
        found = [p for p in wire.payloads(data) if p.end - p.start >= MIN_PAYLOAD]
    except Corrupt as e:
        raise ModelError(name, f"not an ONNX model ({e})") from None
    except wire.ExternalData as e:
        raise ModelError(name, f"tensor '{e.tensor}' keeps its data in external file '{e.location}'; pack takes "
                               "self-contained models only (save the model with its weights inline)") from None
    stats = PackStats(len(data), len(zlib.compress(data, codecs.ZLIB_LEVEL)))
    view = memoryview(data)
    structure, table, blobs, cursor = [], [], [], 0
    for p in found:
        structure.append(view[cursor:p.start])
        codec, blob = codecs.encode_best(view[p.start:p.end], p.width)
        if codecs.decode(codec, memoryview(blob), p.end - p.start) != view[p.start:p.end]:
            raise AssertionError(f"codec {codecs.NAMES[codec]} does not round-trip")  # a bug, never the input's fault
        table.append(varint(p.start - cursor) + varint(p.end - p.start) + bytes([codec]) + varint(len(blob)))
        blobs.append(blob)
        entry = stats.codecs.setdefault(codecs.NAMES[codec], {"tensors": 0, "bytes": 0, "original_bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += len(blob)
        entry["original_bytes"] += p.end - p.start
        cursor = p.end
    structure.append(view[cursor:])
    plain = b"".join(structure)
    packed = [(codecs.ZLIB, codecs.deflate(plain)), (codecs.LZMA, codecs.xz(plain))]
    s_codec, s_blob = min(packed, key=lambda c: len(c[1]))
    stats.structure_codec, stats.structure_bytes = codecs.NAMES[s_codec], len(s_blob)
    header = (MAGIC + bytes([VERSION]) + varint(len(data)) + hashlib.sha256(data).digest()
              + bytes([s_codec]) + varint(len(plain)) + varint(len(s_blob)) + varint(len(table)))
    out = b"".join([header, *table, s_blob, *blobs])
    stats.packed_bytes = len(out)
    return out, stats


def unpack_bytes(blob: bytes, name: object = "<gopt>") -> bytes:
    """The ONNX bytes a .gopt container holds; a damaged, truncated or foreign file raises a
    ModelError naming `name`."""
    try:
        return _unpack(memoryview(blob), name)
    except Corrupt as e:
        raise ModelError(name, f"damaged or truncated .gopt file ({e})") from None


def _unpack(blob: memoryview, name: object) -> bytes:
    r = Reader(blob)
    if len(blob) < len(MAGIC) + 1 or bytes(r.take(len(MAGIC))) != MAGIC:
        raise ModelError(name, "not a .gopt file (wrong magic bytes)")
    version = r.u8()
    if version != VERSION:
        raise ModelError(name, f".gopt format version {version}; this graphopt reads version {VERSION}")
    size = r.varint()
    if size > MAX_ORIGINAL:
        raise Corrupt(f"declares an original of {size} bytes, over the {MAX_ORIGINAL}-byte limit")
    digest = bytes(r.take(_SHA))
    s_codec, s_size, s_blob_size, count = r.u8(), r.varint(), r.varint(), r.varint()
    if count > r.left():  # every table entry takes at least four bytes
        raise Corrupt(f"declares {count} tensors, more than the file could describe")
    entries = [(r.varint(), r.varint(), r.u8(), r.varint()) for _ in range(count)]
    # All sizes agree with each other and with the file before anything is decompressed.
    if sum(e[0] for e in entries) > s_size or s_size + sum(e[1] for e in entries) != size:
        raise Corrupt(f"the pieces' sizes do not add up to the declared {size} bytes")
    if s_blob_size + sum(e[3] for e in entries) != r.left():
        raise Corrupt(f"the blobs' sizes do not match the {r.left()} bytes after the header (truncated?)")
    structure = codecs.decode(s_codec, r.take(s_blob_size), s_size) if s_codec in (codecs.ZLIB, codecs.LZMA) else None
    if structure is None:
        raise Corrupt(f"structure codec {s_codec}")
    pieces, cursor = [], 0
    for gap, length, codec, blob_size in entries:
        pieces.append(structure[cursor:cursor + gap])
        cursor += gap
        pieces.append(codecs.decode(codec, r.take(blob_size), length))
    pieces.append(structure[cursor:])
    out = b"".join(pieces)
    if hashlib.sha256(out).digest() != digest:
        raise Corrupt("the unpacked model's SHA-256 differs from the one recorded")
    return out


def pack(model: str | os.PathLike, output: str | os.PathLike) -> PackStats:
    """Pack the ONNX file `model` into `output` (written whole or not at all)."""
    model, output = Path(model), Path(output)
    _check_paths(model, output)
    blob, stats = pack_bytes(_read(model, MAX_ORIGINAL), model)
    write_atomic(output, blob)
    return stats


def unpack(packed: str | os.PathLike, output: str | os.PathLike) -> int:
    """Unpack the .gopt file `packed` into `output` (written whole or not at all); returns its size."""
    packed, output = Path(packed), Path(output)
    _check_paths(packed, output)
    data = unpack_bytes(_read(packed, None), packed)
    write_atomic(output, data)
    return len(data)


def is_packed(path: str | os.PathLike) -> bool:
    """Whether `path` starts like a .gopt file."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def _read(path: Path, limit: int | None) -> bytes:
    if not path.exists():
        raise ModelError(path, "no such file")
    if not path.is_file():
        raise ModelError(path, "not a file")
    if limit is not None and path.stat().st_size > limit:
        raise ModelError(path, f"{path.stat().st_size} bytes, over the {limit}-byte limit")
    try:
        return path.read_bytes()
    except OSError as e:
        raise ModelError(path, f"cannot read the file ({e.strerror})") from None


def _check_paths(source: Path, output: Path) -> None:
    """The output never replaces the input, by any name (a link, a relative path)."""
    same = output.resolve() == source.resolve()
    if not same and output.exists() and source.exists():
        same = os.path.samefile(output, source)
    if same:
        raise ModelError(output, "is the input file; give the output another name")
    if output.exists() and not output.is_file():
        raise ModelError(output, "exists and is not a file")


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file in `path`'s folder, then rename: never a half-written output."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
