"""`graphopt pack` and `graphopt unpack`: an ONNX model as a smaller .gopt container and back,
byte for byte."""
from __future__ import annotations

import json

from graphopt.pack import pack, unpack


def cmd_pack(args) -> int:
    stats = pack(args.model, args.output)
    print(json.dumps(stats.as_dict(), indent=2) if args.json else f"{args.output}: {stats.line()}")
    return 0


def cmd_unpack(args) -> int:
    size = unpack(args.packed, args.output)
    print(f"{args.output}: {size} B, identical to the model that was packed (SHA-256 checked)")
    return 0
