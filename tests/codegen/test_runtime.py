from pathlib import Path

import numpy as np
import pytest

from graphopt import codegen
from graphopt.ir import ort
from graphopt.ir.errors import CodegenError, DataError
from graphopt.testing.check import rng_array
from graphopt.testing.tiny import model, node

MODELS = Path(__file__).resolve().parents[2] / "models"


def two_outputs():
    nodes = [node("MatMul", ["x", "w"], ["h"]), node("Relu", ["h"], ["relu"]), node("Sigmoid", ["h"], ["sig"])]
    return model(nodes, {"x": ("N", 4)}, {"relu": None, "sig": None}, {"w": rng_array((4, 3), 1)})


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    result = codegen.compile(two_outputs(), "x86-64", tmp_path_factory.mktemp("two"), name="two")
    return codegen.load(result.library)


def test_several_outputs_come_back_by_name(lib):
    x = rng_array((1, 4), 2)
    reference = ort.run(two_outputs(), {"x": x})
    for outputs in (lib(x), lib(x=x), lib.run({"x": x})):
        assert set(outputs) == {"relu", "sig"}
        for name, value in outputs.items():
            np.testing.assert_allclose(value, reference[name], rtol=1e-5, atol=1e-6)


def test_runs_share_no_buffers_with_the_caller_or_each_other(lib):
    """Inputs go to TVM as aligned copies and outputs come back as copies (both through DLPack)."""
    x = np.asfortranarray(rng_array((1, 4), 3))  # not C-contiguous, and not 64-byte aligned
    first = lib.run({"x": x})
    kept = {k: v.copy() for k, v in first.items()}
    x[:] = 100.0
    second = lib.run({"x": rng_array((1, 4), 4)})
    for name, value in first.items():
        assert value.flags.owndata or value.base is not None
        np.testing.assert_array_equal(value, kept[name])
        assert not np.array_equal(value, second[name])


@pytest.mark.parametrize("call, message", [
    (lambda lib: lib(np.zeros((1, 4), np.float64)), "float64, the model takes float32"),
    (lambda lib: lib(np.zeros((2, 4), np.float32)), r"built for \[1, 4\]"),
    (lambda lib: lib.run({"y": np.zeros((1, 4), np.float32)}), "missing.*unknown"),
    (lambda lib: lib(np.zeros((1, 4), np.float32), x=np.zeros((1, 4), np.float32)), "both"),
])
def test_inputs_are_checked(lib, call, message):
    with pytest.raises(DataError, match=message):
        call(lib)


def test_benchmark_returns_a_median_in_ms(lib):
    ms = lib.benchmark({"x": rng_array((1, 4), 2)}, repeat=5, warmup=1)
    assert 0 < ms < 1000


def test_load_a_folder_with_one_library(lib):
    assert codegen.load(lib.library.parent).library == lib.library


def test_library_for_another_cpu_is_refused(tmp_path):
    result = codegen.compile(MODELS / "digits_cnn.onnx", "arm", tmp_path)
    with pytest.raises(CodegenError, match="built for aarch64"):
        codegen.load(result.library)


def test_library_of_a_device_kind_without_a_backend_is_refused(tmp_path, lib):
    import json

    copy = tmp_path / lib.library.name
    copy.write_bytes(lib.library.read_bytes())
    described = json.loads((lib.library.parent / "manifest.json").read_text())
    described["libraries"][lib.library.name]["device"] = "metal"
    (tmp_path / "manifest.json").write_text(json.dumps(described))
    with pytest.raises(CodegenError, match="names device 'metal'"):
        codegen.load(copy)


def test_library_without_manifest(tmp_path, lib):
    copy = tmp_path / lib.library.name
    copy.write_bytes(lib.library.read_bytes())
    with pytest.raises(CodegenError, match="no manifest.json"):
        codegen.load(copy)


def test_cuda_library_needs_a_device(tmp_path):
    import tvm

    if tvm.cuda(0).exist:
        pytest.skip("a CUDA device is present")
    result = codegen.compile(MODELS / "digits_cnn.onnx", "cuda", tmp_path)
    with pytest.raises(CodegenError, match="no CUDA device"):
        codegen.load(result.library)


@pytest.mark.gpu
def test_cuda_matches_onnxruntime(tmp_path):
    digits = np.load(MODELS / "digits_test.npz")
    result = codegen.compile(MODELS / "digits_cnn.onnx", "cuda", tmp_path,
                             shapes={"x": list(digits["x"].shape)})
    logits = codegen.load(result.library)(digits["x"])
    reference = ort.run(str(MODELS / "digits_cnn.onnx"), {"x": digits["x"]})["logits"]
    assert np.abs(logits - reference).max() < 1e-3
    assert (logits.argmax(1) == reference.argmax(1)).all()


def test_a_library_rebuilt_at_the_same_path_is_loaded_anew(tmp_path):
    """The dynamic loader returns the library it already loaded for a path; graphopt loads a
    rebuilt one from a copy, so its numbers are the new model's."""
    x = rng_array((1, 4), 2)
    for weights_seed in (1, 7):
        onnx_model = model([node("MatMul", ["x", "w"], ["y"])], {"x": (1, 4)}, {"y": None},
                           {"w": rng_array((4, 3), weights_seed)})
        built = codegen.compile(onnx_model, "x86-64", tmp_path, name="same")
        got = codegen.load(built.library)(x)
        np.testing.assert_allclose(got, ort.run(onnx_model, {"x": x})["y"], rtol=1e-5, atol=1e-6)
