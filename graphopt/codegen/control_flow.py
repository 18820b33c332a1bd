"""ONNX Loop -> Relax recursive functions, correct for any trip count and condition at run time.

TVM 0.27's ONNX frontend converts If (in `_construct_nodes`: both branches computed, one selected)
but neither Loop nor Scan, and Relax has no loop construct: a loop is a recursive function, as TVM's
own TFLite frontend lowers WHILE. The Relax VM runs a call to a Relax function as a native C++ call,
so a tail-recursive loop overflows the native stack after a few thousand iterations (a segfault
between 2,000 and 5,000 iterations, measured). This converter recurses to depth O(log n) instead:

    rec(level, s)    up to 2**level iterations from state s: none once the loop is done, one
                     (`step`: the body) at level 0, else rec(level - 1) twice (`halves`)
    drive(level, s)  rec(level, s), then, while the loop goes on, drive(level + 1) (`more`)

so n iterations take O(n) calls at a depth under 4 * log2(n) + 8, whatever n is. The state is the
iteration number i, the condition and the loop-carried values; the loop runs while `cond and i < M`,
with M absent read as INT64_MAX and cond absent as true. The body's condition output is honoured
even when the Loop has no condition input: the ONNX spec calls it ignored there, but onnxruntime
(and onnx's reference runtime) stop on it, and onnxruntime is what a library is compared against.

Scan outputs stack each iteration's value along a new axis 0: every rec/drive call returns the rows
its iterations produced, joined by concat (O(n log n) copying in all, none without scan outputs);
in `main` their leading dimension is a symbolic var bound by `match_cast`. A loop-carried value
whose shape changes across iterations (a growing sequence) gets symbolic dimensions: the body is
converted with the initial shapes, then again with every dimension that changed made symbolic,
until the shapes are stable. Values of the enclosing graphs the body reads are used directly when
constant and passed as extra parameters otherwise. The body converts with the frontend's own
subgraph importer (`_convert_subgraph`, as for If), so nested If and Loop convert too.

Verified in tests/codegen/test_control_flow.py against onnxruntime on hand-built Loops (trip count
only, condition only, both, neither, carried state, growing state, scan outputs, outer-scope reads,
nested loops) at several run-time trip counts, including one deep enough to crash plain recursion.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx

from graphopt.codegen.targets import tvm_error_summary
from graphopt.ir.errors import CodegenError

OPS = frozenset({"Loop"})
_INT64_MAX = int(np.iinfo(np.int64).max)
# A dimension is static, or made symbolic; the rank, static at least, only becomes unknown when
# the body's converters lose it. Each round of `_stable_kinds` lowers at least one of these.
_MAX_ROUNDS = 8


@dataclass(frozen=True)
class _Kind:
    """What graphopt keeps of a loop value's type: dtype, rank, and each dim (None: symbolic);
    `dims` None when only the rank is known."""
    dtype: str
    ndim: int
    dims: tuple[int | None, ...] | None

    @property
    def static(self) -> bool:
        return self.dims is not None and None not in self.dims


@dataclass
class _Loop:
    """One Loop node being converted: its body, the outer values it captures, its value kinds."""
    name: str
    body: onnx.GraphProto
    literals: dict          # outer name -> constant expression, used as is
    captured: list          # (outer name, expression) passed as parameters
    carried: list[_Kind]
    scans: list[_Kind]      # one iteration's value of each scan output


def convert(importer, op_name: str, inputs: Sequence, attrs: dict):
    """The Relax value(s) of the ONNX node `op_name` (in `OPS`: Loop), converted with `importer`,
    the frontend's graph importer, whose builder (`importer.bb`) is inside `main` or a loop body."""
    from tvm import relax

    bb = importer.bb
    body = attrs["body"]
    name = attrs["tvm_custom"]["name"] or "loop"
    n_carried = len(inputs) - 2
    if len(body.input) != 2 + n_carried or len(body.output) < 1 + n_carried:
        raise CodegenError(f"its body takes {len(body.input)} inputs and returns {len(body.output)} "
                           f"outputs; a Loop with {n_carried} loop-carried values needs {2 + n_carried} "
                           f"inputs and at least {1 + n_carried} outputs")
    literals, captured = _outer_values(importer, body)
    initial = [bb.normalize(v) for v in inputs[2:]]
    loop = _Loop(name, body, literals, captured, [_kind(v.ty) for v in initial], [])
    try:
        loop.carried, loop.scans = _stable_kinds(importer, loop)
        step = _step_function(importer, loop)
    except CodegenError:
        raise
    except Exception as e:  # the body's converters raise anything
        raise CodegenError(f"its body does not convert: {tvm_error_summary(e)}") from e
    unknown = [k for k, s in enumerate(loop.scans) if not s.static]
    if unknown:
        raise CodegenError(f"scan output(s) {unknown} have a shape graphopt cannot know before the "
                           "first iteration; give the model static input shapes")
    drive = _loop_functions(bb, loop, step)
    trips = _scalar(bb, inputs[0], "int64", _INT64_MAX)
    cond = _scalar(bb, inputs[1], "bool", True)
    zero = relax.const(0, "int64")
    result = bb.emit(relax.Call(drive, [zero, zero, cond, *initial, trips, *(v for _, v in captured)]))
    outputs = _unpack(bb, result, [*loop.carried, *(_rows(s) for s in loop.scans)])
    return outputs[0] if len(outputs) == 1 else relax.Tuple(outputs)


