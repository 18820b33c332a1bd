import onnx_graphsurgeon as gs
import pytest

from graphopt.ir import ort
from graphopt.ir.data import input_specs, random_feeds
from graphopt.ir.errors import VerificationError
from graphopt.passes.base import Pass, PassResult
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


def test_verification_off_lets_it_through():
    PassManager([Unsort()], verify=False).run(small())
