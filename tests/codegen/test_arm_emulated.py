"""The digits CNN built for aarch64 runs under qemu-user and agrees with onnxruntime on x86.

Needs the environment from `python tools/arm_env.py setup`; run with `pytest -m arm_emulated`.
"""
from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import pytest

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "models" / "digits_cnn.onnx"
DATA = REPO / "models" / "digits_test.npz"
ARM_ENV_SCRIPT = REPO / "tools" / "arm_env.py"
SAMPLES = 16  # startup under qemu dominates; more samples add little evidence
ATOL = 1e-4


def _load_arm_env() -> ModuleType:
    # tools/ is a folder of scripts, not a package.
    spec = importlib.util.spec_from_file_location("arm_env", ARM_ENV_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


arm_env = _load_arm_env()

pytestmark = [
    pytest.mark.arm_emulated,
    pytest.mark.skipif(
        not arm_env.is_ready(),
        reason=f"no emulated aarch64 environment in {arm_env.env_dir()} "
        "(run `python tools/arm_env.py setup`, or set GRAPHOPT_ARM_ENV)",
    ),
]


def _codegen_compile():
    if importlib.util.find_spec("graphopt.codegen") is None:
        return None
    return getattr(importlib.import_module("graphopt.codegen"), "compile", None)


def _zig_cc(output: str, objects: list[str], options: list[str] | None = None) -> None:
    # tvm.support.cc.cross_compiler wraps a single executable; zig needs `cc -target ...` first.
    cmd = [sys.executable, "-m", "ziglang", "cc", "-target", "aarch64-linux-gnu", "-shared", "-fPIC",
           "-o", output, *(options or []), *objects]
    subprocess.run(cmd, check=True)


def _cross_build_with_tvm(out_dir: Path) -> Path:
    """Build the library with TVM directly, for as long as graphopt.codegen has no compile()."""
    pytest.importorskip("ziglang", reason="pip install 'graphopt[arm]': zig is the aarch64 linker")
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    model = onnx.load(MODEL)
    # The runner feeds one sample per call; a static batch lets TVM specialise every kernel.
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    mod = from_onnx(model, keep_params_in_input=False)
    target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
    lib = out_dir / "digits_cnn.so"
    tvm.compile(mod, target=target).export_library(str(lib), fcompile=_zig_cc)
    return lib


@pytest.fixture(scope="module")
def arm_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("arm")
    compile_ = _codegen_compile()
    if compile_ is None:
        return _cross_build_with_tvm(out_dir)
    compile_(str(MODEL), "arm", out_dir)
    libs = sorted(out_dir.glob("*.so"))
    assert len(libs) == 1, f"expected one .so in {out_dir}, found {libs}"
    return libs[0]


def test_arm_library_matches_onnxruntime(arm_lib: Path) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = np.load(DATA)[name][:SAMPLES]
    expected = np.concatenate([session.run(None, {name: x[i:i + 1]})[0] for i in range(SAMPLES)])

    emulated = arm_env.run_many(arm_lib, [[x[i:i + 1]] for i in range(SAMPLES)])
    got = np.concatenate([outputs[0] for outputs in emulated.outputs])

    assert got.shape == expected.shape
    np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))
    assert np.abs(got - expected).max() < ATOL


def test_check_command_reports_agreement(arm_lib: Path) -> None:
    cmd = [sys.executable, str(ARM_ENV_SCRIPT), "check", str(MODEL), str(arm_lib), "--data", str(DATA),
           "--samples", str(SAMPLES), "--dir", str(arm_env.env_dir())]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"argmax agreement {SAMPLES}/{SAMPLES}" in proc.stdout
