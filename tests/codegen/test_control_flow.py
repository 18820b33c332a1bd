"""graphopt's ONNX Loop converter (TVM 0.27's frontend has none): each library agrees with
onnxruntime on every output, for several trip counts and conditions fed at run time to one build."""
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import codegen
from graphopt.codegen import build
from graphopt.ir import ort
from graphopt.ir.errors import CodegenError

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
FLOAT, INT64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL


def info(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def body_graph(nodes, carried, scans=(), initializers=()):
    """A Loop body: inputs i, cond and `carried` [(name, dtype, shape)]; outputs cond_out, the
    carried values' next names (name + "_next") and `scans` [(name, dtype, shape)]."""
    return helper.make_graph(
        nodes, "body",
        [info("i", INT64, []), info("cond", BOOL, []), *(info(n, t, s) for n, t, s in carried)],
        [info("cond_out", BOOL, []), *(info(f"{n}_next", t, s) for n, t, s in carried),
         *(info(n, t, s) for n, t, s in scans)],
        list(initializers))


def loop_model(body, loop_inputs, graph_inputs, outputs, before=(), initializers=()):
    """A graph of `before` nodes, then Loop(*loop_inputs) with `body`, returning `outputs`
    [(name, dtype, shape)] (its outputs, in order)."""
    loop = helper.make_node("Loop", loop_inputs, [n for n, _, _ in outputs], name="the_loop", body=body)
    graph = helper.make_graph([*before, loop], "loop", [info(*i) for i in graph_inputs],
                              [info(*o) for o in outputs], list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
    onnx.checker.check_model(model, full_check=True)
    return model


def library(model, tmp_path):
    return codegen.load(codegen.compile(model, "x86", tmp_path).library)


def assert_agrees(lib, model, feeds):
    reference = ort.run(model, feeds)
    outputs = lib.run(feeds)
    assert set(outputs) == set(reference)
    for name, expected in reference.items():
        assert outputs[name].shape == expected.shape, name
        np.testing.assert_allclose(outputs[name], expected, **TOLERANCE, err_msg=name)


def const(name, value, dtype):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value, dtype), name))


