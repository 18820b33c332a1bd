"""Where an ONNX file keeps its tensor data, found in the protobuf wire format without parsing
the model into objects: re-serializing could reorder or re-encode fields, and pack must give back
the very bytes it was given.

The walk descends only into the messages that hold tensors (model -> graph -> node -> attribute
-> tensor, subgraphs and sparse tensors included) and skips every other field by its length.
"""
from __future__ import annotations

from dataclasses import dataclass

from graphopt.pack.varint import Corrupt, Reader

# Protobuf's own default recursion limit; deeper nesting is refused as a hostile file.
MAX_DEPTH = 100
# Element width in bytes of each TensorProto.DataType's raw_data; NIBBLE for the 4-bit types
# stored two to a byte (the first element in the low half).
NIBBLE = 0
_RAW_WIDTH = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 14: 8, 15: 16,
              16: 2, 17: 1, 18: 1, 19: 1, 20: 1, 21: NIBBLE, 22: NIBBLE, 23: NIBBLE}
# Packed repeated data fields of TensorProto: float_data and double_data hold little-endian values
# as raw_data does; the integer fields hold varints, coded as plain bytes.
_PACKED_WIDTH = {4: 4, 10: 8, 5: 1, 7: 1, 11: 1}
_RAW_DATA, _DATA_TYPE, _NAME, _EXTERNAL_DATA, _DATA_LOCATION = 9, 2, 8, 13, 14
_EXTERNAL = 1

# Which fields of which message hold messages the walk descends into.
_CHILDREN = {
    "model": {7: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}


@dataclass(frozen=True)
class Payload:
    """A tensor's data bytes: file[start:end], elements `width` bytes wide (NIBBLE: 4 bits)."""

    start: int
    end: int
    width: int


class ExternalData(Exception):
    """A tensor keeps its data in another file."""

    def __init__(self, tensor: str, location: str):
        super().__init__(tensor, location)
        self.tensor, self.location = tensor, location


def payloads(data: bytes | memoryview) -> list[Payload]:
    """Every tensor data field of the ONNX model `data`, in file order. Raises `Corrupt` where the
    bytes are not a model's wire format, `ExternalData` for a tensor whose data is elsewhere."""
    found: list[Payload] = []
    seen = _walk(Reader(data), "model", found, 0)
    if 7 not in seen:
        raise Corrupt("no graph: not an ONNX model")
    return found


def _walk(r: Reader, kind: str, found: list[Payload], depth: int) -> set[int]:
    if depth > MAX_DEPTH:
        raise Corrupt(f"messages nested over {MAX_DEPTH} deep")
    if kind == "tensor":
        _tensor(r, found)
        return set()
    children = _CHILDREN[kind]
    seen: set[int] = set()
    while r.left():
        number, wire = _key(r)
        seen.add(number)
        if wire == 2 and number in children:
            n = r.varint()
            start = r.pos
            r.take(n)
            _walk(Reader(r.data, start, start + n), children[number], found, depth + 1)
        else:
            _skip(r, wire)
    return seen


def _tensor(r: Reader, found: list[Payload]) -> None:
    # data_type may follow the data in the file, so the ranges are placed once the whole message is read.
    fields: list[tuple[int, int, int]] = []
    data_type, name, external, location = 0, "", False, ""
    while r.left():
        number, wire = _key(r)
        if wire == 0 and number in (_DATA_TYPE, _DATA_LOCATION):
            value = r.varint()
            data_type = value if number == _DATA_TYPE else data_type
            external = external or (number == _DATA_LOCATION and value == _EXTERNAL)
        elif wire == 2:
            n = r.varint()
            body = r.take(n)
            if number == _RAW_DATA or number in _PACKED_WIDTH:
                fields.append((number, r.pos - n, r.pos))
            elif number == _NAME:
                name = bytes(body).decode("utf-8", "replace")
            elif number == _EXTERNAL_DATA:
                location = _entry(body, "location") or location
        else:
            _skip(r, wire)
    if external:
        raise ExternalData(name, location)
    for number, start, end in fields:
        width = _RAW_WIDTH.get(data_type, 1) if number == _RAW_DATA else _PACKED_WIDTH[number]
        found.append(Payload(start, end, width))


def _entry(body: memoryview, wanted: str) -> str | None:
    """The value of a StringStringEntryProto whose key is `wanted`."""
    r, key, value = Reader(body), None, None
    while r.left():
        number, wire = _key(r)
        if wire != 2:
            _skip(r, wire)
            continue
        text = bytes(r.take(r.varint())).decode("utf-8", "replace")
        key, value = (text, value) if number == 1 else (key, text) if number == 2 else (key, value)
    return value if key == wanted else None


def _key(r: Reader) -> tuple[int, int]:
    key = r.varint()
    if key >> 3 == 0:
        raise Corrupt(f"field number 0 at offset {r.pos}")
    return key >> 3, key & 7


def _skip(r: Reader, wire: int) -> None:
    if wire == 0:
        r.varint()
    elif wire == 1:
        r.take(8)
    elif wire == 2:
        r.take(r.varint())
    elif wire == 5:
        r.take(4)
    else:  # groups (3, 4) are not in ONNX's schema; 6 and 7 do not exist
        raise Corrupt(f"wire type {wire} at offset {r.pos}")
