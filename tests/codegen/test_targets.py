import json

import pytest

from graphopt.codegen import targets
from graphopt.codegen.targets import fcompile, resolve
from graphopt.ir.errors import CodegenError


def test_named_targets():
    assert resolve("x86").tvm["mcpu"] not in ("", "x86-64")  # the build machine's CPU, detected
    assert resolve("x86-64").tvm == {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64"}
    arm = resolve("arm")
    assert (arm.tvm["mtriple"], arm.tvm["mattr"], arm.device) == ("aarch64-linux-gnu", ["+neon"], "cpu")
    assert "+dotprod" in resolve("arm-dotprod").tvm["mattr"]
    cuda = resolve("cuda")
    assert (cuda.tvm, cuda.device, cuda.host["kind"]) == ({"kind": "cuda", "arch": "sm_80"}, "cuda", "llvm")
    assert resolve("cuda", cuda_arch="sm_90a").tvm["arch"] == "sm_90a"


def test_unknown_target_lists_the_names():
    with pytest.raises(CodegenError, match="unknown target 'riscv'.*x86, x86-64, arm, arm-dotprod, cuda"):
        resolve("riscv")


@pytest.mark.parametrize("name, arch, message", [
    ("cuda", "80", "sm_XY"),
    ("x86", "sm_80", "only to the cuda target"),
])
def test_bad_cuda_arch(name, arch, message):
    with pytest.raises(CodegenError, match=message):
        resolve(name, cuda_arch=arch)


def test_raw_json_target():
    spec = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+fullfp16"]}
    target = resolve(json.dumps(spec))
    assert target.tvm == spec and target.device == "cpu" and target.name.startswith("custom-")
    assert target.cross is not None  # aarch64 from an x86 machine needs the cross linker
    assert resolve(json.dumps(spec)).name == target.name  # the name is stable, for the file name


@pytest.mark.parametrize("text, message", [
    ("{nope", "not valid JSON"),
    ('{"kind": "metal"}', "kind"),
    ('{"kind": "llvm", "mcpu": 3}', "TVM rejects"),
])
def test_bad_json_target(text, message):
    with pytest.raises(CodegenError, match=message):
        resolve(text)


def test_missing_cross_linker_says_how_to_install(monkeypatch):
    monkeypatch.setattr(targets.shutil, "which", lambda name: None)
    monkeypatch.setattr(targets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CodegenError, match=r"--target arm links with zig: pip install 'graphopt\[arm\]' "
                                           r"\(or apt-get install g\+\+-aarch64-linux-gnu\)") as e:
        resolve("arm")
    assert e.value.exit_code == 2


def test_cross_linker_prefers_debian_gcc(monkeypatch):
    monkeypatch.setattr(targets.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert fcompile(resolve("arm")).command == ["aarch64-linux-gnu-g++"]


def test_names_and_help_come_from_the_table():
    assert targets.NAMES == tuple(targets.TARGETS)
    help_text = targets.describe()
    for name, row in targets.TARGETS.items():
        assert f"{name} ({row.summary})" in help_text
    assert "JSON" in help_text


def test_a_new_cpu_variant_is_one_table_row(monkeypatch):
    spec = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+i8mm"]}
    monkeypatch.setitem(targets.TARGETS, "arm-i8mm", targets.NamedTarget(targets._cpu(spec), "aarch64 with i8mm"))
    target = resolve("arm-i8mm")
    assert (target.name, target.tvm, target.device, target.host) == ("arm-i8mm", spec, "cpu", None)
    assert target.cross is not None
    assert "arm-i8mm (aarch64 with i8mm)" in targets.describe()
    with pytest.raises(CodegenError, match="only to the cuda target"):
        resolve("arm-i8mm", cuda_arch="sm_80")
    with pytest.raises(CodegenError, match="unknown target 'riscv'.*arm-i8mm"):
        resolve("riscv")


def test_json_cuda_target_gets_generic_x86_host_code():
    target = resolve('{"kind": "cuda", "arch": "sm_90"}')
    assert (target.device, target.host) == ("cuda", targets.GENERIC_X86)
    with pytest.raises(CodegenError, match="only to the cuda target"):
        resolve('{"kind": "cuda", "arch": "sm_90"}', cuda_arch="sm_90")
