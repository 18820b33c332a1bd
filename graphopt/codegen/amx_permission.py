"""Linux's permission to use AMX tiles, which a process must request before its first tile
instruction: `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)` (Linux 5.16 and later). Without
it, the first tile instruction kills the process with SIGILL. The permission holds for the whole
process, TVM's worker threads included (Documentation/arch/x86/xstate.rst).

Where it is refused (a kernel older than 5.16, a CPU without AMX) graphopt does not run AMX code,
in two places:

- building for `x86` (this machine's CPU) turns AMX off in the target when this process is refused
  it (`targets`), so the library gets the VNNI kernels and runs here;
- loading a library whose manifest records AMX kernels (`int8_instruction: "amx"`, a library built
  for another machine or an explicit Sapphire Rapids target) requests the permission first and,
  refused, raises one CodegenError saying why and how to rebuild.

Not a library with both kernels and a switch at run time: that doubles every int8 kernel's code
and build time for a case (an AMX CPU under a pre-5.16 kernel) that rebuilding for `x86` on the
machine covers, and a library built for `x86` already fits the machine it is built on.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
from pathlib import Path

from graphopt.ir.errors import CodegenError

_SYS_ARCH_PRCTL = 158          # x86-64 syscall number
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18
_CPUINFO = Path("/proc/cpuinfo")


@functools.cache
def refusal() -> str | None:
    """None once Linux grants this process AMX tile data (requested on the first call), else why
    not, as a clause ("this CPU has no AMX-INT8")."""
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return f"AMX needs Linux on x86-64, not {platform.system()} on {platform.machine()}"
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.syscall(ctypes.c_long(_SYS_ARCH_PRCTL), ctypes.c_long(_ARCH_REQ_XCOMP_PERM),
                          ctypes.c_long(_XFEATURE_XTILEDATA))
    if result == 0:
        return None
    code = ctypes.get_errno()
    if not cpu_has_amx():
        return "this CPU has no AMX-INT8"
    if code == errno.ENOSPC:
        return ("Linux refuses AMX tile data to this process: a thread's signal stack (sigaltstack) is too "
                "small for the tile state")
    error = os.strerror(code)
    return (f"Linux refuses AMX tile data to this process (arch_prctl ARCH_REQ_XCOMP_PERM: {error}; "
            "it needs Linux 5.16 or newer)")


def cpu_has_amx() -> bool:
    """Whether /proc/cpuinfo lists AMX tiles and AMX-INT8."""
    flags = _CPUINFO.read_text() if _CPUINFO.is_file() else ""
    return "amx_tile" in flags and "amx_int8" in flags


def require(library: Path) -> None:
    """Request AMX for this process before `library`, which runs AMX kernels, is loaded; a
    CodegenError, not a SIGILL at its first call, where Linux refuses it."""
    reason = refusal()
    if reason is not None:
        raise CodegenError(f"{library} runs int8 kernels on Intel AMX, but {reason}: rebuild it on this "
                           "machine with --target x86, which leaves AMX out where it cannot run")
