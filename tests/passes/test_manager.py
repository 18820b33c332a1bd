import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from graphopt.ir import ort
from graphopt.ir.data import input_specs, random_feeds
from graphopt.ir.errors import PassError, PipelineError, VerificationError
from graphopt.ir.graph import opset
from graphopt.passes.base import LOSSY, TOLERANCE, Pass, PassContext, PassInfo, PassResult
from graphopt.passes.cleanup.eliminate_dead import EliminateDead
from graphopt.passes.manager import FidelityInstrument, PassManager
from graphopt.testing.check import as_graph, rng_array
from graphopt.testing.tiny import model, node


def small():
    return as_graph(model([node("MatMul", ["x", "w"], ["h"]), node("Relu", ["h"], ["y"])],
                          {"x": (2, 3)}, {"y": None}, {"w": rng_array((3, 3))}))


class ScaleWeight(Pass):
    """Claims EXACT but changes the numbers."""
    name = "scale-weight"

    def run(self, graph, ctx):
        w = next(t for t in graph.tensors().values() if isinstance(t, gs.Constant))
        w.values = w.values * 2
        return PassResult(True, {})


class RenameOutput(Pass):
    name = "rename-output"

    def run(self, graph, ctx):
        graph.outputs[0].name = "renamed"
        return PassResult(True, {})


class Unsort(Pass):
    name = "unsort"

    def run(self, graph, ctx):
        graph.nodes.reverse()
        return PassResult(True, {})


def test_records_time_and_stats():
    records = PassManager([EliminateDead()]).run(small())
    assert records[0].name == "eliminate-dead" and records[0].seconds >= 0 and not records[0].modified


@pytest.mark.parametrize("bad, message", [(RenameOutput(), "graph outputs changed"),
                                          (Unsort(), "TOPOSORTED")])
def test_verification_catches_broken_graphs(bad, message):
    with pytest.raises(VerificationError, match=message):
        PassManager([bad]).run(small())


def test_fidelity_instrument_holds_exact_passes_to_their_word():
    graph = small()
    feeds = random_feeds(input_specs(graph))
    instrument = FidelityInstrument(ort.run(graph, feeds), feeds)
    with pytest.raises(VerificationError, match="scale-weight' broke its semantics"):
        PassManager([ScaleWeight()], instruments=(instrument,)).run(graph)


class LossyScale(ScaleWeight):
    name = "lossy-scale"
    info = PassInfo(LOSSY("cosine", 0.9))


class ToleranceNoop(Pass):
    name = "tolerance-noop"
    info = PassInfo(TOLERANCE(0.0, 1e-6))

    def run(self, graph, ctx):
        return PassResult(True, {})


def test_tolerance_passes_are_held_against_the_model_they_were_given():
    # After a lossy pass, a TOLERANCE pass that changes nothing more must pass, though the
    # model is far from the original.
    graph = small()
    feeds = random_feeds(input_specs(graph))
    instrument = FidelityInstrument(ort.run(graph, feeds), feeds)
    records = PassManager([LossyScale(), ToleranceNoop()], instruments=(instrument,)).run(graph)
    assert records[1].fidelity["y"]["max_abs"] > 0.1


def test_scaled_tolerance_grows_with_the_output():
    reference = np.array([1000.0, 0.0])
    off = reference + np.array([0.05, 0.05])
    assert TOLERANCE(0.0, 1e-4).violation(reference, off)
    assert TOLERANCE(0.0, 1e-4, scaled=True).violation(reference, off) is None
    assert "max(1, max|y|)" in TOLERANCE(0.0, 1e-4, scaled=True).describe()


def test_verification_off_lets_it_through():
    graph = small()
    records = PassManager([Unsort()], verify=False).run(graph)
    assert records[0].modified
    assert [n.op for n in graph.nodes] == ["Relu", "MatMul"]  # left unsorted: nothing checked it


class Crashes(Pass):
    name = "crashes"

    def run(self, graph, ctx):
        return [][0]


def test_an_exception_escaping_a_pass_names_the_pass_and_those_before():
    with pytest.raises(PassError, match=r"pass 'crashes' failed \(after eliminate-dead\): IndexError") as e:
        PassManager([EliminateDead(), Crashes()]).run(small())
    assert e.value.exit_code == 3 and isinstance(e.value.error, IndexError)


def test_user_errors_from_a_pass_are_not_wrapped():
    class Complains(Pass):
        name = "complains"

        def run(self, graph, ctx):
            raise PipelineError("complains: bad option")

    with pytest.raises(PipelineError, match="^complains: bad option$"):
        PassManager([Complains()]).run(small())


# --- opset: a pass that needs a newer opset gets the model upgraded, verified EXACT ---------------

class NeedsOpset13(Pass):
    """Changes nothing; needs opset 13 or newer, as quantize does."""
    name = "needs-13"
    info = PassInfo(opset=(13, PassInfo().opset[1]))

    def run(self, graph, ctx):
        return PassResult(False, {})


def opset11():
    """Unsqueeze takes its axes as an attribute before opset 13 and as an input from 13 on."""
    return as_graph(model([node("MatMul", ["x", "w"], ["h"]), node("Unsqueeze", ["h"], ["y"], axes=[0])],
                          {"x": (2, 3)}, {"y": None}, {"w": rng_array((3, 3))}, opset=11))


def test_a_pass_above_the_models_opset_gets_it_upgraded_and_says_so():
    graph = opset11()
    feeds = random_feeds(input_specs(graph))
    reference = ort.run(graph, feeds)
    records = PassManager([NeedsOpset13()], instruments=(FidelityInstrument(reference, feeds),)).run(
        graph, PassContext(feeds=feeds))
    assert records[0].modified and records[0].stats == {"opset": "11 -> 13"} and not records[0].skipped
    assert opset(graph) == 13 and [n.op for n in graph.nodes] == ["MatMul", "Unsqueeze"]
    assert records[0].fidelity["y"]["max_abs"] == 0.0
    again = PassManager([NeedsOpset13()]).run(graph)  # upgraded once: the pass alone runs the second time
    assert not again[0].modified and again[0].stats == {}


def test_a_model_the_converter_cannot_take_skips_the_pass_naming_the_op():
    old = helper.make_model(helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], to="INT64", name="to_int")], "old",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [2])]), opset_imports=[helper.make_opsetid("", 5)])
    graph = gs.import_onnx(old)
    record = PassManager([NeedsOpset13()], verify=False).run(graph)[0]
    assert not record.modified and opset(graph) == 5
    assert record.skipped[0].node == "to_int"
    assert "below the pass's range 13.." in record.skipped[0].reason and "no adapter for op Cast" in record.skipped[0].reason


def test_an_opset_newer_than_the_pass_knows_is_skipped():
    class UpTo12(NeedsOpset13):
        name = "up-to-12"
        info = PassInfo(opset=(7, 12))

    record = PassManager([UpTo12()]).run(small())[0]
    assert not record.modified and "opset 17 is newer than the pass's range 7..12" in record.skipped[0].reason
