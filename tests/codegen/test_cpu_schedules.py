"""graphopt's default CPU pipeline: libraries agree with onnxruntime, and the convolution and
matmul kernels really are scheduled (vectorized, parallel), for x86 and aarch64 alike."""
from pathlib import Path

import numpy as np
import onnx
import pytest

from graphopt import codegen
from graphopt.codegen import build, cpu_pipeline, cpu_schedules, targets
from graphopt.ir import ort
from graphopt.testing import builders
from graphopt.testing.tiny import model, node

MODELS = Path(__file__).resolve().parents[2] / "models"
DIGITS = MODELS / "digits_cnn.onnx"
MAX_RELATIVE_ERROR = 1e-4
SCHEDULED = "tirx.is_scheduled"


def _weight(*shape: int) -> np.ndarray:
    return np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32) * 0.3


def _feeds(proto: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32)
            for name, shape in build.static_shapes(proto, {}).items()}


def _relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got - expected).max()) / max(float(np.abs(expected).max()), 1e-30)


def _assert_matches_onnxruntime(proto: onnx.ModelProto, out_dir: Path) -> None:
    feeds = _feeds(proto)
    expected = ort.run(proto, feeds)
    got = codegen.load(codegen.compile(proto, "x86", out_dir).library).run(feeds)
    for name, value in expected.items():
        assert got[name].shape == value.shape
        assert _relative_error(got[name], value) < MAX_RELATIVE_ERROR, name


def _kernels(proto: onnx.ModelProto, target: str) -> dict:
    """The model's TIR kernels by name, after the default pipeline's scheduling passes."""
    import tvm

    resolved = targets.resolve(target)
    with resolved.tvm_target():
        mod = tvm.transform.Sequential(cpu_pipeline.schedule_passes(resolved))(build.to_relax(proto))
    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


def _loop_kinds(func) -> set:
    import tvm_ffi
    from tvm import tirx

    kinds = set()
    tvm_ffi.structural_walk(func.body, (tirx.For, lambda loop: kinds.add(loop.kind)), order="post")
    return kinds


# -- numerics --------------------------------------------------------------------------------
SINGLE_OPS = {
    # Odd sizes: no tile divides them evenly into whole vectors.
    "conv-stride2-odd": model([node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1], strides=[2, 2])],
                              {"x": (1, 5, 13, 11)}, {"y": None}, {"w": _weight(10, 5, 3, 3), "b": _weight(10)}),
    "conv-dilated-batch2": model([node("Conv", ["x", "w"], ["y"], pads=[2, 2, 2, 2], dilations=[2, 2])],
                                 {"x": (2, 8, 16, 16)}, {"y": None}, {"w": _weight(24, 8, 3, 3)}),
    "conv-depthwise": model([node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], group=32)],
                            {"x": (1, 32, 14, 14)}, {"y": None}, {"w": _weight(32, 1, 3, 3)}),
    "conv-1x1": model([node("Conv", ["x", "w"], ["y"])], {"x": (1, 64, 7, 7)}, {"y": None},
                      {"w": _weight(48, 64, 1, 1)}),
    "gemm-transB": model([node("Gemm", ["x", "w", "b"], ["y"], transB=1)], {"x": (4, 100)}, {"y": None},
                         {"w": _weight(30, 100), "b": _weight(30)}),
    "matmul-batched": model([node("MatMul", ["x", "z"], ["y"])], {"x": (2, 3, 16, 8), "z": (2, 3, 8, 20)},
                            {"y": None}),
    "maxpool": model([node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])],
                     {"x": (1, 16, 15, 15)}, {"y": None}),
    # Tiled (`_schedule_transpose`), and one whose output axis is too short to tile.
    "transpose-to-nhwc": model([node("Transpose", ["x"], ["y"], perm=[0, 2, 3, 1])], {"x": (1, 48, 20, 24)},
                               {"y": None}),
    "transpose-to-nchw-odd": model([node("Transpose", ["x"], ["y"], perm=[0, 3, 1, 2])], {"x": (2, 9, 11, 32)},
                                   {"y": None}),
}


@pytest.mark.parametrize("name", SINGLE_OPS)
def test_single_operators_match_onnxruntime(name, tmp_path):
    _assert_matches_onnxruntime(SINGLE_OPS[name], tmp_path)


def test_resnet_with_batchnorm_and_residuals_matches_onnxruntime(tmp_path):
    _assert_matches_onnxruntime(builders.resnet(blocks=(1, 1), width=16, image=32), tmp_path)


def test_mlp_and_transformer_match_onnxruntime(tmp_path):
    _assert_matches_onnxruntime(builders.mlp(), tmp_path / "mlp")
    _assert_matches_onnxruntime(builders.transformer(), tmp_path / "transformer")


def test_digits_batch_matches_onnxruntime_on_the_test_set(tmp_path):
    x = np.load(MODELS / "digits_test.npz")["x"]
    result = codegen.compile(DIGITS, "x86", tmp_path, shapes={"x": list(x.shape)})
    logits = codegen.load(result.library)(x)
    expected = ort.run(onnx.load(DIGITS), {"x": x})["logits"]
    assert _relative_error(logits, expected) < MAX_RELATIVE_ERROR
    assert (logits.argmax(1) == expected.argmax(1)).all()