def random(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def counter_body(*cond_nodes):
    """x_next = x * 0.5 + w + i (w an outer-scope graph input), scan s = x_next * i, and the
    condition `cond_nodes` compute."""
    nodes = [const("half", 0.5, np.float32),
             helper.make_node("Cast", ["i"], ["fi"], to=FLOAT),
             helper.make_node("Mul", ["x", "half"], ["xh"]),
             helper.make_node("Add", ["xh", "w"], ["xw"]),
             helper.make_node("Add", ["xw", "fi"], ["x_next"]),
             helper.make_node("Mul", ["x_next", "fi"], ["s"]), *cond_nodes]
    return body_graph(nodes, [("x", FLOAT, [2, 3])], [("s", FLOAT, [2, 3])])


COUNTER_OUTPUTS = [("x_final", FLOAT, [2, 3]), ("s_all", FLOAT, ["n", 2, 3])]


def test_trip_count_only_runs_any_count_fed_at_run_time(tmp_path):
    body = counter_body(helper.make_node("Identity", ["cond"], ["cond_out"]))
    model = loop_model(body, ["M", "", "x0"], [("M", INT64, []), ("x0", FLOAT, [2, 3]), ("w", FLOAT, [2, 3])],
                       COUNTER_OUTPUTS)
    lib = library(model, tmp_path)
    for trips in [0, 1, 2, 5, 13]:
        assert_agrees(lib, model, {"M": np.array(trips, np.int64), "x0": random(2, 3), "w": random(2, 3, seed=1)})


def test_condition_only_stops_where_the_body_says(tmp_path):
    # cond_out = i + 1 < limit: `limit` iterations, an outer-scope value the loop reads.
    body = counter_body(const("one", 1, np.int64), helper.make_node("Add", ["i", "one"], ["i_plus"]),
                        helper.make_node("Less", ["i_plus", "limit"], ["cond_out"]))
    model = loop_model(body, ["", "go", "x0"], [("go", BOOL, []), ("x0", FLOAT, [2, 3]), ("w", FLOAT, [2, 3]),
                                               ("limit", INT64, [])], COUNTER_OUTPUTS)
    lib = library(model, tmp_path)
    for go, limit in [(True, 1), (True, 4), (True, 9), (False, 4)]:
        assert_agrees(lib, model, {"go": np.array(go), "x0": random(2, 3), "w": random(2, 3, seed=2),
                                   "limit": np.array(limit, np.int64)})


def test_trip_count_and_condition_whichever_ends_first(tmp_path):
    # The condition depends on the carried data: continue while sum(x_next) < 20.
    body = counter_body(const("bound", 20.0, np.float32),
                        helper.make_node("ReduceSum", ["x_next"], ["total"], keepdims=0),
                        helper.make_node("Less", ["total", "bound"], ["cond_out"]))
    model = loop_model(body, ["M", "go", "x0"], [("M", INT64, []), ("go", BOOL, []), ("x0", FLOAT, [2, 3]),
                                                ("w", FLOAT, [2, 3])], COUNTER_OUTPUTS)
    lib = library(model, tmp_path)
    w = np.full((2, 3), 0.25, np.float32)
    for trips, go in [(3, True), (50, True), (50, False), (0, True)]:
        assert_agrees(lib, model, {"M": np.array(trips, np.int64), "go": np.array(go), "x0": random(2, 3), "w": w})


def test_neither_trip_count_nor_condition_runs_until_the_body_stops(tmp_path):
    body = counter_body(helper.make_node("Less", ["i", "limit"], ["cond_out"]))
    model = loop_model(body, ["", "", "x0"], [("x0", FLOAT, [2, 3]), ("w", FLOAT, [2, 3]), ("limit", INT64, [])],
                       COUNTER_OUTPUTS)
    lib = library(model, tmp_path)
    for limit in [0, 3, 6]:
        assert_agrees(lib, model, {"x0": random(2, 3), "w": random(2, 3, seed=3), "limit": np.array(limit, np.int64)})


def test_outer_values_computed_and_constant_layers_in_the_body(tmp_path):
    # The body reads a value computed before the loop (scale), a main-graph weight (a MatMul
    # layer), an input, and its own initializer; two carried values; a scan output of another shape.
    scale = helper.make_node("Mul", ["w", "w"], ["scale"])
    nodes = [helper.make_node("MatMul", ["h", "weight"], ["hw"]),
             helper.make_node("Mul", ["hw", "scale"], ["hs"]),
             helper.make_node("Tanh", ["hs"], ["h_next"]),
             helper.make_node("Add", ["count", "step"], ["count_next"]),
             helper.make_node("ReduceMax", ["h_next"], ["peak"], axes=[1], keepdims=0),
             helper.make_node("Identity", ["cond"], ["cond_out"])]
    body = body_graph(nodes, [("h", FLOAT, [3, 4]), ("count", INT64, [])], [("peak", FLOAT, [3])],
                      [numpy_helper.from_array(np.array(2, np.int64), "step")])
    weight = numpy_helper.from_array(random(4, 4, seed=4), "weight")
    model = loop_model(body, ["M", "", "h0", "zero"],
                       [("M", INT64, []), ("h0", FLOAT, [3, 4]), ("w", FLOAT, [4])],
                       [("h_final", FLOAT, [3, 4]), ("count_final", INT64, []), ("peaks", FLOAT, ["n", 3])],
                       before=[scale, const("zero", 0, np.int64)], initializers=[weight])
    lib = library(model, tmp_path)
    for trips in [0, 1, 6]:
        assert_agrees(lib, model, {"M": np.array(trips, np.int64), "h0": random(3, 4), "w": random(4, seed=5)})


def test_a_carried_value_that_grows_gets_a_symbolic_dim(tmp_path):
    # tokens_next = Concat(tokens, row): (1, 2) growing by a row each iteration.
    nodes = [const("rows", [0], np.int64), helper.make_node("ReduceSum", ["tokens", "rows"], ["total"], keepdims=1),
             helper.make_node("Concat", ["tokens", "total"], ["tokens_next"], axis=0),
             helper.make_node("Identity", ["cond"], ["cond_out"])]
    body = body_graph(nodes, [("tokens", FLOAT, ["t", 2])])
    model = loop_model(body, ["M", "", "start"], [("M", INT64, []), ("start", FLOAT, [1, 2])],
                       [("tokens_final", FLOAT, ["t", 2])])
    lib = library(model, tmp_path)
    for trips in [0, 1, 4]:
        assert_agrees(lib, model, {"M": np.array(trips, np.int64), "start": np.array([[0.5, -0.25]], np.float32)})


def test_if_inside_the_body(tmp_path):
    # The frontend's If, in a loop body: add w on even iterations, subtract it on odd ones.
    add = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y_then"])], "then", [],
                            [info("y_then", FLOAT, [2, 3])])
    sub = helper.make_graph([helper.make_node("Sub", ["x", "w"], ["y_else"])], "else", [],
                            [info("y_else", FLOAT, [2, 3])])
    nodes = [const("two", 2, np.int64), const("zero", 0, np.int64),
             helper.make_node("Mod", ["i", "two"], ["parity"]),
             helper.make_node("Equal", ["parity", "zero"], ["even"]),
             helper.make_node("If", ["even"], ["x_next"], then_branch=add, else_branch=sub),
             helper.make_node("Identity", ["cond"], ["cond_out"])]
    body = body_graph(nodes, [("x", FLOAT, [2, 3])], [("x_next_copy", FLOAT, [2, 3])])
    body.node.append(helper.make_node("Identity", ["x_next"], ["x_next_copy"]))
    model = loop_model(body, ["M", "", "x0"], [("M", INT64, []), ("x0", FLOAT, [2, 3]), ("w", FLOAT, [2, 3])],
                       COUNTER_OUTPUTS)
    lib = library(model, tmp_path)
    for trips in [0, 3, 4]:
        assert_agrees(lib, model, {"M": np.array(trips, np.int64), "x0": random(2, 3), "w": random(2, 3, seed=6)})


