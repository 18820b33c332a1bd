"""Concrete input shapes for analysis: `--input-shape x=1,3,48,320` or the shapes of `--data`.

Symbolic dims (a batch N, an image's H x W, a sequence length) leave the shapes behind them
symbolic or unknown: MACs counted with them as 1 come out at 1% of a 48xW recognizer's, and a
Reshape fed by Shape->Gather->Concat hides the rank of everything after it. `specialize` returns
a copy of the graph whose inputs have concrete dims and whose intermediate shapes are inferred
through such shape-computing chains; the model itself keeps its dynamic dims.

Inference runs onnxruntime's symbolic shape inference (it evaluates Shape, Gather, Concat,
Slice, Unsqueeze and Reshape on shape values, where onnx's data propagation stops at a Gather of
a scalar index), and onnx's own inference fills what that leaves open (model-local functions
such as ai.graphopt::WinogradConv). Both read a skeleton: weights over a few thousand elements
become typed inputs, so a 3 GB model costs its structure only.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

import onnx
import onnx_graphsurgeon as gs

from graphopt.ir.data import InputSpec, input_specs, is_static
from graphopt.ir.errors import DataError
from graphopt.ir.graph import skeleton_of

Shapes = dict[str, tuple[int, ...]]


def parse_input_shapes(specs: Iterable[str]) -> Shapes:
    """`["x=1,3,48,320", "s="]` -> {"x": (1, 3, 48, 320), "s": ()}; DataError on a malformed
    spec, a dim that is not a positive integer, or an input named twice."""
    shapes: Shapes = {}
    for spec in specs:
        name, sep, dims = spec.partition("=")
        name = name.strip()
        if not sep or not name:
            raise DataError(f"--input-shape '{spec}': write NAME=D0,D1,... (e.g. x=1,3,48,320; s= for a scalar)")
        try:
            shape = tuple(int(d) for d in dims.split(",")) if dims.strip() else ()
        except ValueError:
            raise DataError(f"--input-shape '{spec}': dims must be integers separated by commas") from None
        if any(d <= 0 for d in shape):
            raise DataError(f"--input-shape '{spec}': every dim must be positive")
        if name in shapes:
            raise DataError(f"--input-shape '{spec}': input '{name}' is given twice")
        shapes[name] = shape
    return shapes


def check_input_shapes(graph: gs.Graph, shapes: Shapes, where: str = "") -> None:
    """DataError unless every name is a model input and every shape fits it: the same rank and
    the model's value for each static dim."""
    prefix = f"{where}: " if where else ""
    specs = {s.name: s for s in input_specs(graph)}
    for name, shape in shapes.items():
        spec = specs.get(name)
        if spec is None:
            raise DataError(f"{prefix}--input-shape {name}: the model has no input '{name}' "
                            f"(inputs: {', '.join(specs) or 'none'})")
        _check_one(spec, shape, prefix)


def _check_one(spec: InputSpec, shape: tuple[int, ...], prefix: str) -> None:
    if spec.shape is None:
        return  # rank unknown to the model: any shape may be right
    given = f"--input-shape {spec.name}={','.join(map(str, shape))}"
    model = "[" + ", ".join(str(d) for d in spec.shape) + "]"
    if len(shape) != len(spec.shape):
        raise DataError(f"{prefix}{given}: input '{spec.name}' has rank {len(spec.shape)} {model}, "
                        f"not {len(shape)}")
    for i, (want, have) in enumerate(zip(spec.shape, shape)):
        if is_static(want) and is_static(have) and want != have:
            raise DataError(f"{prefix}{given}: input '{spec.name}' has dim {i} fixed at {want} {model}")


def specialize(graph: gs.Graph, shapes: Shapes, where: str = "") -> gs.Graph:
    """A copy of `graph` whose inputs named in `shapes` have those dims and whose intermediate and
    output shapes are inferred again (symbolic where an input stays symbolic). Weight arrays are
    shared with `graph`, not copied."""
    check_input_shapes(graph, shapes, where)
    return specialize_in_place(graph.copy(), shapes)


def specialize_in_place(graph: gs.Graph, shapes: Shapes) -> gs.Graph:
    """`specialize` on `graph` itself (what `--static` writes), keeping everything else the graph
    object carries; the caller has checked `shapes`. A dim given as a string stays symbolic."""
    for t in graph.inputs:
        if t.name in shapes:
            t.shape = list(shapes[t.name])
    inputs = {id(t) for t in graph.inputs}
    variables = [t for t in graph.tensors().values() if isinstance(t, gs.Variable) and id(t) not in inputs]
    for t in variables:
        t.shape = None  # shapes derived from the old dims would contradict the new ones
    inferred = infer(skeleton_of(graph))
    for t in variables:
        t.shape = inferred.get(t.name)
    return graph


def infer(model: onnx.ModelProto) -> dict[str, list]:
    """Shapes of the model's tensors (ints, or strings for symbolic dims) from both inferences.
    onnx's rank stands where both have one (onnxruntime's guesses the rank of ops it does not
    know); of two answers of one rank, the one with more concrete dims."""
    best = _onnx(model)
    for name, dims in _symbolic(model).items():
        mine = best.get(name)
        if mine is None or (len(dims) == len(mine) and _known(dims) >= _known(mine)):
            best[name] = dims
    return best


def _known(dims: list) -> int:
    return sum(1 for d in dims if is_static(d))


def _symbolic(model: onnx.ModelProto) -> dict[str, list]:
    """onnxruntime's symbolic shape inference, partial results included. Its `infer_shapes` saves
    a file into the working directory when inference is incomplete, so its loop is run here.
    Without sympy (which it needs) onnx's inference answers alone."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import (
            SymbolicShapeInference,
            logger,
        )
    except ImportError:
        return {}

    level = logger.level
    logger.setLevel(logging.CRITICAL)  # it warns per op it cannot infer; the merge handles those
    try:
        sym = SymbolicShapeInference(int_max=2**31 - 1, auto_merge=True, guess_output_rank=True, verbose=0)
        sym._preprocess(model)
        while sym.run_:
            sym._infer_impl()
        sym._update_output_from_vi()
        return _shapes_of(sym.out_mp_)
    except Exception:  # noqa: BLE001 - it raises bare Exceptions and asserts on graphs it cannot read
        return {}
    finally:
        logger.setLevel(level)


def _onnx(model: onnx.ModelProto) -> dict[str, list]:
    try:
        return _shapes_of(onnx.shape_inference.infer_shapes(model, data_prop=True))
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError):
        return {}


def _shapes_of(model: onnx.ModelProto) -> dict[str, list]:
    shapes = {}
    for vi in list(model.graph.value_info) + list(model.graph.output):
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
    return shapes
