"""Fuzzing the command line in-process (issue 17): mutated model bytes, random small graphs and
random pass specs. Whatever the input: exit 0, 1, 2 or 4, one line on stderr on error, no
traceback, nothing written outside OUTDIR and the input untouched. Bounded to about a minute."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto as T
from onnx import helper as h

from graphopt.cli import main
from graphopt.passes import registry

MODEL = os.path.join(os.path.dirname(__file__), "..", "models", "digits_cnn.onnx")
FUZZ = settings(max_examples=80, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _run(tmp_path, capsys, model_bytes: bytes, *argv: str) -> None:
    """One CLI call on `model_bytes` in a fresh folder, with every property checked."""
    work = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
    work.mkdir()
    model = work / "m.onnx"
    model.write_bytes(model_bytes)
    before = sorted(p.name for p in work.iterdir())
    code = main(["optimize", str(model), "-o", str(work / "out"), "-q", *argv])
    err = capsys.readouterr().err
    assert code in (0, 1, 2, 4), err
    assert "Traceback" not in err
    if code:
        assert len(err.strip().splitlines()) == 1, err
    assert model.read_bytes() == model_bytes
    assert sorted(p.name for p in work.iterdir() if p.name != "out") == before


@pytest.fixture(scope="module")
def digits() -> bytes:
    with open(MODEL, "rb") as f:
        return f.read()


@FUZZ
@given(data=st.data())
def test_mutated_model_bytes(tmp_path, capsys, digits, data):
    raw = bytearray(digits)
    for _ in range(data.draw(st.integers(1, 8))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        i = data.draw(st.integers(0, len(raw) - 1))
        if kind == "flip":
            raw[i] ^= data.draw(st.integers(1, 255))
        elif kind == "cut":
            del raw[i:i + data.draw(st.integers(1, 64))]
        else:
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=16))
        if not raw:
            raw = bytearray(b"\0")
    _run(tmp_path, capsys, bytes(raw), "--passes", "canonicalize", "--no-verify")


UNARY = ["Relu", "Sigmoid", "Tanh", "Abs", "Neg", "Exp", "Log", "Sqrt", "Softmax", "Flatten", "Identity",
         "Transpose", "Reshape", "MaxPool", "AveragePool", "Conv", "MatMul", "Gemm", "Concat", "Dropout"]


def _graph(data) -> bytes:
    """A one-to-three node graph over x: float[1, 4, 6, 6], ops and attributes random."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    nodes, inits, current = [], [], "x"
    ints = st.lists(st.integers(-2, 4), min_size=1, max_size=5)
    for i in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(UNARY))
        out = f"t{i}"
        inputs, attrs = [current], {}
        if op in ("Conv", "MaxPool", "AveragePool"):
            attrs = {k: data.draw(ints) for k in data.draw(st.sets(st.sampled_from(
                ["kernel_shape", "pads", "strides", "dilations"])))}
            if op == "Conv":
                shape = data.draw(st.lists(st.integers(1, 4), min_size=2, max_size=5))
                inits.append(onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), f"w{i}"))
                inputs.append(f"w{i}")
            elif "kernel_shape" not in attrs:
                attrs["kernel_shape"] = [2, 2]
        elif op in ("MatMul", "Gemm"):
            shape = data.draw(st.lists(st.integers(1, 6), min_size=1, max_size=4))
            inits.append(onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), f"w{i}"))
            inputs.append(f"w{i}")
        elif op == "Reshape":
            target = np.array(data.draw(st.lists(st.integers(-2, 150), min_size=1, max_size=4)), np.int64)
            inits.append(onnx.numpy_helper.from_array(target, f"s{i}"))
            inputs.append(f"s{i}")
        elif op == "Transpose":
            attrs["perm"] = data.draw(st.lists(st.integers(-1, 4), min_size=1, max_size=5))
        elif op in ("Softmax", "Flatten", "Concat"):
            attrs["axis"] = data.draw(st.integers(-5, 5))
            if op == "Concat":
                inputs.append(current)
        nodes.append(h.make_node(op, inputs, [out], name=f"n{i}", **attrs))
        current = out
    nodes.append(h.make_node("Identity", [current], ["y"], name="out"))
    output = h.make_tensor_value_info("y", T.FLOAT, None)
    output.type.tensor_type.shape.SetInParent()
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 4, 6, 6])], [output], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", data.draw(st.sampled_from([11, 13, 17, 99])))])
    model.ir_version = 8
    return model.SerializeToString()


@FUZZ
@given(data=st.data())
def test_random_small_graphs(tmp_path, capsys, data):
    _run(tmp_path, capsys, _graph(data), "--passes", "canonicalize")


NAMES = [cls.name for cls in registry.BUILTIN]
VALUES = st.one_of(st.integers(-3, 10), st.floats(-2, 2), st.just("nan"), st.booleans(),
                   st.sampled_from(["'x'", "none", "a|b", "conv*", ")", "(", "=", "1e999"]))


@st.composite
def _spec(draw) -> str:
    items = []
    for _ in range(draw(st.integers(1, 2))):
        name = draw(st.one_of(st.sampled_from(NAMES), st.text(max_size=8)))
        options = draw(st.lists(st.tuples(st.sampled_from(["rank", "ratio", "energy", "sparsity", "include",
                                                          "method", "bits", "max_rounds", "zz"]), VALUES),
                                max_size=2))
        body = ",".join(f"{k}={v}" for k, v in options)
        items.append(f"{name}({body})" if options else name)
    return ",".join(items)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(spec=_spec())
def test_random_pass_specs(tmp_path, capsys, digits, spec):
    _run(tmp_path, capsys, digits, "--passes", spec)
