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
    # Epilogues that branch and join again (SiLU, exact Gelu) and one that broadcasts (an
    # excitation gate, per channel, over the image), fused into one kernel each.
    "conv-silu": model([node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), node("Sigmoid", ["c"], ["s"]),
                        node("Mul", ["c", "s"], ["y"])], {"x": (1, 8, 14, 14)}, {"y": None},
                       {"w": _weight(32, 8, 3, 3), "b": _weight(32)}),
    "matmul-gelu": model([node("MatMul", ["x", "w"], ["m"]), node("Div", ["m", "r2"], ["d"]), node("Erf", ["d"], ["e"]),
                          node("Add", ["e", "one"], ["f"]), node("Mul", ["m", "f"], ["g"]), node("Mul", ["g", "half"], ["y"])],
                         {"x": (1, 16, 48)}, {"y": None},
                         {"w": _weight(48, 64), "r2": np.float32(2 ** 0.5), "one": np.float32(1), "half": np.float32(0.5)}),
    "excitation-gate": model([node("Conv", ["x", "v"], ["a"]), node("GlobalAveragePool", ["a"], ["p"]),
                              node("Conv", ["p", "w", "b"], ["q"]), node("Sigmoid", ["q"], ["g"]),
                              node("Mul", ["a", "g"], ["y"])],
                             {"x": (1, 16, 28, 28)}, {"y": None},
                             {"v": _weight(32, 16, 1, 1), "w": _weight(32, 32, 1, 1), "b": _weight(32)}),
    "softmax-tanh-exp": model([node("Softmax", ["x"], ["s"], axis=-1), node("Tanh", ["x"], ["t"]), node("Exp", ["x"], ["e"]),
                               node("Add", ["s", "t"], ["u"]), node("Add", ["u", "e"], ["y"])],
                              {"x": (2, 12, 40)}, {"y": None}),
    # Weights of 1 MB and more, packed at compile time (`weight_packing`).
    "conv-packed-strided": model([node("Conv", ["x", "w", "b"], ["y"], pads=[1, 2, 1, 0], strides=[2, 1],
                                       dilations=[1, 2])], {"x": (1, 128, 9, 10)}, {"y": None},
                                 {"w": _weight(256, 128, 3, 3), "b": _weight(256)}),
    "matmul-packed": model([node("MatMul", ["x", "w"], ["y"])], {"x": (2, 5, 512)}, {"y": None},
                           {"w": _weight(512, 544)}),
    "gemm-transB-packed": model([node("Gemm", ["x", "w", "b"], ["y"], transB=1)], {"x": (3, 600)}, {"y": None},
                                {"w": _weight(512, 600), "b": _weight(512)}),
    # ReLU6 as opset 13 writes it (bounds as inputs; a NaN bound is none) and as opset 6 did.
    "conv-relu6": model([node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), node("Clip", ["c", "lo", "hi"], ["y"])],
                        {"x": (1, 8, 10, 10)}, {"y": None},
                        {"w": _weight(16, 8, 3, 3), "lo": np.float32(0), "hi": np.float32(6)}),
    # Hard swish spelled out, scalar constants on every elementwise operator; and HardSwish itself.
    "conv-hard-swish": model([node("Conv", ["x", "w"], ["c"]), node("Add", ["c", "three"], ["a"]),
                              node("Clip", ["a", "lo", "hi"], ["r"]), node("Div", ["r", "six"], ["d"]),
                              node("Mul", ["c", "d"], ["y"])], {"x": (1, 8, 10, 10)}, {"y": None},
                             {"w": _weight(16, 8, 1, 1), "three": np.float32(3), "six": np.float32(6),
                              "lo": np.float32(0), "hi": np.float32(6)}),
    "conv-hardswish-op": model([node("Conv", ["x", "w"], ["c"]), node("HardSwish", ["c"], ["y"])],
                               {"x": (1, 8, 10, 10)}, {"y": None}, {"w": _weight(16, 8, 1, 1)}),
    "clip-nan-bound": model([node("Clip", ["x", "lo", "hi"], ["y"])], {"x": (2, 3, 5)}, {"y": None},
                            {"lo": np.float32(np.nan), "hi": np.float32(0.5)}),
    "clip-opset6": model([node("Clip", ["x"], ["y"], min=-0.25, max=0.5)], {"x": (2, 3, 5)}, {"y": None}, opset=6),
    # ReLU6 as lower-int8 writes it, and Max/Min of several broadcasting inputs.
    "conv-max-min": model([node("Conv", ["x", "w"], ["c"]), node("Max", ["c", "lo"], ["m"]),
                           node("Min", ["m", "hi"], ["y"])], {"x": (1, 8, 6, 6)}, {"y": None},
                          {"w": _weight(16, 8, 1, 1), "lo": np.float32(0), "hi": np.float32(6)}),
    "max-min-variadic": model([node("Max", ["x", "z", "v"], ["m"]), node("Min", ["m", "x"], ["y"])],
                              {"x": (2, 3, 5), "z": (3, 1), "v": (5,)}, {"y": None}),
    "clip-run-time-bound": model([node("Clip", ["x", "lo"], ["y"])], {"x": (2, 3, 5), "lo": ()}, {"y": None}),
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


def test_branching_and_broadcasting_epilogues_are_fused_into_scheduled_parallel_kernels():
    from tvm import tirx

    for name in ("conv-silu", "matmul-gelu", "excitation-gate"):
        kernels = _kernels(SINGLE_OPS[name], "x86")
        # The epilogue is in the contraction's kernel.
        contraction = [f for k, f in kernels.items() if ("conv2d" in k or "matmul" in k) and "multiply" in k]
        assert len(contraction) == 1, (name, list(kernels))
        assert contraction[0].attrs[SCHEDULED], name
        assert tirx.ForKind.VECTORIZED in _loop_kinds(contraction[0]), name
    gate = next(f for k, f in _kernels(SINGLE_OPS["excitation-gate"], "x86").items() if "conv2d" in k and "multiply" in k)
    # The gate's matmul is 32 x 32 MACs: only its multiply over the image is worth the threads.
    assert tirx.ForKind.PARALLEL in _loop_kinds(gate)


def test_large_constant_weights_are_packed_once_and_their_kernels_scheduled():
    for name in ("conv-packed-strided", "matmul-packed", "gemm-transB-packed"):
        packed = {k: f for k, f in _kernels(SINGLE_OPS[name], "x86").items() if "packed" in k}
        assert len(packed) == 1 and next(iter(packed.values())).attrs[SCHEDULED], name
    small = _kernels(SINGLE_OPS["conv-1x1"], "x86")
    assert not [k for k in small if "packed" in k]  # 12 KB of weights stay as they are


@pytest.mark.parametrize("name", ["conv-relu6", "conv-hard-swish", "conv-hardswish-op", "conv-max-min"])
def test_clipping_activations_are_the_convolutions_epilogue(name):
    """Their scalar bounds do not stop the layout conversion: no transposes around them."""
    kernels = _kernels(SINGLE_OPS[name], "x86")
    assert len([k for k in kernels if "conv2d" in k]) == 1 and len(kernels) == 3, list(kernels)


def test_transcendental_functions_are_polynomials_that_vectorize():
    """No libm call per lane: exp, sigmoid, tanh, erf and softmax reach LLVM as arithmetic."""
    for name in ("conv-silu", "matmul-gelu", "softmax-tanh-exp"):
        for kernel, func in _kernels(SINGLE_OPS[name], "x86").items():
            script = func.script()
            assert not any(f"T.{fn}(" in script for fn in ("exp", "sigmoid", "tanh", "erf")), (name, kernel)


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
