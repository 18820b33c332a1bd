"""Deep Compression's last stage: store an ONNX model as a .gopt container (Huffman-coded index
tensors, relative indexing of sparse weights) that unpacks to the exact same bytes."""
from graphopt.pack.container import (
    PackStats,
    is_packed,
    pack,
    pack_bytes,
    unpack,
    unpack_bytes,
)

__all__ = ["PackStats", "is_packed", "pack", "pack_bytes", "unpack", "unpack_bytes"]
