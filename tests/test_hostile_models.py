"""Hostile and malformed inputs (issue 17): each is one line naming the file, the node or input and
what is wrong, with exit 2 (bad input) or 1 (a pass failed), never an internal error (3)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import graphopt
from graphopt.cli import main
from graphopt.ir.errors import bounded
from graphopt.passes.manager import PassManager
from graphopt.passes.pipeline import Pipeline

F = T.FLOAT


def _model(nodes, inputs, outputs=None, inits=(), opset=13, functions=()):
    outputs = outputs or [h.make_tensor_value_info("y", F, None)]
    for o in outputs:
        o.type.tensor_type.shape.SetInParent()  # rank unknown, but declared, as the checker wants
    graph = h.make_graph(nodes, "g", inputs, outputs, list(inits))
    imports = [h.make_opsetid("", opset)] + [h.make_opsetid("local", 1)] * bool(functions)
    m = h.make_model(graph, opset_imports=imports, functions=list(functions))
    m.ir_version = 8
    return m


def _x(*shape, dtype=F, name="x"):
    return h.make_tensor_value_info(name, dtype, list(shape))


def _cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return code, err


def _optimize(tmp_path, capsys, model, *extra):
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    return _cli(capsys, "optimize", path, "-o", tmp_path / "out", "-q", *extra)


def test_a_huge_input_dim_is_refused_before_allocating(tmp_path, capsys):
    code, err = _optimize(tmp_path, capsys, _model([h.make_node("Relu", ["x"], ["y"], name="r")], [_x(1, 2**40)]))
    assert code == 2 and "input 'x'" in err and "TiB" in err and "--input-shape" in err and "--data" in err


def _nan_weight_models():
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    w[3, 5] = np.nan
    gemm = _model([h.make_node("Gemm", ["x", "W"], ["y"], name="fc", transB=1)], [_x(1, 64)],
                  inits=[nh.from_array(w, "W")])
    k = np.random.default_rng(1).standard_normal((16, 8, 3, 3)).astype(np.float32)
    k[0, 0, 0, 0] = np.inf
    conv = _model([h.make_node("Conv", ["x", "K"], ["y"], name="conv", pads=[1, 1, 1, 1])], [_x(1, 8, 8, 8)],
                  inits=[nh.from_array(k, "K")])
    return [(gemm, "factorize-svd(rank=4)", "fc"), (conv, "factorize-tucker(rank=4)", "conv")]


@pytest.mark.parametrize("model,spec,node", _nan_weight_models(), ids=["svd", "tucker"])
def test_b_factorize_refuses_nan_inf_weights(tmp_path, model, spec, node):
    onnx.save(model, str(tmp_path / "m.onnx"))
    graph = graphopt.load(tmp_path / "m.onnx")
    record, = PassManager(Pipeline.parse(spec), verify=False).run(graph)
    assert not record.modified
    assert [(r.node, r.reason) for r in record.refused] == [(node, f"weight '{node and graph.nodes[0].inputs[1].name}' "
                                                                     "holds NaN/Inf")]


def _relu(shape=("N", 4), op="Relu"):
    return _model([h.make_node(op, ["x"], ["y"], name="r")], [_x(*shape)])


def test_c_nan_in_data_names_the_input(tmp_path, capsys):
    x = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
    x[2, 1] = np.nan
    np.savez(tmp_path / "data.npz", x=x)
    code, err = _optimize(tmp_path, capsys, _relu(), "--data", tmp_path / "data.npz")
    assert code == 2 and "data.npz: input 'x' holds NaN at index [2, 1]" in err


def test_c_original_output_nan_is_refused_before_any_pass(tmp_path, capsys):
    code, err = _optimize(tmp_path, capsys, _relu(op="Sqrt"))  # random normal inputs: sqrt of negatives
    assert code == 2 and "original model's output 'y' holds NaN/Inf" in err
    assert not (tmp_path / "out").exists()


def test_c_a_pass_that_turns_outputs_nan_fails(tmp_path):
    from graphopt.ir import ort
    from graphopt.ir.errors import VerificationError
    from graphopt.passes.base import EXACT, Pass, PassInfo, PassResult
    from graphopt.passes.manager import FidelityInstrument

    class Poison(Pass):
        name = "poison"
        info = PassInfo(semantics=EXACT)

        def run(self, graph, ctx=None):
            graph.nodes[0].op = "Sqrt"
            return PassResult(True)

    onnx.save(_relu(shape=(2, 4), op="Abs"), str(tmp_path / "m.onnx"))
    graph = graphopt.load(tmp_path / "m.onnx")
    feeds = {"x": -np.ones((2, 4), np.float32)}
    reference = ort.run(graph, feeds)
    graph.nodes[0].op = "Neg"  # the pass below turns Neg(Abs) into Sqrt of negatives
    with pytest.raises(VerificationError, match="pass 'poison' turned output 'y' NaN/Inf"):
        PassManager([Poison()], verify=False, instruments=(FidelityInstrument(reference, feeds, enforce=False),)
                    ).run(graph)


def test_d_empty_data_is_refused(tmp_path, capsys):
    np.savez(tmp_path / "data.npz", x=np.zeros((0, 4), np.float32))
    code, err = _optimize(tmp_path, capsys, _relu(), "--data", tmp_path / "data.npz")
    assert code == 2 and err.endswith("data.npz: input 'x' has 0 samples (shape [0, 4])")


def test_d_data_shape_mismatch_names_input_and_dim(tmp_path, capsys):
    np.savez(tmp_path / "data.npz", x=np.zeros((16, 5), np.float32))
    code, err = _optimize(tmp_path, capsys, _relu(), "--data", tmp_path / "data.npz")
    assert code == 2 and err.endswith("data.npz: input 'x': dim 1 is 5, the model wants 4")


def _conv(weight_shape=(4, 8, 3, 3), **attrs):
    return _model([h.make_node("Conv", ["x", "K"], ["y"], name="conv", **attrs)], [_x(1, 8, 8, 8)],
                  inits=[nh.from_array(np.ones(weight_shape, np.float32), "K")])


def _reshape(target, shape=(2, 6)):
    return _model([h.make_node("Reshape", ["x", "s"], ["y"], name="rs")], [_x(*shape)],
                  inits=[nh.from_array(np.array(target, np.int64), "s")])


def _product(op, w_shape, **attrs):
    return _model([h.make_node(op, ["x", "W"], ["y"], name="mm", **attrs)], [_x(2, 6)],
                  inits=[nh.from_array(np.ones(w_shape, np.float32), "W")])


MALFORMED = {
    "reshape-count": (_reshape([5, 5]), "node 'rs' (Reshape): input 'x' of shape [2, 6] (12 elements) cannot be reshaped"),
    "reshape-two-minus-one": (_reshape([-1, -1]), "node 'rs' (Reshape): shape [-1, -1] has more than one -1"),
    "reshape-minus-one-misfit": (_reshape([5, -1]), "node 'rs' (Reshape): input 'x' of shape [2, 6]"),
    "conv-rank-3-weight": (_conv((4, 8, 3)), "node 'conv' (Conv): weight 'K' has rank 3 but input 'x' has rank 4"),
    "conv-kernel-0": (_conv(kernel_shape=[0, 3]), "node 'conv' (Conv): kernel_shape [0, 3] must be positive"),
    "conv-pads-size": (_conv(pads=[1, 1, 1]), "node 'conv' (Conv): pads [1, 1, 1] has 3 entries; 2 spatial dims need 4"),
    "conv-stride-0": (_conv(strides=[0, 1]), "node 'conv' (Conv): strides [0, 1] must be positive"),
    "conv-channels": (_conv((4, 3, 3, 3)), "node 'conv' (Conv): input 'x' has 8 channels"),
    "pool-kernel-0": (_model([h.make_node("MaxPool", ["x"], ["y"], name="pool", kernel_shape=[0, 2])], [_x(1, 8, 8, 8)]),
                      "node 'pool' (MaxPool): kernel_shape [0, 2] must be positive"),
    "input-dtype": (_model([h.make_node("Relu", ["x"], ["y"], name="r")], [_x(1, 4, dtype=T.STRING)],
                           [h.make_tensor_value_info("y", T.STRING, [1, 4])]),
                    "node 'r' (Relu): input 'x' is declared string, which Relu does not take"),
    "opset-99": (_model([h.make_node("Relu", ["x"], ["y"], name="r")], [_x(1, 4)], opset=99),
                 "opset 99 of domain 'ai.onnx' is newer than onnxruntime"),
    "matmul-inner": (_product("MatMul", (5, 3)), "node 'mm' (MatMul): inner dims differ"),
    "gemm-inner": (_product("Gemm", (5, 3)), "node 'mm' (Gemm): inner dims differ"),
    "gemm-rank": (_product("Gemm", (6, 3, 1)), "node 'mm' (Gemm): input 'W' has rank 3"),
    # Past the explicit checks: onnxruntime's own message, mapped to the node it names.
    "transpose-perm": (_model([h.make_node("Transpose", ["x"], ["y"], name="tp", perm=[0, 0])], [_x(2, 3)]),
                       "node 'tp': onnxruntime rejects it: Op (Transpose)"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_e_malformed_graphs_are_one_line_exit_2(tmp_path, capsys, case):
    model, expected = MALFORMED[case]
    code, err = _optimize(tmp_path, capsys, model)
    assert code == 2, err
    assert err.startswith(f"graphopt: error: {tmp_path / 'm.onnx'}: ") and expected in err
    assert "\n" not in err and "onnxruntime_src" not in err and "[ONNXRuntimeError]" not in err


def _external(name: str, location: str) -> onnx.TensorProto:
    t = onnx.TensorProto(name=name, data_type=F, dims=[4], data_location=T.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        t.external_data.add(key=key, value=value)
    return t


def _function_model(location: str) -> onnx.ModelProto:
    const = h.make_node("Constant", [], ["c"], name="fconst", value=_external("c_val", location))
    f = h.make_function("local", "AddC", ["x"], ["y"], [const, h.make_node("Add", ["x", "c"], ["y"], name="fadd")],
                        [h.make_opsetid("", 17)])
    return _model([h.make_node("AddC", ["x"], ["y"], name="call", domain="local")], [_x(4)],
                  [h.make_tensor_value_info("y", F, [4])], opset=17, functions=[f])


@pytest.mark.parametrize("location,expected", [
    ("outside.bin", "tensor 'c_val' has external data file 'outside.bin' which does not exist"),
    ("../outside.bin", "tensor 'c_val' has external data at '../outside.bin', outside the model's folder"),
    ("w.bin", None),
])
def test_f_function_tensors_get_the_external_data_checks(tmp_path, capsys, monkeypatch, location, expected):
    folder = tmp_path / "model"
    folder.mkdir()
    np.arange(4, dtype=np.float32).tofile(tmp_path / "outside.bin")  # beside the folder, and in the cwd
    np.arange(4, dtype=np.float32).tofile(folder / "w.bin")
    onnx.save(_function_model(location), str(folder / "m.onnx"))
    monkeypatch.chdir(tmp_path)  # the old checker resolved 'outside.bin' against the working directory
    code, err = _cli(capsys, "inspect", folder / "m.onnx")
    if expected is None:
        assert code == 0, err
    else:
        assert code == 2 and f"node 'fconst': {expected}" in err


def test_g_billion_laughs_pipeline_is_a_short_error(tmp_path, capsys):
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    (tmp_path / "p.yaml").write_text("\n".join(lines + ["passes: [*a8]"]) + "\n")
    code, err = _optimize(tmp_path, capsys, _relu(), "--pipeline", tmp_path / "p.yaml")
    assert code == 2 and len(err) < 300 and "p.yaml" in err


@pytest.mark.parametrize("text,expected", [
    ("passes: " + "[" * 100 + "]" * 100, "nested deeper than"),
    ("passes: [canonicalize]\n#" + "x" * (2 << 20), "over the 1048576-byte limit"),
    ("passes: [{foo: '" + "x" * 100_000 + "', bar: 1}]", "cannot read pass entry"),
    ("passes: [{name: '" + "x" * 100_000 + "'}]", "p.yaml"),
], ids=["deep", "big", "long-entry", "long-name"])
def test_g_pipeline_files_are_bounded(tmp_path, capsys, text, expected):
    (tmp_path / "p.yaml").write_text(text + "\n")
    code, err = _optimize(tmp_path, capsys, _relu(), "--pipeline", tmp_path / "p.yaml")
    assert code == 2 and expected in err and len(err) < 1000


def test_error_messages_are_one_bounded_line():
    assert bounded("a\nb") == "a b"
    long = bounded("x" * 10_000)
    assert len(long) <= 600 and long.endswith("more chars)")