def _outer_values(importer, body: onnx.GraphProto) -> tuple[dict, list]:
    """The values of enclosing graphs `body` reads: constants by name, and the rest as (name,
    expression) pairs, which every loop function takes as parameters."""
    import tvm
    from tvm import relax

    literals, captured = {}, []
    for outer in sorted(_free_names(body)):
        if outer not in importer._nodes:
            raise CodegenError(f"its body reads '{outer}', which no node before the Loop computes")
        value = importer._nodes[outer]
        if isinstance(value, tvm.ir.GenericConst) or (isinstance(value, relax.ShapeExpr)
                                                      and not relax.analysis.free_symbolic_vars(value)):
            literals[outer] = value
        else:
            captured.append((outer, importer.bb.normalize(value)))
    return literals, captured


def _free_names(graph: onnx.GraphProto) -> set[str]:
    """Names `graph` and its subgraphs read and do not define (ONNX names are unique across scopes)."""
    defined = ({i.name for i in graph.input} | {t.name for t in graph.initializer}
               | {o for n in graph.node for o in n.output})
    read = {i for n in graph.node for i in n.input if i} | {o.name for o in graph.output}
    for node in graph.node:
        for attribute in node.attribute:
            for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                read |= _free_names(sub)
    return read - defined


def _stable_kinds(importer, loop: _Loop) -> tuple[list[_Kind], list[_Kind]]:
    """Loop-carried kinds that hold in every iteration, and the scan outputs' kinds: the body is
    converted (into a builder thrown away) until what it returns fits what it takes."""
    from tvm import relax

    kinds = loop.carried
    for _ in range(_MAX_ROUNDS):
        saved, importer.bb = importer.bb, relax.BlockBuilder()
        try:
            step = _step_function(importer, replace(loop, carried=kinds))
            returned = [_kind(t) for t in step.ty.ret.fields]
        finally:
            importer.bb = saved
        n = len(kinds)
        joined = [_join(k, r, f"loop-carried value {i}") for i, (k, r) in enumerate(zip(kinds, returned[2:2 + n]))]
        if joined == kinds:
            return kinds, [_element(r) for r in returned[2 + n:]]
        kinds = joined
    raise CodegenError("the shapes of its loop-carried values do not settle")


