"""One step of a recurrent operator (`recurrent`) as one TE kernel: the gates' elementwise math.

The kernel computes [1, batch, hidden] outputs from the step's projection `xw` ([seq, batch,
gates * hidden], read at the step given as a tensor), the recurrent matmul's result and the
previous state. The step is an argument, not a constant baked into the kernel, so that every step
calls one PrimFunc (the BlockBuilder keeps one copy of structurally equal ones): the build
compiles it once, where per-step Relax ops made a kernel per step and a build quadratic in the
sequence length. A step with sequence_lens returns the step's output zeroed and the state kept
where the entry's sequence has ended.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from graphopt.codegen.int8_kernels import OPAQUE
from graphopt.ir.errors import CodegenError

_ROWS_FAN_IN = 16


@dataclass(frozen=True)
class Setup:
    """What every direction of one recurrent node shares."""

    gates: int
    x: Any            # [seq, batch, input], layout 0
    seq: int
    batch: int
    hidden: int
    dtype: str
    reverse: tuple[bool, ...]
    activations: list[list[Callable]]   # per direction, in the op's order: scalar -> scalar
    clip: float | None
    lens: Any         # [1, batch, 1] int64 sequence lengths, or None when every sequence is full
    layout: int


class Reader:
    """The kernel's inputs at the output element (0, b, j), by the names they were passed under."""

    def __init__(self, tensors: Mapping[str, Any], step, b, j, s: Setup):
        self._tensors, self._step, self._b, self._j, self._s = tensors, step, b, j, s

    def step(self, gate: int):
        """Gate `gate` of this step's input projection."""
        return self._tensors["xw"][self._step, self._b, gate * self._s.hidden + self._j]

    def gate(self, name: str, gate: int):
        """Gate `gate` of a [1, batch, gates * hidden] tensor (the recurrent matmul's result)."""
        return self._tensors[name][0, self._b, gate * self._s.hidden + self._j]

    def state(self, name: str):
        """A [1, batch, hidden] tensor's element."""
        return self._tensors[name][0, self._b, self._j]

    def vector(self, name: str, part: int):
        """Part `part` of a [parts * hidden] vector (peepholes, a bias)."""
        return self._tensors[name][part * self._s.hidden + self._j]

    def clip(self, x):
        """x clipped to the op's `clip`, applied to every activation's input."""
        from tvm import tirx

        if self._s.clip is None:
            return x
        return tirx.max(tirx.min(x, const(self._s.clip, self._s.dtype)), const(-self._s.clip, self._s.dtype))

    def running(self):
        """Whether this batch entry's sequence has not ended at this step."""
        return self._step < self._tensors["lens"][0, self._b, 0]


def kernel(bb, s: Setup, name: str, t: int, tensors: Mapping[str, Any],
           outputs: Callable[[Reader], Sequence], count: int) -> list:
    """Emit the kernel computing `outputs(reader)` (`count` [1, batch, hidden] tensors) at step t
    from `tensors` (None entries are left out); the emitted outputs."""
    from tvm import relax, te

    names = [k for k, v in tensors.items() if v is not None]
    args = [tensors[k] for k in names] + [relax.const(np.array([t], np.int64))]

    def compute(*arrays):
        by_name, step = dict(zip(names, arrays)), arrays[-1]

        def element(_, b, j):
            return list(outputs(Reader(by_name, step[0], b, j, s)))

        return te.compute((1, s.batch, s.hidden), element, name=name)

    out = bb.emit_te(compute, *args, primfunc_name_hint=name)
    return [out] if count == 1 else [bb.emit(relax.TupleGetItem(out, k)) for k in range(count)]


def step(bb, s: Setup, name: str, t: int, tensors: Mapping[str, Any],
         math: Callable[[Reader], Sequence], states: Sequence[str]) -> tuple[Any, tuple]:
    """One step: `math` gives the new states (the hidden state first) from `tensors`, which hold
    the previous states under the names `states`. Returns (y_t, new states)."""
    from tvm import tirx

    if s.lens is None:
        new = kernel(bb, s, name, t, tensors, math, len(states))
        return new[0], tuple(new)

    def masked(at: Reader):
        new, running = math(at), at.running()
        kept = [tirx.Select(running, value, at.state(n)) for value, n in zip(new, states)]
        return [tirx.Select(running, new[0], const(0.0, s.dtype)), *kept]

    outs = kernel(bb, s, name, t, {**tensors, "lens": s.lens}, masked, len(states) + 1)
    return outs[0], tuple(outs[1:])


def concat_rows(bb, pieces: Sequence):
    """The tensors `pieces` concatenated along their first axis.

    On a CPU target, by loop-nest copies in a tree of kernels of at most _ROWS_FAN_IN inputs.
    Not relax's concat: TOPI's tests each element against every input (seq^2 work), and FuseOps
    fuses a tree of them back into one kernel. Kernels of a few inputs: one of a whole sequence
    has an argument check per step, megabytes of LLVM IR. Elsewhere (a GPU, where these host
    loops cannot run, or no target) relax's concat."""
    import tvm

    target = tvm.target.Target.current(allow_none=True)
    if target is None or target.kind.name != "llvm":
        return pieces[0] if len(pieces) == 1 else bb.emit(tvm.relax.op.concat(list(pieces), axis=0))
    while len(pieces) > 1:
        pieces = [group[0] if len(group) == 1 else _copy_rows(bb, group)
                  for group in (pieces[k:k + _ROWS_FAN_IN] for k in range(0, len(pieces), _ROWS_FAN_IN))]
    return pieces[0]


