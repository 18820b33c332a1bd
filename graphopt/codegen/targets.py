"""Named compilation targets: one row of `TARGETS` per name, each building a `Target` (TVM target
dicts, the device kind it runs on, its linker).

TVM 0.27 takes targets only as JSON dicts (`{"kind": "llvm", "mcpu": ...}`); the old
`"llvm -mcpu=..."` strings raise. A `Target` also says how its library is linked: the host C
compiler for the build machine's own architecture, otherwise a cross linker (the Debian cross g++
when installed, else `zig cc` from the `ziglang` pip package, the extra `graphopt[arm]`).

A target that cannot be had (an unknown name, a bad JSON target or CUDA architecture, no linker)
is a `TargetError`: bad input, exit code 2, raised by `resolve` before any work.

A new CPU variant is one row of `TARGETS`. A new device kind is a backend (graphopt.codegen.backends)
plus its rows here: its named targets in `TARGETS`, its TVM target kind in `_KINDS`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from graphopt.codegen import amx_permission
from graphopt.ir.errors import CodegenError

DEFAULT_CUDA_ARCH = "sm_80"
# Portable x86: runs on any x86-64 CPU, unlike `x86`, which uses every feature of the build machine.
GENERIC_X86 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64"}
_ARM = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
_ARM_DOTPROD = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]}
_CUDA_ARCH = re.compile(r"sm_\d{2,3}[a-z]?")
# platform.machine() spellings -> the architecture part of a target triple.
_MACHINES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
# The TVM target kinds a JSON target may name -> (the device kind, i.e. the backend, that runs it;
# the host target a device target gets when the JSON gives none).
_KINDS = {"llvm": ("cpu", None), "cuda": ("cuda", GENERIC_X86)}
# /proc/cpuinfo flag -> LLVM feature, for the instruction sets graphopt's kernels choose between.
_DISPATCH_FEATURES = {"avx512f": "avx512f", "avx512bw": "avx512bw", "avx512vl": "avx512vl",
                      "avx512_vnni": "avx512vnni", "avx_vnni": "avxvnni", "amx_tile": "amx-tile",
                      "amx_int8": "amx-int8", "amx_bf16": "amx-bf16"}
# The pip extra that installs zig, the aarch64 linker used when no Debian cross g++ is installed.
ZIG_EXTRA = "graphopt[arm]"


class TargetError(CodegenError):
    """A target that cannot be resolved or linked here: a usage error (exit code 2)."""

    exit_code = 2


@dataclass(frozen=True)
class Target:
    """A resolved target.

    `tvm` is the TVM JSON target dict; `host` the dict for the host side of a device target (CUDA
    launch code); `cross` describes the cross linker when the library is not for this machine's
    architecture (None when the host C compiler links it); `device` is the device kind, "cpu" or
    "cuda", which names the backend (`graphopt.codegen.backends.of`).
    """

    name: str
    tvm: dict
    host: dict | None
    cross: str | None
    device: str

    def tvm_target(self):
        """The `tvm.target.Target` for `tvm.compile`."""
        import tvm

        return tvm.target.Target(self.tvm, host=self.host) if self.host else tvm.target.Target(self.tvm)


# Builds a named target: (name, --cuda-arch or None) -> Target.
Factory = Callable[[str, str | None], Target]


@dataclass(frozen=True)
class NamedTarget:
    """One row of `TARGETS`: how the target is built, and a few words for `--target`'s help."""

    build: Factory
    summary: str


def _cpu(spec: dict | Callable[[], dict]) -> Factory:
    """The factory of a CPU target whose TVM dict is `spec`, or what `spec()` finds (when resolved:
    detecting the host's CPU imports TVM)."""

    def build(name: str, cuda_arch: str | None) -> Target:
        _no_cuda_arch(name, cuda_arch)
        tvm_dict = dict(spec() if callable(spec) else spec)
        return Target(name, tvm_dict, None, _cross_description(_triple_arch(tvm_dict), name), "cpu")

    return build


def _cuda(name: str, cuda_arch: str | None) -> Target:
    arch = cuda_arch or DEFAULT_CUDA_ARCH
    if not _CUDA_ARCH.fullmatch(arch):
        raise TargetError(f"CUDA architecture '{arch}' is not of the form sm_XY (e.g. sm_80, sm_90a)")
    return Target(name, {"kind": "cuda", "arch": arch}, dict(GENERIC_X86), _cross_description("x86_64", name),
                  "cuda")


