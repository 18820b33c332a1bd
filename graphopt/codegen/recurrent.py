"""ONNX's recurrent operators, LSTM, GRU and RNN, as Relax: TVM 0.27's ONNX frontend has none.

ONNX semantics: forward, reverse or bidirectional; gates in ONNX's order (LSTM i o f c, GRU z r
h); optional bias B (input and recurrent biases), sequence_lens, initial_h, initial_c and LSTM
peepholes P (i o f); activations (defaults: LSTM Sigmoid Tanh Tanh, GRU Sigmoid Tanh, RNN Tanh)
with their alpha and beta consumed in order by the functions that take them, as onnxruntime reads
them; clip; GRU's linear_before_reset; LSTM's input_forget; layout 0 ([seq, batch, ...]) or 1
(batch first). Outputs Y [seq, directions, batch, hidden], Y_h and, for LSTM, Y_c
[directions, batch, hidden].

The recurrence is unrolled over the sequence, which is static in graphopt's static-shaped
libraries. One matmul projects the input of every step ([seq * batch, input] by
[input, gates * hidden], the biases added). Each step is then the matmul of the previous hidden
state by the transposed recurrent weights and one kernel (`recurrent_cell`) for the gates'
elementwise math, which reads its step's projection at an index passed as a tensor: every step
calls the same two kernels, so the build compiles them once whatever the sequence length (GRU
without linear_before_reset has a second matmul, on the reset hidden state). With sequence_lens,
a batch entry whose sequence has ended keeps its state and outputs zeros, as onnxruntime does;
the reverse direction thereby starts at the entry's last valid step.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from graphopt.codegen import recurrent_cell as cell
from graphopt.codegen.recurrent_cell import Reader, Setup
from graphopt.ir.errors import CodegenError

if TYPE_CHECKING:
    from tvm import relax

_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
_DEFAULT_ACTIVATIONS = {"LSTM": ("Sigmoid", "Tanh", "Tanh"), "GRU": ("Sigmoid", "Tanh"), "RNN": ("Tanh",)}
_DIRECTIONS = {"forward": (False,), "reverse": (True,), "bidirectional": (False, True)}


def lstm(bb: relax.BlockBuilder, inputs: Sequence, attrs: dict[str, Any],
         products: Callable[[Setup, int], tuple[Any, Callable]] | None = None) -> relax.Expr:
    """LSTM(X, W, R, [B], [sequence_lens], [initial_h], [initial_c], [P]) -> (Y, Y_h, Y_c).

    `products(s, d)`, when given, replaces direction d's float products by W and R: it returns
    the input projection with the biases added, [seq, batch, 4 * hidden], and a function from
    the hidden state [1, batch, hidden] to its recurrent product (DynamicQuantizeLSTM's integer
    products, `dynamic_quant_lstm`)."""
    s = _setup(bb, inputs, attrs, "LSTM")
    coupled = bool(int(attrs.get("input_forget", 0)))
    products = products or functools.partial(_float_products, bb, inputs)

    def direction(d: int):
        xw, recurrent_product = products(s, d)
        f, g, h = s.activations[d]
        peep = None if inputs[7] is None else _vector(bb, inputs[7], d, 0, 3 * s.hidden)

        def math(at: Reader):
            def pre(k: int, cell_state=None):
                # Gate k's pre-activation; i, o and f (k < 3) see the cell state through the
                # peephole P, whose parts are in the same order.
                x = at.step(k) + at.gate("hr", k)
                return x if peep is None or cell_state is None else x + at.vector("P", k) * cell_state

            c_prev = at.state("c")
            i = f(at.clip(pre(0, c_prev)))
            forget = cell.const(1.0, s.dtype) - i if coupled else f(at.clip(pre(2, c_prev)))
            c = forget * c_prev + i * g(at.clip(pre(3)))
            return f(at.clip(pre(1, c))) * h(c), c

        def one_step(t: int, state: tuple):
            hr = recurrent_product(state[0])
            tensors = {"xw": xw, "hr": hr, "h": state[0], "c": state[1], "P": peep}
            return cell.step(bb, s, "lstm_cell", t, tensors, math, ("h", "c"))

        return (_initial(bb, s, inputs[5], d), _initial(bb, s, inputs[6], d)), one_step

    return _outputs(bb, s, [_unroll(s, reverse, *direction(d)) for d, reverse in enumerate(s.reverse)])


def gru(bb: relax.BlockBuilder, inputs: Sequence, attrs: dict[str, Any]) -> relax.Expr:
    """GRU(X, W, R, [B], [sequence_lens], [initial_h]) -> (Y, Y_h)."""
    relax = _relax()
    s = _setup(bb, inputs, attrs, "GRU")
    before_reset = bool(int(attrs.get("linear_before_reset", 0)))
    n = s.hidden

    def direction(d: int):
        xw, rec_bias = _projection(bb, s, inputs, d, gru_before_reset=before_reset)
        rt = _transposed(bb, inputs[2], d)
        rt_zr, rt_h = _columns(bb, rt, 0, 2 * n), _columns(bb, rt, 2 * n, 3 * n)
        f, g = s.activations[d]

        def reset(at: Reader):
            return f(at.clip(at.step(1) + at.gate("hr", 1)))

        def math(at: Reader):
            z = f(at.clip(at.step(0) + at.gate("hr", 0)))
            if before_reset:  # r * (h R_h^T + Rb_h)
                recurrent = at.gate("hr", 2)
                if rec_bias is not None:
                    recurrent = recurrent + at.vector("rbh", 0)
                candidate = g(at.clip(at.step(2) + reset(at) * recurrent))
            else:  # (r * h) R_h^T, computed by the matmul between the two kernels
                candidate = g(at.clip(at.step(2) + at.state("rh_r")))
            return ((cell.const(1.0, s.dtype) - z) * candidate + z * at.state("h"),)

        def one_step(t: int, state: tuple):
            tensors = {"xw": xw, "h": state[0], "rbh": rec_bias}
            if before_reset:
                tensors["hr"] = bb.emit(relax.op.matmul(state[0], rt))
            else:
                tensors["hr"] = bb.emit(relax.op.matmul(state[0], rt_zr))
                (rh,) = cell.kernel(bb, s, "gru_reset", t, tensors, lambda at: (reset(at) * at.state("h"),), 1)
                tensors["rh_r"] = bb.emit(relax.op.matmul(rh, rt_h))
            return cell.step(bb, s, "gru_cell", t, tensors, math, ("h",))

        return (_initial(bb, s, inputs[5], d),), one_step

    return _outputs(bb, s, [_unroll(s, reverse, *direction(d)) for d, reverse in enumerate(s.reverse)])


def rnn(bb: relax.BlockBuilder, inputs: Sequence, attrs: dict[str, Any]) -> relax.Expr:
    """RNN(X, W, R, [B], [sequence_lens], [initial_h]) -> (Y, Y_h)."""
    s = _setup(bb, inputs, attrs, "RNN")

    def direction(d: int):
        xw, _ = _projection(bb, s, inputs, d, gru_before_reset=False)
        rt = _transposed(bb, inputs[2], d)
        (f,) = s.activations[d]

        def one_step(t: int, state: tuple):
            hr = bb.emit(_relax().op.matmul(state[0], rt))
            return cell.step(bb, s, "rnn_cell", t, {"xw": xw, "hr": hr, "h": state[0]},
                             lambda at: (f(at.clip(at.step(0) + at.gate("hr", 0))),), ("h",))

        return (_initial(bb, s, inputs[5], d),), one_step

    return _outputs(bb, s, [_unroll(s, reverse, *direction(d)) for d, reverse in enumerate(s.reverse)])


CONVERTERS: dict[str, Callable] = {"LSTM": lstm, "GRU": gru, "RNN": rnn}


# -- the node's attributes and inputs ----------------------------------------------------------
def _setup(bb, inputs: Sequence, attrs: dict, op: str) -> Setup:
    relax = _relax()
    layout = int(attrs.get("layout", 0))
    x = inputs[0]
    shape = _static_shape(x, op, "X")
    if len(shape) != 3 or layout not in (0, 1):
        raise CodegenError(f"{op}: X must have rank 3 and layout be 0 or 1, not shape {shape} "
                           f"and layout {layout}")
    if layout == 1:
        x = bb.emit(relax.op.permute_dims(x, [1, 0, 2]))
        shape = [shape[1], shape[0], shape[2]]
    direction = cell.text(attrs.get("direction", "forward"))
    if direction not in _DIRECTIONS:
        raise CodegenError(f"{op}: direction must be one of {', '.join(_DIRECTIONS)}, not '{direction}'")
    reverse = _DIRECTIONS[direction]
    hidden = int(attrs.get("hidden_size", 0)) or _static_shape(inputs[2], op, "R")[-1]
    clip = float(attrs["clip"]) if "clip" in attrs else None
    dtype = str(x.ty.dtype)
    activations = cell.activations(attrs, op, _DEFAULT_ACTIVATIONS[op], len(reverse), dtype)
    return Setup(_GATES[op], x, shape[0], shape[1], hidden, dtype, reverse, activations, clip,
                 _lengths(bb, inputs[4], shape[0], shape[1]), layout)


def _lengths(bb, lens, seq: int, batch: int):
    """sequence_lens as [1, batch, 1] int64, or None when it is absent or every sequence is full."""
    relax = _relax()
    if lens is None:
        return None
    if _is_constant(lens):
        values = lens.value.numpy().reshape(-1)
        if np.all(values >= seq):
            return None
        return relax.const(values.astype(np.int64).reshape(1, batch, 1))
    return bb.emit(relax.op.astype(relax.op.reshape(lens, [1, batch, 1]), "int64"))


def _unroll(s: Setup, reverse: bool, state: tuple, one_step: Callable) -> tuple[list, tuple]:
    """Every step's output in time order and the final state, stepping backwards when `reverse`."""
    ys: list = [None] * s.seq
    for t in (range(s.seq - 1, -1, -1) if reverse else range(s.seq)):
        ys[t], state = one_step(t, state)
    return ys, state


