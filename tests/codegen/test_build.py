import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import codegen
from graphopt.codegen import build, targets
from graphopt.ir import ort
from graphopt.ir.errors import CodegenError

MODELS = Path(__file__).resolve().parents[2] / "models"
DIGITS = MODELS / "digits_cnn.onnx"
ELF_AARCH64 = 183
FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)


@pytest.fixture(scope="module")
def digits():
    return np.load(MODELS / "digits_test.npz")


@pytest.fixture(scope="module")
def x86(tmp_path_factory):
    return codegen.compile(DIGITS, "x86", tmp_path_factory.mktemp("x86"))


def test_x86_library_and_manifest(x86):
    assert x86.library.name == "model.x86.so" and x86.library.is_file()
    assert sorted(p.name for p in x86.library.parent.iterdir()) == ["manifest.json", "model.x86.so"]
    on_disk = json.loads(x86.manifest_path.read_text())
    assert on_disk == x86.manifest
    assert on_disk["model_sha256"] == hashlib.sha256(DIGITS.read_bytes()).hexdigest()
    assert on_disk["inputs"] == [{"name": "x", "shape": [1, 1, 8, 8], "dtype": "float32"}]
    assert on_disk["outputs"] == [{"name": "logits", "shape": [1, 10], "dtype": "float32"}]
    entry = on_disk["libraries"]["model.x86.so"]
    assert entry["tvm_target"] == targets.resolve("x86").tvm and entry["device"] == "cpu"
    assert entry["tvm_version"].startswith("0.27") and entry["tvm_ffi_version"] and entry["graphopt_version"]
    assert entry["database"] is None and entry["cuda_device_code"] is None


def test_x86_matches_onnxruntime_on_the_test_set(x86, digits):
    lib = codegen.load(x86.library)
    reference = ort.run(onnx.load(DIGITS), {"x": digits["x"]})["logits"]
    compiled = np.concatenate([lib(x[None]) for x in digits["x"]])
    assert np.abs(compiled - reference).max() < 1e-4
    assert (compiled.argmax(1) == reference.argmax(1)).all()


def test_shapes_override_compiles_a_batch(tmp_path, digits):
    batch = len(digits["x"])
    result = codegen.compile(DIGITS, "x86-64", tmp_path, shapes={"x": [batch, 1, 8, 8]})
    logits = codegen.load(result.library)(digits["x"])
    reference = ort.run(onnx.load(DIGITS), {"x": digits["x"]})["logits"]
    assert logits.shape == (batch, 10) and np.abs(logits - reference).max() < 1e-4


@pytest.mark.parametrize("shapes, message", [
    ({"y": [1, 1, 8, 8]}, "not model inputs"),
    ({"x": [1, 2, 8, 8]}, "does not fit"),
])
def test_bad_shapes(tmp_path, shapes, message):
    with pytest.raises(CodegenError, match=message):
        codegen.compile(DIGITS, "x86-64", tmp_path, shapes=shapes)


def test_arm_library_is_an_aarch64_elf(tmp_path):
    result = codegen.compile(DIGITS, "arm", tmp_path)
    header = result.library.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and struct.unpack_from("<H", header, 18)[0] == ELF_AARCH64
    assert result.manifest["libraries"]["model.arm.so"]["linker"] == targets.resolve("arm").cross


def test_targets_share_one_manifest(tmp_path):
    codegen.compile(DIGITS, "x86-64", tmp_path)
    result = codegen.compile(DIGITS, "arm", tmp_path)
    assert set(result.manifest["libraries"]) == {"model.x86-64.so", "model.arm.so"}


def test_cuda_builds_without_a_gpu(tmp_path):
    result = codegen.compile(DIGITS, "cuda", tmp_path)
    entry = result.manifest["libraries"]["model.cuda.so"]
    assert entry["device"] == "cuda" and entry["tvm_target"]["arch"] == "sm_80"
    data = result.library.read_bytes()
    if targets.shutil.which("nvcc"):
        # Compiled device code, and not the CUDA source the device would otherwise compile.
        assert entry["cuda_device_code"] == "fatbin"
        assert FATBIN_MAGIC in data and b"__global__" not in data
    else:
        assert entry["cuda_device_code"] == "source" and b"__global__" in data


