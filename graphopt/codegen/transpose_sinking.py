"""Transposes moved below elementwise operators (and reductions that keep their axes), and
cancelled where two meet.

graphopt's int8 kernels compute NHWC and hand their result to the rest of the (NCHW) ONNX graph
through a transpose; the next int8 kernel transposes back. Between the two there is often a
float island that quantize_static left in float: DequantizeLinear -> Add -> Relu ->
QuantizeLinear. Each transpose costs a pass over the tensor, strided on one side (a fifth of
an int8 ResNet's time). Moving `permute_dims` below every elementwise operator whose other
operands are scalars, or the same transpose, brings the pair together, and a transpose of a
transpose is composed (the identity: removed). Unused bindings left behind are removed.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tvm

# Elementwise in their first operand; the others (if any) must be scalars or the same transpose.
_UNARY = frozenset({"relax.nn.relu", "relax.astype", "relax.clip", "relax.sigmoid", "relax.tanh",
                    "relax.negative", "relax.round", "relax.floor", "relax.ceil", "relax.abs"})
_BINARY = frozenset({"relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum",
                     "relax.minimum"})
# Elementwise when their scale and zero point are scalars (per-tensor); `axis` is then unused.
_PER_TENSOR = frozenset({"relax.quantize", "relax.dequantize"})
# Reductions that keep the reduced axes: the same transpose applies to their result.
_REDUCTIONS = {"relax.mean": "mean", "relax.sum": "sum", "relax.max": "max", "relax.min": "min"}


def sink_transposes() -> tvm.transform.Pass:
    """The module pass."""
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class Sinker(relax.PyExprMutator):
        def visit_call_(self, call):
            call = self.visit_expr_post_order(call)
            name = getattr(call.op, "name", None)
            rewritten = None
            if name == "relax.permute_dims":
                rewritten = self._composed(call)
            elif name in _UNARY or name in _BINARY or name in _PER_TENSOR:
                rewritten = self._sunk(call, name)
            elif name in _REDUCTIONS:
                rewritten = self._reduced(call, _REDUCTIONS[name])
            return call if rewritten is None else rewritten

        def _transpose(self, expr):
            """(source, axes) when expr is a permute_dims with explicit axes, or bound to one."""
            bound = self.lookup_binding(expr) if isinstance(expr, relax.Var) else expr
            if (isinstance(bound, relax.Call) and getattr(bound.op, "name", None) == "relax.permute_dims"
                    and bound.attrs.axes is not None):
                return bound.args[0], [int(a) for a in bound.attrs.axes]
            return None

        def _composed(self, call):
            inner = self._transpose(call.args[0])
            if inner is None or call.attrs.axes is None:
                return None
            source, first = inner
            axes = [first[int(a)] for a in call.attrs.axes]
            return source if axes == list(range(len(axes))) else relax.op.permute_dims(source, axes)

        def _sunk(self, call, name):
            moved = self._transpose(call.args[0])
            if moved is None:
                return None
            source, axes = moved
            args = [source]
            for arg in call.args[1:]:
                other = self._transpose(arg) if name in _BINARY else None
                if other is not None and other[1] == axes:
                    args.append(other[0])
                elif _is_scalar(arg):
                    args.append(arg)
                else:
                    return None
            inner = self.builder_.emit(relax.Call(call.op, args, call.attrs, call.ty_args))
            return relax.op.permute_dims(inner, axes)

        def _reduced(self, call, op: str):
            moved = self._transpose(call.args[0])
            if moved is None or not call.attrs.keepdims or call.attrs.axis is None:
                return None
            source, axes = moved
            reduced = getattr(relax.op, op)(source, [axes[int(a) % len(axes)] for a in call.attrs.axis], keepdims=True)
            return relax.op.permute_dims(self.builder_.emit(reduced), axes)

    @tvm.transform.module_pass(opt_level=0, name="GraphoptSinkTransposes")
    def _sink(mod, _ctx):
        sinker = Sinker(mod)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                sinker.builder_.update_func(gvar, sinker.visit_expr(func))
        return relax.transform.DeadCodeElimination()(sinker.builder_.get())

    return _sink


def _is_scalar(expr) -> bool:
    """A scalar value (clip's bounds), or a tensor of one element (which broadcasts the same in
    any layout)."""
    import tvm
    from tvm import relax, tirx

    ty = getattr(expr, "ty", None)
    if isinstance(ty, tvm.ir.PrimType):
        return True
    shape = getattr(ty, "shape", None)
    return (isinstance(shape, relax.ShapeExpr)
            and all(isinstance(d, tirx.IntImm) and int(d) == 1 for d in shape.values))