def _step_function(importer, loop: _Loop):
    """step(i, cond, *carried, *captured) -> (i + 1, cond', *carried', *rows): one iteration, the
    body converted by the frontend's subgraph importer into `importer.bb`'s module, each scan
    output with a new leading axis of 1."""
    from tvm import relax

    bb, body = importer.bb, loop.body
    i, cond = relax.Var("iteration", _scalar_type("int64")), relax.Var("cond", _scalar_type("bool"))
    carried = [relax.Var(f"carried{k}", _type(kind)) for k, kind in enumerate(loop.carried)]
    captured = [relax.Var("outer", _capture_type(v.ty)) for _, v in loop.captured]
    scope = {**loop.literals, **{n: p for (n, _), p in zip(loop.captured, captured)},
             **{inp.name: p for inp, p in zip(body.input, [i, cond, *carried])}}
    with bb.function(f"{_ident(loop.name)}_step", [i, cond, *carried, *captured], private=True):
        outputs = _converted_body(importer, body, scope)
        n = len(carried)
        # Every output bound here: emit_func_output would bind a bare call into the block below.
        go = bb.emit(_scalar(bb, outputs[0], "bool", True))
        values = [bb.emit(o) for o in outputs[1:1 + n]]
        rows = [bb.emit(relax.op.expand_dims(o, [0])) for o in outputs[1 + n:]]
        following = bb.emit(relax.op.add(i, relax.const(1, "int64")))
        return bb.emit_func_output(relax.Tuple([following, go, *values, *rows]))


def _converted_body(importer, body: onnx.GraphProto, scope: dict) -> list:
    """The body's outputs, its nodes converted into the function `importer.bb` is building, with
    `scope` (name -> value) the only values it sees besides its own."""
    saved, importer._nodes = importer._nodes, scope
    try:
        result = importer._convert_subgraph(importer.bb, body)
    except BaseException:
        # End the function's block, as onnx_import ends main's, or TVM warns about it on stderr.
        with contextlib.suppress(Exception):
            importer.bb._end_block()
        raise
    finally:
        importer._nodes = saved
    return list(result.fields) if len(body.output) > 1 else [result]


def _loop_functions(bb, loop: _Loop, step):
    """Add rec, halves, drive and more (module docstring) to `bb`'s module; return drive."""
    from tvm import relax

    carried, rows = loop.carried, [_rows(s) for s in loop.scans]
    state_types = [_scalar_type("int64"), _scalar_type("bool"), *(_ret_type(k) for k in carried)]
    rec_ret = relax.TupleType([*state_types, *(_ret_type(r) for r in rows)])
    drive_ret = relax.TupleType([_ret_type(k) for k in [*carried, *rows]])
    base = _ident(loop.name)
    rec = _declare(bb, f"{base}_rec", _params(loop), rec_ret)
    drive = _declare(bb, f"{base}_drive", _params(loop), drive_ret)

    def halves(fb, level, i, cond, *rest):
        values, trips, captured = _split(loop, rest)
        first = fb.emit(relax.op.subtract(level, relax.const(1, "int64")))
        a = _unpack(fb, fb.emit(relax.Call(rec, [first, i, cond, *values, trips, *captured])),
                    [None, None, *carried, *rows])
        b = _unpack(fb, fb.emit(relax.Call(rec, [first, *a[:2 + len(carried)], trips, *captured])),
                    [None, None, *([None] * len(carried)), *rows])
        joined = [fb.emit(relax.op.concat([x, y], 0)) for x, y in zip(a[2 + len(carried):], b[2 + len(carried):])]
        return relax.Tuple([*b[:2 + len(carried)], *joined])

    def rec_body(fb, level, i, cond, *rest):
        values, trips, captured = _split(loop, rest)
        go = _going(fb, cond, i, trips)
        leaf = fb.emit(relax.op.equal(level, relax.const(0, "int64")))
        one = relax.Call(step, [i, cond, *values, *captured])
        two = relax.Call(halves_gv, [level, i, cond, *values, trips, *captured])
        empty = [relax.const(np.zeros([0, *r.dims[1:]], r.dtype)) for r in rows]
        return fb.emit(relax.If(go, relax.If(leaf, one, two), relax.Tuple([i, cond, *values, *empty])))

    def more(fb, level, i, cond, *rest):
        values, trips, captured = _split(loop, rest[:len(rest) - len(rows)])
        earlier = rest[len(rest) - len(rows):]
        later = _unpack(fb, fb.emit(relax.Call(drive, [level, i, cond, *values, trips, *captured])),
                        [*([None] * len(carried)), *rows])
        joined = [fb.emit(relax.op.concat([x, y], 0)) for x, y in zip(earlier, later[len(carried):])]
        return relax.Tuple([*later[:len(carried)], *joined])

    def drive_body(fb, level, i, cond, *rest):
        values, trips, captured = _split(loop, rest)
        a = _unpack(fb, fb.emit(relax.Call(rec, [level, i, cond, *values, trips, *captured])),
                    [None, None, *carried, *rows])
        go = _going(fb, a[1], a[0], trips)
        following = fb.emit(relax.op.add(level, relax.const(1, "int64")))
        on = relax.Call(more_gv, [following, a[0], a[1], *a[2:2 + len(carried)], trips, *captured,
                                  *a[2 + len(carried):]])
        return fb.emit(relax.If(go, on, relax.Tuple(a[2:])))

    halves_gv = bb.add_func(_function(_params(loop), halves), f"{base}_halves")
    more_params = [*_params(loop), *(relax.Var("rows", _type(r)) for r in rows)]
    more_gv = bb.add_func(_function(more_params, more), f"{base}_more")
    bb.update_func(rec, _function(_params(loop), rec_body, rec_ret))
    bb.update_func(drive, _function(_params(loop), drive_body, drive_ret))
    return drive


