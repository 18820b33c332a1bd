"""Bounded reading of the .gopt format: every read checks what is left, so a truncated or
corrupted file is one `Corrupt` error, never an IndexError or an allocation of a declared size."""
from __future__ import annotations

# Protobuf's limit: a varint of a 64-bit value takes at most 10 bytes.
MAX_VARINT_BYTES = 10


class Corrupt(Exception):
    """The bytes are not what the format says; the container names the file."""


def varint(value: int) -> bytes:
    """`value` (>= 0) as a protobuf-style base-128 varint."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


class Reader:
    """A cursor over `data[start:end]` whose reads never pass `end`."""

    def __init__(self, data: bytes | memoryview, start: int = 0, end: int | None = None):
        self.data = memoryview(data)
        self.pos = start
        self.end = len(data) if end is None else end

    def left(self) -> int:
        return self.end - self.pos

    def take(self, n: int) -> memoryview:
        if n < 0 or n > self.left():
            raise Corrupt(f"needs {n} bytes at offset {self.pos} but {self.left()} are left (truncated?)")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def u8(self) -> int:
        return self.take(1)[0]

    def varint(self) -> int:
        value = 0
        for i in range(MAX_VARINT_BYTES):
            if self.pos >= self.end:
                raise Corrupt(f"a number runs past the end at offset {self.pos} (truncated?)")
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                return value
        raise Corrupt(f"a number longer than {MAX_VARINT_BYTES} bytes at offset {self.pos}")
