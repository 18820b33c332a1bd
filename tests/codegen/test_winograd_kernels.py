"""WinogradConv (the winograd pass's emit="tvm" marker) compiled with TVM's Winograd kernels,
checked against onnxruntime running the marker's function body, the plain Conv."""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import codegen
from graphopt.codegen import build, cpu_schedules, measure, targets, tune, winograd
from graphopt.ir import ops, ort
from graphopt.ir.errors import CodegenError

# Max abs error against onnxruntime's direct conv, 32 channels, N(0, 1) inputs, He-scaled weights
# (outputs up to ~7): measured 2.9e-6 (F2), 1.1e-5 (F4), 4.7e-5 (F6); bounds about 7x that.
BOUNDS = {2: 2e-5, 4: 1e-4, 6: 5e-4}
DIRECT_BOUND = 1e-4


def _weights(rng, shape, bias: bool) -> dict[str, np.ndarray]:
    k, c = shape[0], shape[1]
    found = {"w": (rng.standard_normal(shape) * np.sqrt(2 / (c * 9))).astype(np.float32)}
    if bias:
        found["b"] = rng.standard_normal(k).astype(np.float32)
    return found


def _model(layers: list[tuple], x_shape: tuple, seed: int = 0) -> onnx.ModelProto:
    """Convs in a chain, each followed by Relu: layers are (filters, pads, bias, tile or None for a
    plain Conv)."""
    rng = np.random.default_rng(seed)
    nodes, inits, x, channels = [], [], "x", x_shape[1]
    for i, (filters, pads, bias, tile) in enumerate(layers):
        weights = _weights(rng, (filters, channels, 3, 3), bias)
        names = [f"{role}{i}" for role in weights]
        inits += [numpy_helper.from_array(v, n) for v, n in zip(weights.values(), names)]
        if tile is None:
            conv = helper.make_node("Conv", [x, *names], [f"c{i}"], kernel_shape=[3, 3], pads=list(pads))
        else:
            conv = helper.make_node(ops.WINOGRAD_CONV, [x, *names], [f"c{i}"], domain=ops.DOMAIN,
                                    pads=list(pads), tile=tile)
        nodes += [conv, helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        x, channels = f"r{i}", filters
    body = helper.make_node("Conv", ["X", "W", "B"], ["Y"], kernel_shape=[3, 3])
    body.attribute.append(helper.make_attribute_ref("pads", onnx.AttributeProto.INTS))
    function = helper.make_function(ops.DOMAIN, ops.WINOGRAD_CONV, ["X", "W", "B"], ["Y"], [body],
                                    [helper.make_opsetid("", 17)], attributes=["pads", "tile"])
    graph = helper.make_graph(nodes, "winograd", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, functions=[function],
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ops.DOMAIN, ops.DOMAIN_VERSION)])
    model.ir_version = 8
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    return model


def _compiled_error(model: onnx.ModelProto, folder, database=None) -> tuple[float, dict]:
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    result = codegen.compile(model, "x86", folder, database=database)
    out = codegen.load(result.library)(x)
    reference = ort.run(model, {"x": x})[model.graph.output[0].name]
    assert out.shape == reference.shape
    return float(np.abs(out - reference).max()), result.manifest["libraries"][result.library.name]


@pytest.mark.parametrize("tile", [2, 4, 6])
def test_marked_convs_match_onnxruntime(tile, tmp_path):
    # Batch 2, sizes no tile divides; with and without padding and bias.
    model = _model([(24, (1, 1, 1, 1), True, tile), (16, (0, 1, 0, 0), False, tile)], (2, 32, 13, 11))
    error, _ = _compiled_error(model, tmp_path)
    assert error < BOUNDS[tile]


def test_weight_transform_uses_topis_matrices():
    a, b, g = winograd.transform_matrices(4)
    assert a.shape == (6, 4) and b.shape == (6, 6) and g.shape == (6, 3)
    # A 1-D F(4, 3) through these matrices is the 3-tap correlation.
    rng = np.random.default_rng(0)
    d, w = rng.standard_normal(6), rng.standard_normal(3)
    assert np.allclose(a.T @ ((g @ w) * (b.T @ d)), np.correlate(d, w, "valid"))