def _detect_host() -> dict:
    import tvm

    arch = host_arch()
    if arch != "x86_64":
        raise TargetError(f"target x86 detects this machine's CPU, but this machine is {arch}; "
                           "use x86-64 for a generic x86 build")
    found = tvm.target.Target.from_device(tvm.cpu()).export()
    # The triple TVM reports is its own build's (e.g. x86_64-conda-linux-gnu); say what we link.
    spec = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": str(found["mcpu"])}
    return runnable_here(_with_cpuinfo_features(spec, _cpuinfo_flags()))


def _cpuinfo_flags() -> set[str]:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _with_cpuinfo_features(spec: dict, flags: set[str]) -> dict:
    """`spec` plus the instruction sets the kernels dispatch on that the CPU reports but its LLVM
    CPU name lacks. Under a hypervisor LLVM can name a Sapphire Rapids "rocketlake" (the model
    number is masked), which has no AMX: the flags Linux reports are what the CPU runs."""
    import tvm
    from tvm.target.codegen import target_has_features

    target = tvm.target.Target(spec)
    missing = [f"+{llvm}" for flag, llvm in _DISPATCH_FEATURES.items()
               if flag in flags and not target_has_features(llvm, target)]
    return {**spec, "mattr": [*spec.get("mattr", []), *missing]} if missing else spec


def runnable_here(spec: dict) -> dict:
    """`spec`, this machine's CPU, with AMX turned off where the CPU has it but Linux refuses it
    to this process (`amx_permission`): the library then gets the VNNI kernels, which run here."""
    import tvm
    from tvm.target.codegen import target_has_features

    if not target_has_features(["amx-tile", "amx-int8"], tvm.target.Target(spec)) or amx_permission.refusal() is None:
        return spec
    return {**spec, "mattr": [*spec.get("mattr", []), "-amx-tile", "-amx-int8", "-amx-bf16"]}


TARGETS: dict[str, NamedTarget] = {
    # The library uses every feature of the build machine's CPU (AVX-512, VNNI, ...) and runs only
    # on CPUs that have them.
    "x86": NamedTarget(_cpu(_detect_host), "this machine's CPU, every feature it has"),
    "x86-64": NamedTarget(_cpu(GENERIC_X86), "any x86-64 CPU"),
    "arm": NamedTarget(_cpu(_ARM), "aarch64 with NEON"),
    "arm-dotprod": NamedTarget(_cpu(_ARM_DOTPROD), "aarch64 with NEON and int8 dot products"),
    "cuda": NamedTarget(_cuda, f"an NVIDIA GPU of --cuda-arch, default {DEFAULT_CUDA_ARCH}"),
}
NAMES = tuple(TARGETS)


def describe() -> str:
    """The targets `resolve` takes, a few words each: the CLI's help for `--target`."""
    named = ", ".join(f"{name} ({row.summary})" for name, row in TARGETS.items())
    return f"{named}, or a TVM target as a JSON dict"


def resolve(name: str, cuda_arch: str | None = None) -> Target:
    """Resolve a target name (a key of `TARGETS`), or a raw JSON target dict given as a string.

    `cuda_arch` ("sm_80" unless given) applies only to the cuda target. Raises CodegenError for an
    unknown name, a bad JSON target, or an aarch64 target with no cross linker installed (all
    TargetError, exit code 2).
    """
    if not name.strip():
        raise TargetError(f"--target is empty: use one of {', '.join(TARGETS)}, or a TVM target as JSON")
    if name.lstrip().startswith("{"):
        _no_cuda_arch(name, cuda_arch)
        return _from_json(name)
    row = TARGETS.get(name)
    if row is None:
        raise TargetError(f"unknown target '{name}': use one of {', '.join(TARGETS)}, "
                           'or a TVM target as JSON, e.g. \'{"kind": "llvm", "mcpu": "skylake-avx512"}\'')
    return row.build(name, cuda_arch)


def _no_cuda_arch(name: str, cuda_arch: str | None) -> None:
    if cuda_arch is not None:
        raise TargetError(f"--cuda-arch {cuda_arch} applies only to the cuda target, not '{name}'")