# -- scheduling ------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["x86", "arm"])
def test_conv_and_matmul_kernels_are_scheduled_vectorized_and_parallel(target):
    from tvm import tirx

    kernels = _kernels(builders.resnet(blocks=(1, 1), width=16, image=56), target)
    contractions = {name: f for name, f in kernels.items() if "conv2d" in name or "matmul" in name}
    assert len(contractions) == 7  # six convolutions and the classifier
    for name, func in contractions.items():
        assert func.attrs[SCHEDULED], name
        assert {tirx.ForKind.VECTORIZED, tirx.ForKind.UNROLLED} <= _loop_kinds(func), name
    # All but the 1x1 shortcut convolution, too small to be worth waking the thread pool.
    parallel = [name for name, f in contractions.items() if tirx.ForKind.PARALLEL in _loop_kinds(f)]
    assert len(parallel) == 5 and all("conv2d" in name for name in parallel)
    # BatchNorm is folded into each convolution's epilogue, not a kernel of its own.
    assert not [name for name in kernels if "batch_norm" in name]


def test_convolutions_are_channels_last():
    kernels = _kernels(builders.resnet(blocks=(1,), width=16, image=8), "x86")
    assert [name for name in kernels if name.startswith("transpose")]  # NCHW -> NHWC at the input
    conv = next(f for name, f in kernels.items() if "conv2d" in name)
    assert "conv2d_nhwc" in conv.script()


def test_dropout_does_not_keep_the_digits_cnn_in_nchw():
    # TVM's ConvertLayout rejects dropout; the pipeline rewrites it to the identity first.
    kernels = _kernels(onnx.load(DIGITS), "x86")
    convs = [f for name, f in kernels.items() if "conv2d" in name]
    assert len(convs) == 3 and all(f.attrs[SCHEDULED] and "conv2d_nhwc" in f.script() for f in convs)


def test_a_failing_layout_conversion_leaves_scheduled_nchw_kernels(monkeypatch, tmp_path):
    import tvm

    def convert_layout_that_fails(_layouts):
        @tvm.transform.module_pass(opt_level=0)
        def fail(_mod, _ctx):
            raise tvm.error.InternalError("Check failed: as TVM 0.27's ConvertLayout can")
        return fail

    monkeypatch.setattr(tvm.relax.transform, "ConvertLayout", convert_layout_that_fails)
    proto = builders.resnet(blocks=(1,), width=16, image=16)
    convs = [f for name, f in _kernels(proto, "x86").items() if "conv2d" in name]
    assert convs and all(f.attrs[SCHEDULED] and "conv2d_nchw" in f.script() for f in convs)
    _assert_matches_onnxruntime(proto, tmp_path)


def test_kernels_a_database_scheduled_are_left_alone(tmp_path):
    """A tuned build: `apply_database` returns lowered kernels, those it found marked scheduled;
    the default schedules fill in the rest and the library still matches onnxruntime."""
    import tvm
    from tvm import relax

    proto = builders.resnet(blocks=(1,), width=16, image=16)
    target = targets.resolve("x86")
    lowered = build.lower_for_tuning(build.to_relax(proto), target)
    tuned = next(gv for gv, f in lowered.functions_items() if "conv2d" in gv.name_hint)
    lowered[tuned] = lowered[tuned].with_attr(SCHEDULED, True)
    with target.tvm_target():
        scheduled = tvm.transform.Sequential(cpu_pipeline.schedule_passes(target))(lowered)
    # Its loops as they were (TVM's AnnotateTIROpPattern adds an attribute, as it does everywhere).
    tvm.ir.assert_structural_equal(scheduled[tuned.name_hint].body, lowered[tuned].body)
    others = [f for gv, f in scheduled.functions_items() if "conv2d" in gv.name_hint and gv != tuned]
    assert others and all(f.attrs[SCHEDULED] for f in others)

    executable = tvm.compile(lowered, target=target.tvm_target(), relax_pipeline=cpu_pipeline.pipeline(target))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    feeds = _feeds(proto)
    got = vm["main"](*[tvm.runtime.tensor(v) for v in feeds.values()]).numpy()
    assert _relative_error(got, ort.run(proto, feeds)["output"]) < MAX_RELATIVE_ERROR


# -- choices ---------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, lanes, registers", [
    ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512"}, 16, 32),
    ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"}, 8, 16),
    ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64"}, 4, 16),
    ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}, 4, 32),
])
def test_simd_unit_follows_the_target(spec, lanes, registers):
    import tvm

    assert cpu_schedules.simd_of(tvm.target.Target(spec)) == cpu_schedules.Simd(lanes, registers)


@pytest.mark.parametrize("vectors, rows, budget", [(4, 56, 28), (7, 64, 28), (1, 13, 12), (16, 1, 28), (3, 5, 4)])
def test_register_block_divides_the_extents_within_the_budget(vectors, rows, budget):
    v, r = cpu_schedules._register_block(vectors, rows, budget)
    assert vectors % v == 0 and rows % r == 0 and v * r <= budget


def test_register_block_prefers_two_vectors_per_row():
    # 64 output channels of 16 lanes, 56 output columns, AVX-512's 28 accumulators.
    assert cpu_schedules._register_block(4, 56, 28) == (2, 14)