def _copy_rows(bb, pieces: Sequence):
    from tvm import relax, tirx

    shapes = [[int(d) for d in p.ty.shape.values] for p in pieces]
    dtype = str(pieces[0].ty.dtype)
    sources = [tirx.decl_buffer(shape, dtype, name=f"piece{k}") for k, shape in enumerate(shapes)]
    out_shape = [sum(shape[0] for shape in shapes), *shapes[0][1:]]
    out = tirx.decl_buffer(out_shape, dtype, name="rows")
    copies, offset = [], 0
    for source, shape in zip(sources, shapes):
        loops = [tirx.Var(f"i{a}", "int64") for a in range(len(out_shape))]  # a For binds its own var
        body = tirx.BufferStore(out, tirx.BufferLoad(source, loops), [loops[0] + offset, *loops[1:]])
        for var, extent in reversed(list(zip(loops, shape))):
            body = tirx.For(var, tirx.IntImm("int64", 0), tirx.IntImm("int64", extent), tirx.ForKind.SERIAL, body)
        copies.append(body)
        offset += shape[0]
    # Loop nests without blocks: nothing to schedule, and opaque to FuseOps.
    func = tirx.PrimFunc([*sources, out], tirx.SeqStmt(copies)).with_attrs(
        {"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": OPAQUE})
    gvar = bb.add_func(func, "recurrent_rows")
    return bb.emit(relax.call_tir(gvar, list(pieces), relax.TensorType(out_shape, dtype)))


# -- activations: name -> (takes alpha, takes beta, default alpha, default beta, function) -----
def _sigmoid(x, alpha, beta, dtype):
    from tvm import tirx

    return tirx.sigmoid(x)


def _tanh(x, alpha, beta, dtype):
    from tvm import tirx

    return tirx.tanh(x)


def _relu(x, alpha, beta, dtype):
    from tvm import tirx

    return tirx.max(x, const(0.0, dtype))


def _leaky_relu(x, alpha, beta, dtype):
    from tvm import tirx

    return tirx.Select(x >= const(0.0, dtype), x, x * const(alpha, dtype))


def _hard_sigmoid(x, alpha, beta, dtype):
    from tvm import tirx

    linear = x * const(alpha, dtype) + const(beta, dtype)
    return tirx.max(tirx.min(linear, const(1.0, dtype)), const(0.0, dtype))


def _softsign(x, alpha, beta, dtype):
    from tvm import tirx

    return x / (tirx.abs(x) + const(1.0, dtype))


def _softplus(x, alpha, beta, dtype):
    from tvm import tirx

    return tirx.log(tirx.exp(x) + const(1.0, dtype))


def _elu(x, alpha, beta, dtype):
    from tvm import tirx

    negative = (tirx.exp(x) - const(1.0, dtype)) * const(alpha, dtype)
    return tirx.Select(x >= const(0.0, dtype), x, negative)


_ACTIVATIONS: dict[str, tuple[bool, bool, float, float, Callable]] = {
    "sigmoid": (False, False, 0.0, 0.0, _sigmoid), "tanh": (False, False, 0.0, 0.0, _tanh),
    "relu": (False, False, 0.0, 0.0, _relu), "leakyrelu": (True, False, 0.01, 0.0, _leaky_relu),
    "hardsigmoid": (True, True, 0.2, 0.5, _hard_sigmoid), "softsign": (False, False, 0.0, 0.0, _softsign),
    "softplus": (False, False, 0.0, 0.0, _softplus), "elu": (True, False, 1.0, 0.0, _elu),
}


def activations(attrs: Mapping, op: str, defaults: Sequence[str], directions: int,
                dtype: str) -> list[list[Callable]]:
    """The node's activation functions per direction, scalar -> scalar of `dtype`, each with its
    alpha and beta: those are consumed in order by the functions that take them (onnxruntime's
    reading)."""
    names = [text(a) for a in attrs.get("activations", ())] or list(defaults) * directions
    per = len(defaults)
    if len(names) != per * directions:
        raise CodegenError(f"{op}: {len(names)} activations given, {per * directions} expected "
                           f"({per} per direction)")
    alphas, betas = list(attrs.get("activation_alpha", ())), list(attrs.get("activation_beta", ()))
    functions = []
    for name in names:
        if name.lower() not in _ACTIVATIONS:
            raise CodegenError(f"{op}: activation '{name}' is not supported "
                               f"(supported: {', '.join(sorted(_ACTIVATIONS))})")
        takes_alpha, takes_beta, alpha, beta, function = _ACTIVATIONS[name.lower()]
        alpha = float(alphas.pop(0)) if takes_alpha and alphas else alpha
        beta = float(betas.pop(0)) if takes_beta and betas else beta
        functions.append(functools.partial(function, alpha=alpha, beta=beta, dtype=dtype))
    return [functions[k * per:(k + 1) * per] for k in range(directions)]


def const(value: float, dtype: str):
    from tvm import tirx

    return tirx.const(value, dtype)


def text(value) -> str:
    """An attribute's string (the frontend gives bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)
