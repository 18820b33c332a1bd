import os
import struct

import pytest

from graphopt.codegen import cuda
from graphopt.ir.errors import CodegenError

SOURCE = 'extern "C" __global__ void k(float* x) { x[0] = 1; }'
FUNCTIONS = b"\x01\x00\x00\x00\x00\x00\x00\x00<the function table, kept as it is>"


def string(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def vector(*values: int) -> bytes:
    return struct.pack(f"<Q{len(values)}Q", len(values), *values)


def blob(cuda_payload: bytes) -> bytes:
    """A serialised module tree as TVM 0.27 writes it: VM executable -> library -> CUDA module."""
    body = (vector(0, 1, 2, 2) + vector(1, 2) + string(b"relax.VMExecutable") + string(b"<vm bytes>")
            + string(b"_lib") + string(b"cuda") + string(cuda_payload))
    return struct.pack("<Q", len(body)) + body


def test_cuda_payload_becomes_the_binary():
    source_payload = string(b"cuda") + FUNCTIONS + string(SOURCE.encode())
    rewritten = cuda._replace_cuda_payloads(blob(source_payload), {SOURCE: b"\x50\xed\x55\xba<fatbin>"})
    assert rewritten == blob(string(b"fatbin") + FUNCTIONS + string(b"\x50\xed\x55\xba<fatbin>"))


@pytest.mark.parametrize("payload, message", [
    (string(b"ptx") + FUNCTIONS + string(SOURCE.encode()), "layout graphopt does not know"),
    (string(b"cuda") + FUNCTIONS + string(b"other source"), "layout graphopt does not know"),
])
def test_unknown_payload_is_refused(payload, message):
    with pytest.raises(CodegenError, match=message):
        cuda._replace_cuda_payloads(blob(payload), {SOURCE: b"binary"})


def test_truncated_blob_is_refused():
    data = blob(string(b"cuda") + FUNCTIONS + string(SOURCE.encode()))
    with pytest.raises(CodegenError, match="ends early"):
        cuda._replace_cuda_payloads(data[:-10], {SOURCE: b"binary"})


def test_blob_without_cuda_module_is_refused():
    body = vector(0, 0) + vector() + string(b"_lib")
    with pytest.raises(CodegenError, match="no CUDA module"):
        cuda._replace_cuda_payloads(struct.pack("<Q", len(body)) + body, {SOURCE: b"binary"})


def test_source_codegen_restores_the_environment(monkeypatch):
    monkeypatch.delenv("TVM_COMPILE_FORCE_FALLBACK", raising=False)
    with cuda.source_codegen():
        assert os.environ["TVM_COMPILE_FORCE_FALLBACK"] == "1"
    assert "TVM_COMPILE_FORCE_FALLBACK" not in os.environ
