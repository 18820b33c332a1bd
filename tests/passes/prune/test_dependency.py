import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir.graph import infer_shapes
from graphopt.passes.prune.channel_rules import analyze
from graphopt.passes.prune.dependency import FILTER, GAMMA, INPUT, PARAM
from graphopt.testing import builders
from graphopt.testing.check import rng_array
from graphopt.testing.tiny import model, node


def conv(x, y, w, name=None, **attrs):
    return node("Conv", [x, w], [y], name=name or y, pads=[1, 1, 1, 1], **attrs)


def graph_of(nodes, weights, inputs=None, outputs=None):
    m = model(nodes, inputs or {"x": (1, 3, 4, 4)}, outputs or {"y": None}, weights)
    return infer_shapes(gs.import_onnx(m))


def groups_by_layer(dg):
    return {layer: g for g in dg.groups() for layer in g.layers}


def slices(dg, node_name, role=None):
    return [s for s in dg.slices if s.node.name == node_name and (role is None or s.role == role)]


def test_residual_add_unites_branches_and_graph_output_blocks():
    w = {"wa": rng_array((8, 3, 3, 3)), "wb": rng_array((8, 3, 3, 3), 1), "wc": rng_array((5, 8, 3, 3), 2)}
    nodes = [conv("x", "a", "wa"), conv("x", "b", "wb"), node("Add", ["a", "b"], ["s"], name="add"),
             node("Relu", ["s"], ["r"], name="relu"), conv("r", "y", "wc")]
    dg = analyze(graph_of(nodes, w))
    by_layer = groups_by_layer(dg)
    assert by_layer["a"] is by_layer["b"] and not by_layer["a"].blocked
    assert by_layer["y"].reasons == ["the channels reach graph output 'y'"]
    (consumer,) = slices(dg, "y", INPUT)
    assert consumer.axis == 1 and dg.root(consumer.segments[0].group) == by_layer["a"].id


def test_concat_lays_segments_end_to_end_and_flatten_maps_gemm_rows():
    w = {"wa": rng_array((4, 3, 3, 3)), "wb": rng_array((6, 3, 3, 3), 1), "g": rng_array((2, 160), 2)}
    nodes = [conv("x", "a", "wa"), conv("x", "b", "wb"), node("Concat", ["a", "b"], ["c"], name="cat", axis=1),
             node("Flatten", ["c"], ["f"], name="flat"), node("Gemm", ["f", "g"], ["y"], name="gemm", transB=1)]
    dg = analyze(graph_of(nodes, w))
    (rows,) = slices(dg, "gemm", INPUT)
    assert rows.axis == 1
    assert [(s.channels, s.expand) for s in rows.segments] == [(4, 16), (6, 16)]
    by_layer = groups_by_layer(dg)
    assert [dg.root(s.group) for s in rows.segments] == [by_layer["a"].id, by_layer["b"].id]


def test_concat_with_an_untracked_operand_keeps_the_others_prunable():
    w = {"wa": rng_array((4, 3, 3, 3)), "wc": rng_array((2, 7, 3, 3), 1)}
    nodes = [conv("x", "a", "wa"), node("Concat", ["a", "x"], ["c"], name="cat", axis=1), conv("c", "y", "wc")]
    dg = analyze(graph_of(nodes, w, inputs={"x": ("N", 3, 4, 4)}))  # only the channel dim need be known
    (consumer,) = slices(dg, "y", INPUT)
    assert [s.channels for s in consumer.segments] == [4, 3]
    assert not groups_by_layer(dg)["a"].blocked
    assert "concatenated with graph input 'x'" in dg.group(consumer.segments[1].group).reasons


def test_depthwise_follows_its_input_and_batchnorm_slices_its_parameters():
    dg = analyze(infer_shapes(gs.import_onnx(builders.mobilenet(blocks=1))))
    by_layer = groups_by_layer(dg)
    stem = by_layer["Conv_0"]
    assert stem is by_layer["Conv_1"] and not stem.blocked  # Conv_1 is the depthwise conv
    assert [n.name for n, _ in dg.group_attrs] == ["Conv_1"]
    assert [s.role for s in slices(dg, "BatchNormalization_0")] == [GAMMA, PARAM, PARAM, PARAM]
    assert [s.role for s in slices(dg, "Conv_1")] == [FILTER]


