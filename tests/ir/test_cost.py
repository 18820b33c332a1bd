"""ir.cost.macs against counts worked out by hand: one multiply-accumulate per weight element that
meets an input element on the way to an output."""
import onnx_graphsurgeon as gs
import pytest

from graphopt.ir.cost import macs
from graphopt.passes.conv.winograd import Winograd
from graphopt.passes.manager import PassManager
from graphopt.testing.check import rng_array
from graphopt.testing.tiny import model, node


def only_node(nodes: list, inputs: dict, weights: dict) -> gs.Node:
    """The single node of a tiny model, its output shape filled by ONNX shape inference."""
    graph = gs.import_onnx(model(nodes, inputs, {"y": None}, weights))
    (n,) = graph.nodes
    return n


@pytest.mark.parametrize("group, w_shape, expected", [
    # 8 -> 8 channels, 6x6 output: each output element sums (8 / group) input channels x 3x3 taps.
    (1, (8, 8, 3, 3), (1 * 8 * 6 * 6) * (8 * 9)),  # 20,736
    (2, (8, 4, 3, 3), (1 * 8 * 6 * 6) * (4 * 9)),  # grouped: 10,368
    (8, (8, 1, 3, 3), (1 * 8 * 6 * 6) * (1 * 9)),  # depthwise: 2,592
])
def test_conv_macs_count_only_the_channels_of_each_group(group, w_shape, expected):
    conv = only_node([node("Conv", ["x", "w"], ["y"], group=group, pads=[1, 1, 1, 1])], {"x": (1, 8, 6, 6)},
                     {"w": rng_array(w_shape)})
    assert macs(conv) == expected


def test_depthwise_conv_with_a_channel_multiplier_and_stride():
    # 4 input channels, 2 filters each (8 outputs), stride 2 on 9x9 unpadded: 4x4 output, 9 taps each.
    conv = only_node([node("Conv", ["x", "w"], ["y"], group=4, strides=[2, 2])], {"x": (2, 4, 9, 9)},
                     {"w": rng_array((8, 1, 3, 3))})
    assert macs(conv) == 2 * 8 * 4 * 4 * 9  # 2,304


def test_grouped_conv_transpose_counts_each_input_element_into_its_groups_outputs():
    # 8 input channels in 4 groups of 2, each group writing 2 output channels through 3x3 taps:
    # every input element is multiplied into 2 x 9 outputs, whatever the stride.
    deconv = only_node([node("ConvTranspose", ["x", "w"], ["y"], group=4, strides=[2, 2])], {"x": (1, 8, 4, 4)},
                       {"w": rng_array((8, 2, 3, 3))})
    assert deconv.outputs[0].shape[1] == 8
    assert macs(deconv) == (1 * 8 * 4 * 4) * (2 * 9)  # 2,304


def test_gemm_with_trans_a_reads_k_from_the_first_dimension():
    gemm = only_node([node("Gemm", ["x", "w"], ["y"], transA=1)], {"x": (20, 6)}, {"w": rng_array((20, 24))})
    assert macs(gemm) == 6 * 24 * 20


def test_winograd_marker_counts_the_tile_products():
    graph = gs.import_onnx(model([node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])],
                                 {"x": (1, 4, 6, 6)}, {"y": None}, {"w": rng_array((8, 4, 3, 3))}))
    PassManager([Winograd(emit="tvm", tile=4)]).run(graph)
    (marker,) = graph.nodes
    # A 6x6 output is 2x2 tiles of 4x4; each tile costs (4 + 2)^2 products per channel pair.
    assert macs(marker) == 1 * (2 * 2) * 36 * 8 * 4  # 4,608, against 10,368 direct


@pytest.mark.parametrize("op, gates, directions", [("LSTM", 4, 1), ("GRU", 3, 2), ("RNN", 1, 1)])
def test_recurrent_layers_multiply_input_and_state_by_every_gate_each_step(op, gates, directions):
    seq, batch, inputs, hidden = 5, 2, 6, 8
    direction = "bidirectional" if directions == 2 else "forward"
    layer = only_node([node(op, ["x", "w", "r"], ["y"], hidden_size=hidden, direction=direction)],
                      {"x": (seq, batch, inputs)},
                      {"w": rng_array((directions, gates * hidden, inputs)),
                       "r": rng_array((directions, gates * hidden, hidden))})
    assert macs(layer) == seq * batch * directions * gates * hidden * (inputs + hidden)