# -- weights -----------------------------------------------------------------------------------
def _float_products(bb, inputs: Sequence, s: Setup, d: int) -> tuple[Any, Callable]:
    """LSTM's products of direction d: X W[d]^T plus the biases, and h -> h R[d]^T."""
    xw, _ = _projection(bb, s, inputs, d, gru_before_reset=False)
    rt = _transposed(bb, inputs[2], d)
    return xw, lambda h: bb.emit(_relax().op.matmul(h, rt))


def _projection(bb, s: Setup, inputs: Sequence, d: int, gru_before_reset: bool):
    """X W[d]^T plus the biases, [seq, batch, gates * hidden]; and the recurrent bias of GRU's
    candidate gate when `gru_before_reset` (linear_before_reset: it is added inside the reset
    gate's product, not to the projection), else None."""
    relax = _relax()
    width = s.gates * s.hidden
    x2d = bb.emit(relax.op.reshape(s.x, [s.seq * s.batch, -1]))
    xw = bb.emit(relax.op.matmul(x2d, _transposed(bb, inputs[1], d)))
    bias, rec_bias = _biases(bb, inputs[3], d, width, s.hidden if gru_before_reset else None)
    if bias is not None:
        xw = bb.emit(relax.op.add(xw, bias))
    return bb.emit(relax.op.reshape(xw, [s.seq, s.batch, width])), rec_bias


