"""Run a TVM Relax library's "main" inside the emulated aarch64 Python that tools/arm_env.py builds.

Usage: arm_runner.py LIB.so IN.npz OUT.npz [IN.npz OUT.npz ...]

Each IN.npz is one call: its arrays are passed in the order the file stores them (arr_0, arr_1, ...
from np.savez(*arrays), or named keys in the order they were saved). Outputs are saved to OUT.npz
as arr_0, arr_1, ... Several pairs share one process because starting Python and importing TVM
under qemu costs far more than one inference. The last stdout line is JSON with the seconds each
call took: emulation speed, never ARM speed.
"""
import json
import sys
import time

import numpy as np
import tvm
from tvm import relax


def _flatten(result: object) -> list[np.ndarray]:
    # A model with several outputs returns a (possibly nested) tuple of tensors.
    if isinstance(result, tvm.runtime.Tensor):
        return [result.numpy()]
    return [array for item in result for array in _flatten(item)]


def _load_inputs(path: str) -> list[tvm.runtime.Tensor]:
    with np.load(path) as npz:
        return [tvm.runtime.tensor(npz[key]) for key in npz.files]


def main(argv: list[str]) -> int:
    if len(argv) < 3 or len(argv) % 2 == 0:
        print(__doc__, file=sys.stderr)
        return 2
    lib_path, *pairs = argv
    vm = relax.VirtualMachine(tvm.runtime.load_module(lib_path), tvm.cpu())
    seconds = []
    for in_path, out_path in zip(pairs[::2], pairs[1::2]):
        args = _load_inputs(in_path)
        start = time.perf_counter()
        result = vm["main"](*args)
        seconds.append(time.perf_counter() - start)
        np.savez(out_path, *_flatten(result))
    print(json.dumps({"call_seconds": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