def _declare(bb, name: str, params: list, ret):
    """A GlobalVar typed for a function defined later (`update_func`), so that functions can call
    it first. The placeholder carries its name as an attribute: the builder returns the GlobalVar
    of an existing structurally equal function instead of adding another, and two loops' empty
    placeholders of one signature are equal."""
    from tvm import relax

    placeholder = relax.Function.create_empty(params, ret).with_attr("graphopt_declared", bb.get_unique_name(name))
    return bb.add_func(placeholder, name)


def _function(params: list, build, ret=None):
    """A private Relax function of `params` whose body `build(builder, *params)` emits and returns,
    built in a builder of its own (the caller adds it to its module); `ret` its declared type."""
    from tvm import relax

    fb = relax.BlockBuilder()
    with fb.function("f", params, private=True):
        gv = fb.emit_func_output(build(fb, *params))
    func = fb.get()[gv]
    return func if ret is None else relax.Function(func.params, func.body, ret, is_pure=True)


def _params(loop: _Loop) -> list:
    """level, i, cond, *carried, trip count, *captured: the parameters of rec, halves and drive."""
    from tvm import relax

    return [relax.Var("level", _scalar_type("int64")), relax.Var("iteration", _scalar_type("int64")),
            relax.Var("cond", _scalar_type("bool")),
            *(relax.Var(f"carried{k}", _type(kind)) for k, kind in enumerate(loop.carried)),
            relax.Var("trips", _scalar_type("int64")),
            *(relax.Var("outer", _capture_type(v.ty)) for _, v in loop.captured)]


def _split(loop: _Loop, rest: Sequence) -> tuple[list, object, list]:
    n = len(loop.carried)
    return list(rest[:n]), rest[n], list(rest[n + 1:])


def _going(fb, cond, i, trips):
    """Whether the loop runs another iteration: cond and i < M."""
    from tvm import relax

    below = fb.emit(relax.op.less(i, trips))
    return fb.emit(relax.op.logical_and(cond, below))