def _biases(bb, b, d: int, width: int, apart: int | None):
    """(Wb + Rb, None) of direction d, or with `apart` (the hidden size) the candidate gate's Rb
    left out of the sum and returned second."""
    relax = _relax()
    if b is None:
        return None, None
    mask = np.ones(width, np.float32)
    if apart is not None:
        mask[2 * apart:] = 0
    if _is_constant(b):
        row = b.value.numpy()[d]
        wb, rb = row[:width], row[width:]
        rec = None if apart is None else relax.const(np.ascontiguousarray(rb[2 * apart:]))
        return relax.const((wb + rb * mask.astype(rb.dtype)).astype(rb.dtype)), rec
    wb, rb = _vector(bb, b, d, 0, width), _vector(bb, b, d, width, 2 * width)
    summed = bb.emit(relax.op.add(wb, relax.op.multiply(rb, relax.const(mask.astype(str(b.ty.dtype))))))
    return summed, None if apart is None else _vector(bb, b, d, width + 2 * apart, 2 * width)


def _transposed(bb, w, d: int):
    """W[d]^T (or R[d]^T): [in, gates * hidden]; transposed in numpy when W is a constant."""
    relax = _relax()
    if _is_constant(w):
        return relax.const(np.ascontiguousarray(w.value.numpy()[d].T))
    row = bb.emit(relax.op.squeeze(_slice(bb, w, 0, d, d + 1), [0]))
    return bb.emit(relax.op.permute_dims(row, [1, 0]))


