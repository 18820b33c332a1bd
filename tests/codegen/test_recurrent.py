"""graphopt's LSTM, GRU and RNN converters (TVM 0.27's ONNX frontend has none): each library
agrees with onnxruntime on every output."""
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import codegen
from graphopt.codegen import build
from graphopt.ir import ort
from graphopt.ir.errors import CodegenError

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}


def recurrent_model(op, *, hidden=8, inputs=6, seq=5, batch=1, direction="forward", initial=False,
                    lens=None, peepholes=False, fed=(), layout=0, **attrs):
    """One `op` node; W, R, B (and sequence_lens, P) initializers unless named in `fed`, which
    makes them graph inputs. Returns the model and feeds for every graph input."""
    rng = np.random.default_rng(0)
    dirs, gates = 2 if direction == "bidirectional" else 1, GATES[op]
    x_shape = [seq, batch, inputs] if layout == 0 else [batch, seq, inputs]
    state_shape = [dirs, batch, hidden] if layout == 0 else [batch, dirs, hidden]
    values = {"x": rng.standard_normal(x_shape).astype(np.float32),
              "W": rng.standard_normal((dirs, gates * hidden, inputs)).astype(np.float32) * 0.3,
              "R": rng.standard_normal((dirs, gates * hidden, hidden)).astype(np.float32) * 0.3,
              "B": rng.standard_normal((dirs, 2 * gates * hidden)).astype(np.float32) * 0.1}
    names = ["x", "W", "R", "B", "", "", "", ""]
    if lens is not None:
        values["lens"], names[4] = np.array(lens, np.int32), "lens"
    if initial:
        values["h0"], names[5] = rng.standard_normal(state_shape).astype(np.float32), "h0"
        if op == "LSTM":
            values["c0"], names[6] = rng.standard_normal(state_shape).astype(np.float32), "c0"
    if peepholes:
        values["P"], names[7] = rng.standard_normal((dirs, 3 * hidden)).astype(np.float32) * 0.3, "P"
    names = names[:max(i for i, n in enumerate(names) if n) + 1]
    fed = {"x", "h0", "c0", *fed}
    outputs = ["Y", "Y_h", "Y_c"][:3 if op == "LSTM" else 2]
    node = helper.make_node(op, names, outputs, name=f"{op.lower()}_node", hidden_size=hidden,
                            direction=direction, **({"layout": layout} if layout else {}), **attrs)
    graph = helper.make_graph(
        [node], "recurrent",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(values[n].dtype), values[n].shape)
         for n in names if n in fed],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(values[n], n) for n in names if n and n not in fed])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    return model, {n: values[n] for n in names if n in fed}


def compiled_outputs(model, feeds, tmp_path):
    result = codegen.compile(model, "x86", tmp_path)
    return codegen.load(result.library).run(feeds)


def assert_matches_onnxruntime(model, feeds, tmp_path):
    reference = ort.run(model, feeds)
    outputs = compiled_outputs(model, feeds, tmp_path)
    assert set(outputs) == set(reference)
    for name, expected in reference.items():
        np.testing.assert_allclose(outputs[name], expected, **TOLERANCE, err_msg=name)


def test_the_acceptance_lstm(tmp_path):
    assert_matches_onnxruntime(*recurrent_model("LSTM"), tmp_path)


@pytest.mark.parametrize("case", [
    {"direction": "bidirectional", "initial": True},
    {"direction": "reverse", "initial": True, "batch": 3},
    {"direction": "bidirectional", "batch": 2, "peepholes": True, "initial": True},
    {"clip": 0.05, "peepholes": True, "initial": True},  # the cell state exceeds the clip
    {"input_forget": 1},
    {"activations": ["Sigmoid", "LeakyRelu", "Softsign"], "activation_alpha": [0.2]},
    {"seq": 1, "batch": 2},
], ids=["bidirectional", "reverse", "peepholes", "clip", "input_forget", "activations", "one_step"])
def test_lstm(case, tmp_path):
    assert_matches_onnxruntime(*recurrent_model("LSTM", **case), tmp_path)


@pytest.mark.parametrize("before_reset", [0, 1])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_gru(direction, before_reset, tmp_path):
    model, feeds = recurrent_model("GRU", direction=direction, initial=True, batch=2,
                                   linear_before_reset=before_reset)
    assert_matches_onnxruntime(model, feeds, tmp_path)


def test_gru_activations_take_their_alpha_and_beta_in_order(tmp_path):
    model, feeds = recurrent_model("GRU", activations=["HardSigmoid", "Elu"], activation_alpha=[0.3, 0.7],
                                   activation_beta=[0.4])
    assert_matches_onnxruntime(model, feeds, tmp_path)


def test_rnn(tmp_path):
    assert_matches_onnxruntime(*recurrent_model("RNN", direction="bidirectional", initial=True), tmp_path)


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_sequence_lens_end_some_sequences_early(op, tmp_path):
    # Ended sequences keep their state and output zeros; the reverse direction starts at each
    # sequence's own last step.
    model, feeds = recurrent_model(op, direction="bidirectional", batch=3, lens=[5, 2, 4], initial=True,
                                   **({"linear_before_reset": 1} if op == "GRU" else {}))
    assert_matches_onnxruntime(model, feeds, tmp_path)


