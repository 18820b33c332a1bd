"""Compiled CUDA device code inside exported libraries.

TVM 0.27 built without a CUDA runtime (the PyPI wheel on a machine with no driver) emits CUDA
*source* into the library, and the device compiles it when the library is loaded, which needs
NVRTC (`pip install cuda-bindings`) or nvcc there. Where nvcc is on this machine's PATH we compile
the source to a fatbin (SASS for the chosen arch plus its PTX, which newer GPUs JIT) and put that
in the library instead, so the device needs only its driver.

How: `export_library` serialises the module tree into one blob (`__tvm_ffi__library_bin`) and
lets the caller pack it (`fpack_imports`, the hook TVM's Hexagon exporter uses). We take TVM's
blob, swap each CUDA module's payload from ("cuda", source) to ("fatbin", binary), and link the
blob in as a read-only symbol. TVM's CUDA runtime hands any payload but "cuda" straight to
cuModuleLoadData, which takes a fatbin as it takes the cubin TVM writes when built with CUDA.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from graphopt.ir.errors import CodegenError

FATBIN = "fatbin"
SOURCE = "source"
_U64 = struct.Struct("<Q")


@contextmanager
def source_codegen() -> Iterator[None]:
    """Make TVM's CUDA codegen keep the source even where its CUDA runtime is loaded.

    With a GPU and driver present, TVM 0.27 compiles CUDA at build time through NVRTC, which needs
    `cuda-bindings`; forcing the source module makes a build the same on every machine.
    """
    previous = os.environ.get("TVM_COMPILE_FORCE_FALLBACK")
    os.environ["TVM_COMPILE_FORCE_FALLBACK"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TVM_COMPILE_FORCE_FALLBACK"]
        else:
            os.environ["TVM_COMPILE_FORCE_FALLBACK"] = previous


def nvcc_available() -> bool:
    return shutil.which("nvcc") is not None


def fatbin_packer(executable, target) -> Callable:
    """An `fpack_imports` for `export_library` that embeds compiled device code.

    `target` is the `tvm.target.Target` the executable was compiled for. The CUDA sources are
    compiled now, so that an nvcc error surfaces before anything is written.
    """
    modules = [m for m in _module_tree(executable.mod) if m.kind == "cuda"]
    if not modules:
        raise CodegenError("the CUDA build holds no CUDA module to compile")
    sources = {m.inspect_source() for m in modules}
    binaries = {source: _nvcc(source, target) for source in sources}

    def pack(module, is_system_lib: bool, symbol_prefix: str, workspace_dir: str) -> str:
        import tvm

        if is_system_lib or symbol_prefix:
            raise CodegenError("embedding CUDA device code supports shared libraries only")
        blob = tvm.get_global_func("runtime.ModulePackImportsToTensor")(module).numpy().tobytes()
        data = os.path.join(workspace_dir, "devc.bin")
        with open(data, "wb") as f:
            f.write(_replace_cuda_payloads(blob, binaries))
        path = os.path.join(workspace_dir, "devc.s")
        with open(path, "w") as f:
            f.write(_assembly(tvm.get_global_func("runtime.ModuleImportsBlobName")(), data))
        return path

    return pack


def _module_tree(module) -> Iterator:
    yield module
    for child in module.imports:
        yield from _module_tree(child)


def _nvcc(source: str, target) -> bytes:
    from tvm.support import nvcc

    number = str(target.arch).removeprefix("sm_")
    # SASS for the arch, plus PTX so that later GPU generations can JIT the kernels.
    arch = ["-gencode", f"arch=compute_{number},code=[sm_{number},compute_{number}]"]
    try:
        # Inside the target's scope: compile_cuda reads the compute version from it, not from a GPU.
        with target:
            return bytes(nvcc.compile_cuda(source, target_format="fatbin", arch=arch, compiler="nvcc"))
    except RuntimeError as e:
        log = str(e).split("Compilation error:", 1)[-1].strip()
        raise CodegenError(f"nvcc could not compile the generated CUDA for {target.arch} (`nvcc "
                           f"--list-gpu-arch` lists the architectures it supports):\n{log}") from None


def _replace_cuda_payloads(blob: bytes, binaries: dict[str, bytes]) -> bytes:
    """Rewrite TVM's serialised module tree with each CUDA module's source replaced by its binary.

    Layout (tvm 0.27, little endian): u64 size of the rest; the import tree as two u64 vectors;
    then per module a kind string and, unless it is the library itself ("_lib"), its payload
    bytes. Strings and byte arrays are a u64 length then the bytes. A CUDA payload is the format
    string, the function table, then the code; only the first and the last change here.
    """
    reader = _Reader(blob)
    reader.u64()
    body = bytearray(reader.vector() + reader.vector())
    replaced = 0
    while not reader.done():
        kind = reader.string()
        body += _string(kind)
        if kind == b"_lib":
            continue
        payload = reader.string()
        if kind == b"cuda":
            payload = _cuda_payload(payload, binaries)
            replaced += 1
        body += _string(payload)
    if replaced == 0:
        raise CodegenError("found no CUDA module in the serialised library; cannot embed device code")
    return _U64.pack(len(body)) + bytes(body)


def _cuda_payload(payload: bytes, binaries: dict[str, bytes]) -> bytes:
    head = _string(b"cuda")
    for source, binary in binaries.items():
        code = _string(source.encode())
        if payload.startswith(head) and payload.endswith(code):
            return _string(FATBIN.encode()) + payload[len(head):len(payload) - len(code)] + _string(binary)
    raise CodegenError("a CUDA module in the library is not the CUDA source TVM generated; this "
                       "TVM version serialises CUDA modules in a layout graphopt does not know")


def _string(data: bytes) -> bytes:
    return _U64.pack(len(data)) + data


def _assembly(symbol: str, data_path: str) -> str:
    """The blob as an exported read-only symbol. Assembly with .incbin rather than a C array: the
    blob holds the model's weights, and a C initialiser of that size takes the compiler minutes."""
    return (f"  .section .rodata\n  .globl {symbol}\n  .type {symbol}, @object\n  .balign 16\n"
            f"{symbol}:\n  .incbin {json.dumps(data_path)}\n  .size {symbol}, . - {symbol}\n"
            "  .section .note.GNU-stack,\"\",@progbits\n")


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def done(self) -> bool:
        return self.pos >= len(self.data)

    def u64(self) -> int:
        if self.pos + 8 > len(self.data):
            raise CodegenError("the serialised library ends early; cannot embed CUDA device code")
        (value,) = _U64.unpack_from(self.data, self.pos)
        self.pos += 8
        return value

    def vector(self) -> bytes:
        start = self.pos
        count = self.u64()
        self.pos += 8 * count
        return self.data[start:self.pos]

    def string(self) -> bytes:
        size = self.u64()
        if self.pos + size > len(self.data):
            raise CodegenError("the serialised library ends early; cannot embed CUDA device code")
        self.pos += size
        return self.data[self.pos - size:self.pos]