def _columns(bb, x, begin: int, end: int):
    """x[:, begin:end] of a 2-D matrix: a constant stays a constant."""
    if _is_constant(x):
        return _relax().const(np.ascontiguousarray(x.value.numpy()[:, begin:end]))
    return _slice(bb, x, 1, begin, end)


def _vector(bb, t, d: int, begin: int, end: int):
    """t[d, begin:end] of a [directions, n] tensor (B, P)."""
    relax = _relax()
    if _is_constant(t):
        return relax.const(np.ascontiguousarray(t.value.numpy()[d, begin:end]))
    return bb.emit(relax.op.squeeze(_slice(bb, _slice(bb, t, 0, d, d + 1), 1, begin, end), [0]))


def _initial(bb, s: Setup, state, d: int):
    """initial_h or initial_c of direction d, [1, batch, hidden]; zeros when absent."""
    relax = _relax()
    if state is None:
        return relax.const(np.zeros((1, s.batch, s.hidden), s.dtype))
    if s.layout == 1:
        state = bb.emit(relax.op.permute_dims(state, [1, 0, 2]))
    return _slice(bb, state, 0, d, d + 1)


# -- outputs -----------------------------------------------------------------------------------
def _outputs(bb, s: Setup, finals: list) -> relax.Expr:
    """(Y, Y_h[, Y_c]) from each direction's (outputs in time order, final state)."""
    relax = _relax()
    per_direction = [cell.concat_rows(bb, ys) for ys, _ in finals]
    y = _concat(bb, [bb.emit(relax.op.expand_dims(yd, [1])) for yd in per_direction], axis=1)
    states = [_concat(bb, [state[k] for _, state in finals]) for k in range(len(finals[0][1]))]
    if s.layout == 1:
        y = bb.emit(relax.op.permute_dims(y, [2, 0, 1, 3]))
        states = [bb.emit(relax.op.permute_dims(st, [1, 0, 2])) for st in states]
    return relax.Tuple([y, *states])


def _concat(bb, tensors: list, axis: int = 0):
    """Concat of the directions' tensors, not stack: TVM 0.27's ConvertLayout fails on
    relax.op.stack, and then leaves every convolution of the model in NCHW."""
    return tensors[0] if len(tensors) == 1 else bb.emit(_relax().op.concat(tensors, axis=axis))


# -- small helpers -----------------------------------------------------------------------------
def _slice(bb, x, axis: int, begin: int, end: int):
    return bb.emit(_relax().op.strided_slice(x, [axis], [begin], [end]))


def _static_shape(expr, op: str, what: str) -> list[int]:
    from tvm import tirx

    shape = getattr(expr.ty, "shape", None)
    values = getattr(shape, "values", None)
    if values is None or not all(isinstance(v, tirx.IntImm) for v in values):
        raise CodegenError(f"{op}: {what} has no static shape; give the model's inputs static "
                           f"shapes (--input-shape)")
    return [int(v) for v in values]


def _is_constant(expr) -> bool:
    import tvm

    return isinstance(expr, tvm.ir.GenericConst)


def _relax():
    from tvm import relax

    return relax