def _from_json(text: str) -> Target:
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise TargetError(f"target is not valid JSON ({e.msg} at column {e.colno}): {text}") from None
    if not isinstance(spec, dict) or spec.get("kind") not in _KINDS:
        raise TargetError(f"a JSON target must be an object whose \"kind\" is one of "
                           f"{', '.join(_KINDS)}: {text}")
    device, default_host = _KINDS[spec["kind"]]
    host = spec.pop("host", None)
    _validate(spec, host, text)
    if host is None and default_host is not None:
        host = dict(default_host)
    digest = hashlib.sha256(json.dumps([spec, host], sort_keys=True).encode()).hexdigest()[:8]
    name = f"custom-{digest}"
    return Target(name, spec, host, _cross_description(_triple_arch(host or spec), name), device)


def _validate(spec: dict, host: dict | None, text: str) -> None:
    import tvm

    try:
        tvm.target.Target(spec, host=host) if host else tvm.target.Target(spec)
    except Exception as e:  # noqa: BLE001 - TVM raises several unrelated types for a bad target
        raise TargetError(f"TVM rejects the target {text}: {tvm_error_summary(e)}") from None


def tvm_error_summary(e: BaseException) -> str:
    """The line of a TVM error that says what is wrong: its last one (the rest is a C++ backtrace)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


def host_arch() -> str:
    """This machine's architecture as a triple spells it (x86_64, aarch64)."""
    machine = platform.machine().lower()
    return _MACHINES.get(machine, machine)


def missing_here(target: Target) -> list[str]:
    """The instruction sets graphopt's kernels dispatch on (AVX-512, VNNI, AMX) that an x86
    `target` has and this machine's CPU lacks: its library would die of SIGILL here."""
    flags = _cpuinfo_flags()
    if code_arch(target) != "x86_64" or host_arch() != "x86_64" or not flags:
        return []
    from tvm.target.codegen import target_has_features

    tvm_target = target.tvm_target()
    return [feature for flag, feature in _DISPATCH_FEATURES.items()
            if flag not in flags and target_has_features(feature, tvm_target)]


def code_arch(target: Target) -> str:
    """The architecture `target`'s CPU code is for (x86_64, aarch64)."""
    return _triple_arch(target.tvm)


def _triple_arch(tvm_dict: dict) -> str:
    triple = tvm_dict.get("mtriple")
    return triple.split("-")[0] if triple else host_arch()


def _cross_description(arch: str, name: str) -> str | None:
    """None when the host compiler links `arch`; otherwise the cross linker that will (found now,
    so that a missing one fails before any work)."""
    if arch == host_arch():
        return None
    return " ".join(_linker_command(arch, name)[0])


def fcompile(target: Target) -> Callable:
    """The `fcompile` for `export_library`: links the objects TVM wrote into one shared library."""
    arch = _triple_arch(target.host or target.tvm)
    command, triple = _linker_command(arch, target.name)
    return _Linker(command, triple)


def _linker_command(arch: str, name: str) -> tuple[list[str], str]:
    triple = f"{arch}-linux-gnu"
    if arch == host_arch():
        from tvm.support import cc

        native = cc.get_cc()
        if native:
            return [native], triple
    elif shutil.which(f"{triple}-g++"):
        return [f"{triple}-g++"], triple
    if importlib.util.find_spec("ziglang") is not None:
        # sys.executable: the ziglang package lives in this interpreter's environment.
        return [sys.executable, "-m", "ziglang", "cc", "-target", triple], triple
    if arch == host_arch():
        raise TargetError(f"--target {name}: no C compiler links {triple} libraries here: "
                          f"apt-get install g++ (or pip install ziglang)")
    # ziglang is an extra, not a dependency: it is a 400 MB wheel that only cross-compiling needs.
    raise TargetError(f"--target {name} links with zig: pip install '{ZIG_EXTRA}' "
                      f"(or apt-get install g++-{arch.replace('_', '-')}-linux-gnu)")


class _Linker:
    """Called by `export_library` as fcompile(output, objects, options)."""

    output_format = "so"

    def __init__(self, command: Sequence[str], triple: str):
        self.command, self.triple = list(command), triple

    def get_target_triple(self) -> str:
        return self.triple

    def __call__(self, output: str, objects: Sequence[str], options: Sequence[str] | None = None) -> None:
        cmd = [*self.command, "-shared", "-fPIC", "-o", output, *(options or ()), *objects]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CodegenError(f"linking {output} failed ({' '.join(self.command)} exited with "
                               f"{proc.returncode}):\n{(proc.stdout + proc.stderr).strip()}")
