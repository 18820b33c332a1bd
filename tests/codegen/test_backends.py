"""One backend per device kind: each target's backend says where its libraries run, and the build,
runtime and deploy code asks it rather than branching on the device."""
import pytest

from graphopt import deploy
from graphopt.codegen import backends, targets
from graphopt.codegen.targets import resolve


def test_every_target_has_the_backend_of_its_device_kind():
    kinds = {device for device, _ in targets._KINDS.values()}
    assert set(backends.BACKENDS) == kinds
    for name in targets.TARGETS:
        target = resolve(name)
        assert backends.of(target).device == target.device


def test_cpu_libraries_run_and_are_timed_on_this_architecture_only():
    here, arm = resolve("x86-64"), resolve("arm")
    assert backends.of(here).cannot_run_here(here) is None and backends.of(here).can_time_here(here)
    assert "built for aarch64" in backends.of(arm).cannot_run_here(arm)
    assert not backends.of(arm).can_time_here(arm)
    assert deploy.target_timer(arm) is None and deploy.target_timer(here) is not None


def test_x86_libraries_for_instructions_this_cpu_lacks_are_not_run(monkeypatch):
    from graphopt.codegen import targets

    cascadelake = resolve('{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "cascadelake"}')
    monkeypatch.setattr(targets, "_cpuinfo_flags", lambda: {"sse4_2", "avx2", "fma"})
    assert "avx512vnni" in backends.of(cascadelake).cannot_run_here(cascadelake)
    assert not backends.of(cascadelake).can_time_here(cascadelake)
    assert backends.of(here := resolve("x86-64")).cannot_run_here(here) is None
    monkeypatch.setattr(targets, "_cpuinfo_flags", lambda: set(targets._DISPATCH_FEATURES) | {"avx2"})
    assert backends.of(cascadelake).cannot_run_here(cascadelake) is None


def test_cuda_libraries_are_not_timed_and_need_a_gpu():
    import tvm

    cuda = resolve("cuda")
    assert not backends.of(cuda).can_time_here(cuda) and deploy.target_timer(cuda) is None
    if tvm.cuda(0).exist:
        pytest.skip("a CUDA device is present")
    assert "no GPU" in backends.of(cuda).cannot_run_here(cuda)