def test_nested_loops(tmp_path):
    # The inner loop runs i + 1 times (i: the outer iteration number) adding w * i, reading w from
    # the main graph and i (as float) from the outer body; the outer loop scans its result.
    inner_nodes = [helper.make_node("Mul", ["w", "fi"], ["wi"]), helper.make_node("Add", ["y", "wi"], ["y_next"]),
                   helper.make_node("Identity", ["cond"], ["cond_out"])]
    inner = body_graph(inner_nodes, [("y", FLOAT, [3])])
    inner.input[0].name, inner.input[1].name = "j", "inner_cond"
    inner.node[2].input[0] = "inner_cond"
    inner.output[0].name = "cond_out_inner"
    inner.node[2].output[0] = "cond_out_inner"
    outer_nodes = [const("one", 1, np.int64), helper.make_node("Add", ["i", "one"], ["inner_trips"]),
                   helper.make_node("Cast", ["i"], ["fi"], to=FLOAT),
                   helper.make_node("Loop", ["inner_trips", "", "x"], ["x_next"], body=inner),
                   helper.make_node("Identity", ["x_next"], ["seen"]),
                   helper.make_node("Identity", ["cond"], ["cond_out"])]
    body = body_graph(outer_nodes, [("x", FLOAT, [3])], [("seen", FLOAT, [3])])
    model = loop_model(body, ["M", "", "x0"], [("M", INT64, []), ("x0", FLOAT, [3]), ("w", FLOAT, [3])],
                       [("x_final", FLOAT, [3]), ("all", FLOAT, ["n", 3])])
    lib = library(model, tmp_path)
    for trips in [0, 1, 4]:
        assert_agrees(lib, model, {"M": np.array(trips, np.int64), "x0": random(3), "w": random(3, seed=7)})


def test_many_iterations_do_not_exhaust_the_stack(tmp_path):
    # Plain tail recursion in the Relax VM overflows the native stack within 5,000 iterations.
    body = counter_body(helper.make_node("Identity", ["cond"], ["cond_out"]))
    model = loop_model(body, ["M", "", "x0"], [("M", INT64, []), ("x0", FLOAT, [2, 3]), ("w", FLOAT, [2, 3])],
                       COUNTER_OUTPUTS)
    lib = library(model, tmp_path)
    assert_agrees(lib, model, {"M": np.array(20000, np.int64), "x0": random(2, 3), "w": random(2, 3, seed=8)})


def test_a_carried_value_changing_rank_is_refused_naming_the_node():
    nodes = [const("axes", [0], np.int64), helper.make_node("Unsqueeze", ["x", "axes"], ["x_next"]),
             helper.make_node("Identity", ["cond"], ["cond_out"])]
    body = helper.make_graph(nodes, "body", [info("i", INT64, []), info("cond", BOOL, []), info("x", FLOAT, None)],
                             [info("cond_out", BOOL, []), info("x_next", FLOAT, None)])
    loop = helper.make_node("Loop", ["M", "", "x0"], ["x_final"], name="the_loop", body=body)
    graph = helper.make_graph([loop], "g", [info("M", INT64, []), info("x0", FLOAT, [3])],
                              [info("x_final", FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
    with pytest.raises(CodegenError, match=r"node 'the_loop' \(Loop\): its loop-carried value 0 enters as "
                                           r"float32 of rank 1 and leaves the body as float32 of rank 2"):
        build.to_relax(model)


@pytest.mark.slow  # as the corpus's torch models are: they must be built first (docs/corpus.md)
def test_the_corpus_greedy_decoder(tmp_path):
    # torch.jit.script's export: M = INT64_MAX, the condition `steps > 0` then the body's own
    # (an If inside the body stops at token 0); a GRU-like cell of Gemm layers in the body.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "corpus"))
    import corpus_lib

    entry = corpus_lib.by_id("torch-greedy-decoder")
    try:
        model = onnx.load(str(corpus_lib.fetch(entry)))
    except corpus_lib.Unavailable as e:
        pytest.skip(str(e))
    feeds = corpus_lib.samples(entry)
    lib = codegen.load(codegen.compile(model, "x86", tmp_path, shapes={k: v.shape for k, v in feeds.items()}).library)
    for steps in [0, 1, 5, 40]:
        assert_agrees(lib, model, {**feeds, "steps": np.array(steps, np.int64)})