def test_raw_json_target(tmp_path, digits):
    spec = json.dumps({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"})
    result = codegen.compile(DIGITS, spec, tmp_path)
    target = targets.resolve(spec)
    assert result.library.name == f"model.{target.name}.so"
    assert result.manifest["libraries"][result.library.name]["tvm_target"]["mcpu"] == "haswell"
    assert codegen.load(result.library)(digits["x"][:1]).shape == (1, 10)


def unsupported_model():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])
    node = helper.make_node("Col2Im", ["x", "shape", "block"], ["y"], name="fold")
    shape = numpy_helper.from_array(np.array([4, 4], np.int64), "shape")
    block = numpy_helper.from_array(np.array([1, 1], np.int64), "block")
    graph = helper.make_graph([node], "unsupported", [x], [y], initializer=[shape, block])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_unsupported_op_names_the_node(tmp_path):
    with pytest.raises(CodegenError, match=r"node 'fold' \(Col2Im\)"):
        codegen.compile(unsupported_model(), "x86-64", tmp_path)
    assert not any(tmp_path.iterdir())


def test_unknown_target(tmp_path):
    with pytest.raises(CodegenError, match="unknown target"):
        codegen.compile(DIGITS, "tpu", tmp_path)


def test_failed_link_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "fcompile", lambda target: targets._Linker(["false"], "x86_64-linux-gnu"))
    with pytest.raises(CodegenError, match="linking"):
        codegen.compile(DIGITS, "x86-64", tmp_path)
    assert not any(tmp_path.iterdir())


def test_missing_database(tmp_path):
    with pytest.raises(CodegenError, match="no MetaSchedule database"):
        codegen.compile(DIGITS, "x86-64", tmp_path / "out", database=tmp_path)


def handmade_database(folder: Path, target, kernels: int) -> None:
    """A database with a trivial schedule (outer loop parallel) for the first few kernels, as a
    tuner would leave it, without spending minutes tuning."""
    from tvm.s_tir import Schedule
    from tvm.s_tir import meta_schedule as ms

    lowered = build.lower_for_tuning(build.to_relax(onnx.load(DIGITS)), target)
    folder.mkdir()
    database = ms.database.JSONDatabase(work_dir=str(folder))
    for task in ms.relax_integration.extract_tasks(lowered, target.tvm_target())[:kernels]:
        workload = task.dispatched[0]
        schedule = Schedule(workload)
        last = schedule.get_child_blocks(schedule.get_sblock("root"))[-1]
        schedule.parallel(schedule.get_loops(last)[0])
        database.commit_tuning_record(ms.database.TuningRecord(
            schedule.trace, database.commit_workload(workload), [1e-3], target.tvm_target(),
            ms.arg_info.ArgInfo.from_prim_func(workload["main"])))


def test_database_schedules_are_applied(tmp_path, digits):
    target = targets.resolve("x86-64")
    handmade_database(tmp_path / "db", target, kernels=3)
    result = codegen.compile(DIGITS, target, tmp_path / "out", database=tmp_path / "db")
    used = result.manifest["libraries"]["model.x86-64.so"]["database"]
    assert used == {"path": str((tmp_path / "db").resolve()), "kernels": 8, "tuned": 3}  # NHWC lowering adds a layout transpose
    reference = ort.run(onnx.load(DIGITS), {"x": digits["x"][:1]})["logits"]
    assert np.abs(codegen.load(result.library)(digits["x"][:1]) - reference).max() < 1e-4


def test_a_converter_failure_names_the_node_and_prints_nothing(tmp_path, capfd):
    x = helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 4, 8, 8])
    w = helper.make_tensor_value_info("w", TensorProto.INT8, [4, 4, 3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.UINT8, None)
    scalars = [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
               numpy_helper.from_array(np.array(128, np.uint8), "z"),
               numpy_helper.from_array(np.array(0, np.int8), "wz")]
    nodes = [helper.make_node("QLinearConv", ["x", "s", "z", "w", "s", "wz", "s", "z"], ["h"], name="first", pads=[1] * 4),
             helper.make_node("Identity", ["h"], ["y"], name="id")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x, w], [y], initializer=scalars),
                              opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(CodegenError, match=r"node 'first' \(QLinearConv\).*w must be an initializer"):
        codegen.compile(model, "x86-64", tmp_path)
    assert capfd.readouterr().out == ""
    assert not any(tmp_path.iterdir())