def test_broadcast_constants_are_sliced_along_the_channels_only():
    w = {"wa": rng_array((8, 3, 3, 3)), "k": rng_array((1, 8, 1, 1), 1), "s": np.float32(2.0),
         "wc": rng_array((2, 8, 3, 3), 2)}
    nodes = [conv("x", "a", "wa"), node("Mul", ["a", "k"], ["m"], name="mul"),
             node("Add", ["m", "s"], ["n"], name="add"), conv("n", "y", "wc")]
    dg = analyze(graph_of(nodes, w))
    (scale,) = slices(dg, "mul")
    assert (scale.input, scale.axis, scale.role) == (1, 1, PARAM)
    assert slices(dg, "add") == []  # a scalar broadcasts over any number of channels
    assert not groups_by_layer(dg)["a"].blocked


def test_grouped_conv_prunes_per_block_and_blocks_its_input():
    w = {"wa": rng_array((8, 3, 3, 3)), "wg": rng_array((8, 4, 3, 3), 1), "wc": rng_array((2, 8, 3, 3), 2)}
    nodes = [conv("x", "a", "wa"), conv("a", "g", "wg", group=2), conv("g", "y", "wc")]
    by_layer = groups_by_layer(analyze(graph_of(nodes, w)))
    assert by_layer["g"].divisions == 2 and not by_layer["g"].blocked
    assert by_layer["a"].reasons == ["grouped Conv 'g' (group=2) ties its input channels to groups"]


def test_refusals_name_the_cause():
    w = {"wa": rng_array((8, 3, 3, 3)), "wb": rng_array((8, 3, 3, 3), 1), "wc": rng_array((2, 8, 3, 3), 2),
         "shared": rng_array((8, 8, 3, 3), 3)}
    nodes = [conv("x", "a", "wa"), node("LRN", ["a"], ["l"], name="lrn", size=3), conv("l", "p", "shared"),
             conv("p", "q", "shared"), conv("x", "b", "wb"), node("Add", ["b", "x8"], ["s"], name="add"),
             conv("s", "y", "wc")]
    dg = analyze(graph_of(nodes, w, inputs={"x": (1, 3, 4, 4), "x8": (1, 8, 4, 4)}))
    by_layer = groups_by_layer(dg)
    assert by_layer["a"].reasons == ["the channels are read by LRN 'lrn', an op prune-channels does not follow"]
    assert "weight 'shared' is shared with another node" in by_layer["p"].reasons
    assert by_layer["b"].reasons == ["Add 'add' joins the channels with graph input 'x8', which is not followed"]


def test_reshape_that_flattens_is_followed_and_one_that_splits_is_not():
    w = {"wa": rng_array((8, 3, 3, 3)), "shape": np.array([1, -1], np.int64), "g": rng_array((128, 2), 1),
         "wb": rng_array((4, 3, 3, 3), 2), "split": np.array([1, 2, 2, 16], np.int64)}
    nodes = [conv("x", "a", "wa"), node("Reshape", ["a", "shape"], ["f"], name="flat"),
             node("Gemm", ["f", "g"], ["y"], name="gemm"),
             conv("x", "b", "wb"), node("Reshape", ["b", "split"], ["z"], name="split")]
    dg = analyze(graph_of(nodes, w, outputs={"y": None, "z": None}))
    by_layer = groups_by_layer(dg)
    assert not by_layer["a"].blocked and [n.name for n, _ in dg.reshapes] == ["flat"]
    assert [(s.channels, s.expand) for s in slices(dg, "gemm", INPUT)[0].segments] == [(8, 16)]
    assert by_layer["b"].reasons[0].startswith("Reshape 'split' does more than merge")


def test_dynamic_flatten_is_refused():
    w = {"wa": rng_array((8, 3, 3, 3)), "g": rng_array((2, 8), 1)}
    nodes = [conv("x", "a", "wa"), node("Flatten", ["a"], ["f"], name="flat"), node("Gemm", ["f", "g"], ["y"],
                                                                                   name="gemm", transB=1)]
    graph = graph_of(nodes, w, inputs={"x": ("N", 3, "H", "W")})
    assert groups_by_layer(analyze(graph))["a"].reasons == [
        "Flatten 'flat' has a dynamic shape after the channel axis"]


def test_transformer_feed_forward_is_prunable_and_attention_is_not():
    by_layer = groups_by_layer(analyze(infer_shapes(gs.import_onnx(builders.transformer(layers=1)))))
    assert not by_layer["MatMul_6"].blocked  # the feed-forward hidden layer, through Erf-Gelu
    assert by_layer["MatMul_0"].blocked and by_layer["MatMul_7"].blocked  # heads split; LayerNorm