def _unpack(fb, tup, kinds: Sequence[_Kind | None]) -> list:
    """The fields of tuple `tup`, each not-static one match_cast to its kind (None: as it is), so
    that the next call or concat sees its rank and static dims."""
    from tvm import relax

    fields = []
    for k, kind in enumerate(kinds):
        field = fb.emit(relax.TupleGetItem(tup, k))
        fields.append(field if kind is None or kind.static else fb.match_cast(field, _type(kind)))
    return fields


def _scalar(bb, value, dtype: str, default):
    """`value` as a 0-d tensor of `dtype` (ONNX allows shape [1] here); `default` when absent."""
    from tvm import relax

    if value is None:
        return relax.const(default, dtype)
    value = bb.normalize(value)
    ty = value.ty
    if not isinstance(ty, relax.TensorType):
        raise CodegenError(f"its trip count or condition is a {ty}, not a tensor")
    if ty.ndim != 0:
        value = bb.emit(relax.op.reshape(value, []))
    if ty.dtype != dtype:
        value = bb.emit(relax.op.astype(value, dtype))
    return value


def _kind(ty) -> _Kind:
    from tvm import relax, tirx

    if not isinstance(ty, relax.TensorType) or ty.ndim < 0:
        raise CodegenError(f"a loop value has type {ty}; graphopt needs tensors of known rank")
    if not isinstance(ty.shape, relax.ShapeExpr):
        return _Kind(str(ty.dtype), ty.ndim, None)
    dims = tuple(int(d) if isinstance(d, tirx.IntImm) else None for d in ty.shape.values)
    return _Kind(str(ty.dtype), ty.ndim, dims)


def _join(kind: _Kind, returned: _Kind, what: str) -> _Kind:
    """The kind both hold: each dim static where both agree, else symbolic."""
    if kind.dtype != returned.dtype or kind.ndim != returned.ndim:
        raise CodegenError(f"its {what} enters as {kind.dtype} of rank {kind.ndim} and leaves the body "
                           f"as {returned.dtype} of rank {returned.ndim}")
    if kind.dims is None or returned.dims is None:
        return _Kind(kind.dtype, kind.ndim, None)
    return _Kind(kind.dtype, kind.ndim, tuple(a if a == b else None for a, b in zip(kind.dims, returned.dims)))


def _element(rows: _Kind) -> _Kind:
    """One iteration's value of a scan output, from the step's (1, ...) rows."""
    return _Kind(rows.dtype, rows.ndim - 1, None if rows.dims is None else rows.dims[1:])


def _rows(element: _Kind) -> _Kind:
    """A scan output: its iterations' values stacked on a new, symbolic axis 0."""
    return _Kind(element.dtype, element.ndim + 1, None if element.dims is None else (None, *element.dims))


def _type(kind: _Kind):
    """A tensor type of `kind`, with a fresh symbolic var for each symbolic dim: each function
    defines its own."""
    from tvm import relax, tirx

    if kind.dims is None:
        return relax.TensorType(ndim=kind.ndim, dtype=kind.dtype)
    return relax.TensorType([tirx.Var(f"d{k}", "int64") if d is None else d for k, d in enumerate(kind.dims)],
                            kind.dtype)


def _ret_type(kind: _Kind):
    """What a loop function returns for `kind`: its symbolic dims are not its parameters'."""
    from tvm import relax

    return _type(kind) if kind.static else relax.TensorType(ndim=kind.ndim, dtype=kind.dtype)


def _capture_type(ty):
    """The parameter type of a captured outer value: its shape's symbolic vars are main's."""
    from tvm import relax

    if isinstance(ty, relax.TensorType):
        return _type(_kind(ty))
    if isinstance(ty, relax.ShapeType):
        return relax.ShapeType(ndim=ty.ndim)
    return ty


def _scalar_type(dtype: str):
    from tvm import relax

    return relax.TensorType([], dtype)


def _ident(name: str) -> str:
    """`name` (an ONNX node name such as '/Loop') as a function name."""
    kept = "".join(c if c.isalnum() else "_" for c in name).strip("_")
    return kept if kept[:1].isalpha() else f"loop_{kept}"