def test_marked_and_plain_convs_compile_together(tmp_path):
    model = _model([(16, (1, 1, 1, 1), True, None), (16, (1, 1, 1, 1), True, 4), (8, (1, 1, 1, 1), False, None)],
                   (1, 8, 12, 12))
    error, _ = _compiled_error(model, tmp_path)
    assert error < max(BOUNDS[4], DIRECT_BOUND)


def test_bad_marker_is_refused():
    model = _model([(8, (1, 1, 1, 1), True, 3)], (1, 8, 8, 8))
    with pytest.raises(CodegenError, match="tile must be one of"):
        build.to_relax(model)


def test_marker_of_another_domain_is_not_graphopts(tmp_path):
    model = _model([(8, (1, 1, 1, 1), True, 4)], (1, 8, 8, 8))
    model.graph.node[0].domain = "com.example"
    with pytest.raises(CodegenError, match=rf"cannot convert node .*\({ops.WINOGRAD_CONV}\)"):
        build.check_supported(model)


def _blocks(kernel) -> tuple:
    from tvm import s_tir

    sch = s_tir.Schedule(kernel)
    return sch, sch.get_child_blocks(sch.get_sblock(kernel.body.block.name_hint))


def test_stages_are_tagged_at_conversion_and_scheduled_by_their_tags():
    model = _model([(16, (1, 1, 1, 1), True, 4)], (1, 16, 12, 12))
    lowered = build.lower_for_tuning(build.to_relax(model), targets.resolve("x86-64"))
    (kernel,) = [f for g, f in lowered.functions.items() if "winograd" in g.name_hint]
    # The tags survive fusing the bias and the Relu into the kernel.
    sch, blocks = _blocks(kernel)
    tags = {sch.get(b).name_hint: sch.get(b).annotations.get(cpu_schedules.KERNEL_TAG) for b in blocks}
    assert {name: tag for name, tag in tags.items() if tag is not None} == winograd.TAGS
    simd = cpu_schedules.Simd(lanes=4, registers=16)
    assert cpu_schedules.schedule(kernel, simd) is not None
    # Untagged, the same loop nest is a kernel of several reductions, which nothing schedules.
    for block in blocks:
        if cpu_schedules.KERNEL_TAG in sch.get(block).annotations:
            sch.unannotate(block, cpu_schedules.KERNEL_TAG)
    assert cpu_schedules.schedule(sch.mod["main"], simd) is None


@pytest.mark.slow  # a MetaSchedule run: 40 s on 2 cores
def test_tuning_records_winograd_and_applies(tmp_path):
    model = _model([(16, (1, 1, 1, 1), True, 4)], (1, 16, 12, 12))
    db = tmp_path / "db"
    # graphopt's default schedule first, then one batch of MetaSchedule's search.
    result = tune.tune(model, "x86", db, trials=5, seconds=60)
    assert result.tasks == 1 and result.trials_total >= 2
    workloads = (db / "database_workload.json").read_text().splitlines()
    records = [json.loads(line) for line in (db / "database_tuning_record.json").read_text().splitlines()]
    assert len(workloads) == 1 and len(records) == result.trials_total
    lowered = build.lower_for_tuning(build.to_relax(model), targets.resolve("x86"))
    assert [g.name_hint for g in lowered.functions if "winograd" in g.name_hint] == ["fused_winograd_f4x4_add_relu"]
    error, entry = _compiled_error(model, tmp_path / "out", database=db)
    assert entry["database"]["tuned"] == entry["database"]["kernels"] == 1
    assert error < BOUNDS[4]


def test_latency_measures_on_the_host():
    model = _model([(8, (1, 1, 1, 1), False, 2)], (1, 8, 10, 10))
    x = np.random.default_rng(0).standard_normal((1, 8, 10, 10)).astype(np.float32)
    assert measure.latency("x86")(model, {"x": x}) > 0


@pytest.mark.parametrize("target", ["cuda", targets.Target("aarch64", {"kind": "llvm", "mtriple": "aarch64-linux-gnu"},
                                                             None, "a cross linker", "cpu")])
def test_latency_refuses_targets_that_cannot_run_here(target):
    with pytest.raises(CodegenError, match="runs the model here"):
        measure.latency(target)
