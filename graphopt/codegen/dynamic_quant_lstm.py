"""com.microsoft DynamicQuantizeLSTM, the LSTM with int8 weights that onnxruntime's
quantize_dynamic makes of an LSTM, as onnxruntime computes it.

Inputs (onnxruntime's contrib operator): X, W, R, B, sequence_lens, initial_h, initial_c, P as
LSTM's, except that W [directions, input, 4 * hidden] and R [directions, hidden, 4 * hidden]
are int8 or uint8 and stored transposed relative to LSTM's; then W_scale, W_zero_point, R_scale
and R_zero_point, per direction ([directions]) or per column ([directions, 4 * hidden]).
onnxruntime uses one zero point per direction, the first (it rejects per-column zero points that
differ; so does this converter). Attributes as LSTM's, without layout.

onnxruntime quantizes the float operand of each product at run time (`dynamic_quant`): X once
per direction over the steps it runs (all of them, or up to the longest of sequence_lens), and
the hidden state at every step, before its product by R; each int32 product times
x_scale * w_scale is the float gate input. This converter emulates that, with `recurrent.lstm`'s
unrolled recurrence and these two products in place of its float ones. Running a float LSTM on
dequantized weights instead was measured 1e-2 to 1e-1 away from onnxruntime's outputs on
quantize_dynamic's LSTMs, far outside the tolerance; the emulation agrees to about 1e-7.

Where onnxruntime is not deterministic, it matches onnxruntime run on one thread: spreading a
batch over threads (more than 4 entries, or 2 or more with hidden <= 256), onnxruntime quantizes
each thread's share of the hidden state's rows separately, so its results then depend on its
thread count; this converter quantizes the whole batch, as one thread does. With sequence_lens
of unequal lengths, ended entries (which onnxruntime zeroes) and, in reverse, entries at other
steps share a step's range, so results agree within quantization steps, not to 1e-7.

Verified by tests/codegen/test_dynamic_quant.py against onnxruntime on LSTMs quantize_dynamic made.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from graphopt.codegen import dynamic_quant, recurrent
from graphopt.codegen.recurrent_cell import Setup
from graphopt.ir.errors import CodegenError

if TYPE_CHECKING:
    from tvm import relax


@dataclass(frozen=True)
class _Weights:
    """One weight input: int32 values less their zero point [directions, rows, 4 * hidden], and
    float32 scales per column [directions, 4 * hidden]."""

    values: np.ndarray
    scale: np.ndarray


def dynamic_quantize_lstm(bb: relax.BlockBuilder, inputs: Sequence, attrs: dict[str, Any]) -> relax.Expr:
    """DynamicQuantizeLSTM(X, W, R, [B], [sequence_lens], [initial_h], [initial_c], [P], W_scale,
    W_zero_point, R_scale, R_zero_point) -> (Y, Y_h, Y_c)."""
    w = _weights(inputs[1], inputs[8], inputs[9], "W")
    r = _weights(inputs[2], inputs[10], inputs[11], "R")
    hidden = r.values.shape[1]
    if int(attrs.get("hidden_size", hidden)) != hidden or r.values.shape[2] != 4 * hidden:
        raise CodegenError(f"R must have shape [directions, hidden_size, 4 * hidden_size], not "
                           f"{list(r.values.shape)} with hidden_size {attrs.get('hidden_size')}")
    if w.values.shape[0] != r.values.shape[0] or w.values.shape[2] != 4 * hidden:
        raise CodegenError(f"W must have shape [directions, input_size, 4 * hidden_size] = "
                           f"[{r.values.shape[0]}, input_size, {4 * hidden}], not {list(w.values.shape)}")
    products = functools.partial(_products, bb, inputs[3], w, r, {})
    return recurrent.lstm(bb, list(inputs[:8]), {**attrs, "hidden_size": hidden}, products)


CONVERTERS: dict[str, Callable] = {"DynamicQuantizeLSTM": dynamic_quantize_lstm}


def _products(bb, b, w: _Weights, r: _Weights, cache: dict, s: Setup, d: int) -> tuple[Any, Callable]:
    """Direction d's products, for `recurrent.lstm`: X W[d] plus the biases, and h -> h R[d];
    X is quantized once for both directions (`cache`)."""
    from tvm import relax

    if s.dtype != "float32" or w.values.shape[1] != int(s.x.ty.shape.values[2]):
        raise CodegenError(f"X must be float32 [seq, batch, {w.values.shape[1]}] to match W, "
                           f"not {s.dtype} {[int(v) for v in s.x.ty.shape.values]}")
    if "x" not in cache:
        cache["x"] = dynamic_quant.quantize(bb, _steps_run(bb, s))
    bias, _ = recurrent._biases(bb, b, d, 4 * s.hidden, None)
    xw = dynamic_quant.quantized_matmul(bb, cache["x"], w.values[d], w.scale[d], bias)

    def recurrent_product(h: relax.Expr) -> relax.Expr:
        return dynamic_quant.quantized_matmul(bb, dynamic_quant.quantize(bb, h), r.values[d], r.scale[d])

    return bb.emit(relax.op.reshape(xw, [s.seq, s.batch, 4 * s.hidden])), recurrent_product


def _steps_run(bb, s: Setup):
    """X [seq, batch, input] with the steps past the longest sequence zeroed: onnxruntime
    quantizes only the steps it runs, and zeros leave the range [min(x, 0), max(x, 0)] as it is.
    No step computes with the zeroed rows: every sequence has ended there."""
    from tvm import relax

    if s.lens is None:
        return s.x
    steps = relax.const(np.arange(s.seq, dtype=np.int64).reshape(s.seq, 1, 1))
    running = relax.op.less(steps, relax.op.max(s.lens))
    return bb.emit(relax.op.where(running, s.x, relax.const(0.0, s.dtype)))


def _weights(values, scale, zero_point, name: str) -> _Weights:
    """W or R, their scales and zero points (initializers), per direction."""
    q, scale, zero_point = (_constant(v, what) for v, what in ((values, name), (scale, f"{name}_scale"),
                                                                (zero_point, f"{name}_zero_point")))
    if q.ndim != 3 or q.dtype not in (np.int8, np.uint8):
        raise CodegenError(f"{name} must be int8 or uint8 [directions, rows, 4 * hidden_size], "
                           f"not {q.dtype} {list(q.shape)}")
    directions, _, width = q.shape
    scale = scale.astype(np.float32).reshape(directions, -1)
    zero_point = zero_point.astype(np.int32).reshape(directions, -1)
    if scale.shape[1] not in (1, width) or zero_point.shape != scale.shape:
        raise CodegenError(f"{name}_scale and {name}_zero_point must have shape [{directions}] or "
                           f"[{directions}, {width}], not {list(scale.shape)} and {list(zero_point.shape)}")
    if np.any(zero_point != zero_point[:, :1]):
        raise CodegenError(f"{name}_zero_point differs between columns; onnxruntime takes one zero "
                           f"point per direction")
    centred = q.astype(np.int32) - zero_point[:, :1, None]
    return _Weights(centred, np.ascontiguousarray(np.broadcast_to(scale, (directions, width))))


def _constant(expr, what: str) -> np.ndarray:
    import tvm

    if not isinstance(expr, tvm.ir.GenericConst):
        raise CodegenError(f"{what} must be an initializer (a constant), not computed at run time")
    return expr.value.numpy()
