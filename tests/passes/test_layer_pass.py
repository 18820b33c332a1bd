"""LayerPass: examine -> plan -> rewrite, one refusal type, one meaning of include / exclude."""
from dataclasses import dataclass

import numpy as np
import pytest

from graphopt.ir.errors import PipelineError
from graphopt.passes.base import LOSSY, LayerFilter, LayerOptions, LayerPass, PassInfo, Refused, option, option_help
from graphopt.passes.manager import PassManager
from graphopt.testing.check import as_graph, check_pass, rng_array
from graphopt.testing.tiny import model, node


def chain():
    """x -> MatMul(w0) -> Relu -> MatMul(w1) -> MatMul(w1 shared) -> y."""
    return as_graph(model([node("MatMul", ["x", "w0"], ["a"], name="fc0"), node("Relu", ["a"], ["b"], name="act"),
                           node("MatMul", ["b", "w1"], ["c"], name="fc1"), node("MatMul", ["c", "w1"], ["y"], name="fc2")],
                          {"x": (2, 4)}, {"y": None}, {"w0": rng_array((4, 4)), "w1": rng_array((4, 4), 1)}))


@dataclass(frozen=True)
class Options(LayerOptions):
    factor: float = option(0.5, "what each weight is multiplied by")


class ScaleWeights(LayerPass):
    """Multiplies each unshared MatMul weight by `factor`."""
    name = "scale-weights"
    info = PassInfo(LOSSY("cosine", -1.0), idempotent=False)
    Options = Options
    ops = ("MatMul",)

    def examine(self, node, graph):
        weight = node.inputs[1]
        if len(weight.outputs) > 1:
            raise Refused(f"weight '{weight.name}' is shared")
        return weight

    def rewrite(self, rw, layer, weight):
        rw.set_values(weight, weight.values * self.options.factor)
        return {"factor": self.options.factor}


def test_examine_plan_rewrite_records_decisions_refusals_and_skips():
    graph, result, _ = check_pass(chain(), ScaleWeights(exclude=("fc0",)), expect_modified=None)
    assert result.modified is False  # fc0 excluded, fc1 and fc2 share w1
    assert [(r.node, r.reason) for r in result.refused] == [("fc1", "weight 'w1' is shared"),
                                                            ("fc2", "weight 'w1' is shared")]
    assert [(s.node, s.reason) for s in result.skipped] == [("fc0", "excluded")]
    graph, result, _ = check_pass(chain(), ScaleWeights(include=("fc0",)), expect_modified=None)
    assert result.modified and result.decisions == {"fc0": {"factor": 0.5}}
    assert [s.node for s in result.skipped] == ["fc1", "fc2"]


@pytest.mark.parametrize("include, chosen", [(("fc*",), ["fc0"]), (("MatMul",), ["fc0"]), (("f?0", "nothing*"), None)])
def test_include_is_fnmatch_over_names_and_op_types(include, chosen):
    graph = chain()
    if chosen is None:
        with pytest.raises(PipelineError, match=r"include=nothing\* matches no layer"):
            PassManager([ScaleWeights(include=include)]).run(graph)
        return
    result = PassManager([ScaleWeights(include=include)]).run(graph)[0]
    assert list(result.decisions) == chosen


def test_a_pattern_matching_no_layer_is_an_error_that_lists_the_layers():
    with pytest.raises(PipelineError, match=r"scale-weights: exclude=nosuchlayer matches no layer .*fc0, fc1, fc2"):
        PassManager([ScaleWeights(exclude=("nosuchlayer",))]).run(chain())


def test_patterns_match_only_the_pass_candidates():
    # 'act' is a node of the graph but not a MatMul: naming it is a mistake for this pass.
    with pytest.raises(PipelineError, match="include=act"):
        PassManager([ScaleWeights(include=("act",))]).run(chain())


def test_filter_skip_reasons():
    fc0 = chain().nodes[0]
    assert LayerFilter().skip_reason(fc0) is None
    assert LayerFilter(include=("fc1",)).skip_reason(fc0) == "not in include"
    assert LayerFilter(exclude=("Mat*",)).skip_reason(fc0) == "excluded"


def test_option_help_lists_each_option():
    rows = {name: (default, text) for name, default, text in option_help(Options)}
    assert rows["factor"] == (0.5, "what each weight is multiplied by")
    assert rows["include"][0] == () and "shell patterns" in rows["include"][1]


def test_rewrite_sees_only_planned_layers():
    class Halve(ScaleWeights):
        name = "halve-first"

        def plan(self, layers, graph, ctx, result):
            return [(layers[0], layers[0].match)] if layers else []

    graph = as_graph(model([node("MatMul", ["x", "w0"], ["a"], name="fc0"), node("MatMul", ["a", "w1"], ["y"], name="fc1")],
                           {"x": (2, 4)}, {"y": None}, {"w0": rng_array((4, 4)), "w1": rng_array((4, 4), 1)}))
    before = graph.tensors()["w1"].values.copy()
    result = PassManager([Halve()]).run(graph)[0]
    assert list(result.decisions) == ["fc0"]
    np.testing.assert_array_equal(graph.tensors()["w1"].values, before)


def if_model():
    """y = If(c) then x @ w_then else x @ w_else, then an outer MatMul."""
    from onnx import TensorProto, helper, numpy_helper

    def branch(name, seed):
        w = numpy_helper.from_array(rng_array((4, 4), seed), f"w_{name}")
        return helper.make_graph([helper.make_node("MatMul", ["x", f"w_{name}"], [f"o_{name}"], name=f"mm_{name}")],
                                 name, [], [helper.make_tensor_value_info(f"o_{name}", TensorProto.FLOAT, [2, 4])], [w])

    nodes = [helper.make_node("If", ["c"], ["b"], name="choose", then_branch=branch("then", 1),
                              else_branch=branch("else", 2)), node("MatMul", ["b", "w"], ["y"], name="outer")]
    graph = helper.make_graph(nodes, "if", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
                                            helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              [numpy_helper.from_array(rng_array((4, 4), 3), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_layers_inside_subgraphs_are_left_and_said():
    feeds = [{"x": rng_array((2, 4), s), "c": np.array(s == 0)} for s in (0, 1)]
    graph, result, _ = check_pass(if_model(), ScaleWeights(), feeds)
    assert list(result.decisions) == ["outer"]
    assert [(s.node, s.reason) for s in result.skipped] == [
        ("choose", "2 MatMul layer(s) inside its If body: subgraphs are left as they are")]