def test_weights_and_lengths_computed_at_run_time(tmp_path):
    model, feeds = recurrent_model("LSTM", direction="bidirectional", batch=2, lens=[3, 5], peepholes=True,
                                   fed=("W", "R", "B", "lens", "P"))
    assert_matches_onnxruntime(model, feeds, tmp_path)


def test_batch_first_layout_is_the_transposed_layout_0(tmp_path):
    # onnxruntime refuses layout 1, so the reference is the layout-0 node on transposed data.
    model, feeds = recurrent_model("LSTM", layout=1, batch=2, initial=True, direction="bidirectional")
    same_weights, _ = recurrent_model("LSTM", batch=2, initial=True, direction="bidirectional")
    reference = ort.run(same_weights, {k: v.transpose(1, 0, 2) for k, v in feeds.items()})
    outputs = compiled_outputs(model, feeds, tmp_path)
    np.testing.assert_allclose(outputs["Y"], reference["Y"].transpose(2, 0, 1, 3), **TOLERANCE)
    for name in ("Y_h", "Y_c"):
        np.testing.assert_allclose(outputs[name], reference[name].transpose(1, 0, 2), **TOLERANCE)


def test_a_symbolic_sequence_is_fixed_like_any_dim(tmp_path):
    model, _ = recurrent_model("GRU", seq=4)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "T"
    feeds = {"x": np.random.default_rng(1).standard_normal((7, 1, 6)).astype(np.float32)}
    result = codegen.compile(model, "x86", tmp_path, shapes={"x": [7, 1, 6]})
    outputs = codegen.load(result.library).run(feeds)
    for name, expected in ort.run(model, feeds).items():
        np.testing.assert_allclose(outputs[name], expected, **TOLERANCE, err_msg=name)


def test_an_unsupported_activation_is_refused_naming_the_node():
    model, _ = recurrent_model("LSTM", activations=["Sigmoid", "ScaledTanh", "Tanh"])
    with pytest.raises(CodegenError, match=r"node 'lstm_node' \(LSTM\): LSTM: activation 'ScaledTanh' is not "
                                           r"supported \(supported: .*sigmoid"):
        build.to_relax(model)


def test_recurrent_ops_are_known_to_the_importer():
    model, _ = recurrent_model("GRU")
    build.check_supported(model)


def test_cuda_builds_without_a_gpu(tmp_path):
    # On a GPU the steps' outputs are joined by relax's concat: the CPU's loop-nest copies are
    # host code, which cannot read device memory.
    model, _ = recurrent_model("LSTM", direction="bidirectional", batch=2, lens=[3, 5])
    result = codegen.compile(model, "cuda", tmp_path)
    assert result.library.is_file()


def test_torch_style_stacked_lstm_with_zero_states_computed_from_the_input_shape(tmp_path):
    # torch.onnx exports nn.LSTM(bidirectional=True) with dynamic axes this way: the zero initial
    # states are ConstantOfShape([2, batch, hidden]) with the batch read from Shape(x), and Y is
    # transposed and reshaped to [seq, batch, 2 * hidden] for the next layer.
    hidden, width = 8, 6
    rng = np.random.default_rng(5)
    weights = {"W": rng.standard_normal((2, 4 * hidden, width)).astype(np.float32) * 0.3,
               "R": rng.standard_normal((2, 4 * hidden, hidden)).astype(np.float32) * 0.3,
               "B": rng.standard_normal((2, 8 * hidden)).astype(np.float32) * 0.1,
               "one": np.array([1], np.int64), "two": np.array([2], np.int64), "hid": np.array([hidden], np.int64),
               "zero": np.array([0], np.int64), "flat": np.array([0, 0, -1], np.int64)}
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "one"], ["n"], axis=0),
             helper.make_node("Concat", ["two", "n", "hid"], ["state_shape"], axis=0),
             helper.make_node("ConstantOfShape", ["state_shape"], ["zeros"]),
             helper.make_node("Slice", ["zeros", "zero", "two", "zero"], ["h0"]),
             helper.make_node("LSTM", ["x", "W", "R", "B", "", "h0", "h0"], ["Y", "Y_h", "Y_c"],
                              hidden_size=hidden, direction="bidirectional"),
             helper.make_node("Transpose", ["Y"], ["Yt"], perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["Yt", "flat"], ["out"])]
    graph = helper.make_graph(nodes, "torch_lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", "N", width])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["T", "N", 2 * hidden])],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    feeds = {"x": rng.standard_normal((7, 2, width)).astype(np.float32)}
    result = codegen.compile(model, "x86", tmp_path, shapes={"x": [7, 2, width]})
    np.testing.assert_allclose(codegen.load(result.library)(feeds["x"]), ort.run(model, feeds)["out"], **TOLERANCE)
