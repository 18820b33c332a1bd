"""The Relax pipeline graphopt compiles CPU targets with (x86, aarch64).

TVM 0.27's CPU pipeline legalizes and fuses operators and then schedules none of the kernels;
this one runs the same TVM passes with these changes:

1. convolutions become NHWC with HWIO weights (`ConvertLayout`), so that output channels are the
   contiguous axis of the output and of the weights, the axis the default schedules vectorize;
2. inference batch_norm with constant statistics becomes a multiply and an add, dropout the
   identity, scalar constants of elementwise operators get their tensor's rank (and Clip is
   `min_max.py`'s maximum and minimum), and constant weights are transposed in numpy, so that
   BatchNorm and ReLU6 fuse into the convolution before them, ConvertLayout does not trip on
   dropout or scalars, and the build compiles no kernel just to fold a constant;
3. large constant weights are packed for the kernels that read them (`weight_packing`), and
   exp, sigmoid, tanh, erf and softmax become polynomials that vectorize (`_fast_math`);
4. every kernel without a schedule gets `cpu_schedules.schedule`. Kernels a MetaSchedule
   database scheduled (`tirx.is_scheduled`) are left alone: a tuned build keeps its tuned
   kernels and falls back to the defaults only for the rest. (`build.lower_for_tuning` runs
   steps 1 to 3 already, so tuned and default kernels share one layout.)
"""
from __future__ import annotations

import numpy as np

from graphopt.codegen import cpu_schedules, min_max, transpose_sinking, weight_packing
from graphopt.codegen.targets import Target


def pipeline(target: Target):
    """The `relax_pipeline` for `tvm.compile` on a CPU target."""
    import tvm
    # The module, not the package: TVM 0.27's package does not export dataflow_lower_passes.
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    tvm_target = target.tvm_target()

    @tvm.transform.module_pass(opt_level=0, name="GraphoptCPUPipeline")
    def _pipeline(mod, _ctx):
        with tvm_target:
            return tvm.transform.Sequential([
                *schedule_passes(target),
                *cpu.dataflow_lower_passes(tvm_target),
                *cpu.finalize_passes(tvm_target),
            ])(mod)

    return _pipeline


def lowering_passes(target: Target) -> list:
    """The passes up to fused, unscheduled TIR kernels: layout, constant folding, TVM's
    legalization and fusion. These kernels are the workloads MetaSchedule tunes, so that a tuned
    kernel and the default it competes with compute the same NHWC loop nest."""
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    tvm_target = target.tvm_target()
    return [
        *cpu.library_dispatch_passes(tvm_target),
        _inference_forms(),
        _channels_last(),
        # ConvertLayout transposes a tensor once per consumer: a residual's input twice.
        relax.transform.EliminateCommonSubexpr(),
        _constant_layouts(),
        transpose_sinking.sink_transposes(),  # between int8 kernels, which compute NHWC
        # After the layout passes, which know no call_tir:
        weight_packing.pack_weights(cpu_schedules.simd_of(tvm_target).lanes),
        _fast_math(),
        *cpu.legalize_passes(tvm_target),
    ]


def schedule_passes(target: Target) -> list:
    """`lowering_passes`, then the default schedule for every kernel not yet scheduled. Run them
    under the target."""
    from tvm.s_tir import dlight

    rule = dlight.ScheduleRule.from_callable("graphopt_cpu_default")(_schedule_rule)
    return [*lowering_passes(target), dlight.ApplyDefaultSchedule(rule)]


def _schedule_rule(func, target, _tunable: bool):
    return cpu_schedules.schedule(func, cpu_schedules.simd_of(target))


def _channels_last():
    """ConvertLayout to NHWC convolutions, or nothing where TVM 0.27's ConvertLayout fails (it
    rejects tuple-valued operators it has no layout rule for): the kernels then stay NCHW,
    scheduled along their rows instead of their channels, about 3x slower."""
    import tvm
    from tvm import relax

    convert = relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]})

    @tvm.transform.module_pass(opt_level=0, name="GraphoptChannelsLast")
    def _convert(mod, _ctx):
        try:
            return convert(mod)
        except (RuntimeError, IndexError):  # what TVM raises for a failed check (IndexError: relax.op.stack)
            return mod

    return _convert


def rewrite_calls(name: str, rewrite):
    """A module pass that replaces each call, innermost first, with `rewrite(builder, call)`
    where that is not None."""
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):
        def visit_call_(self, call):
            call = self.visit_expr_post_order(call)
            rewritten = rewrite(self.builder_, call)
            return call if rewritten is None else rewritten

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _rewrite(mod, _ctx):
        rewriter = Rewriter(mod)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
        return relax.transform.CanonicalizeBindings()(rewriter.builder_.get())

    return _rewrite


def _inference_forms():
    """batch_norm with constant statistics as a multiply and an add, dropout as the identity,
    scalar operands of elementwise operators with the other operand's rank.

    TVM legalizes batch_norm into a kernel of its own, which nothing fuses into the convolution
    before it; and its ConvertLayout fails on dropout's tuple. Both ops as TVM legalizes them
    for inference, in a form that fuses and converts.
    """
    from tvm import relax

    def rewrite(builder, call):
        name = getattr(call.op, "name", None)
        if name in _ELEMENTWISE_BINARY:
            return _scalar_as_rank(call)
        if name == "relax.nn.dropout":
            return relax.Tuple([call.args[0], builder.emit(relax.op.ones_like(call.args[0]))])
        folded = _scale_and_shift(call) if name == "relax.nn.batch_norm" else None
        if folded is None:
            return None
        scaled = builder.emit(relax.op.multiply(call.args[0], relax.const(folded[0])))
        return relax.Tuple([builder.emit(relax.op.add(scaled, relax.const(folded[1]))),
                            call.args[3], call.args[4]])

    return rewrite_calls("GraphoptInferenceForms", rewrite)


# Binary operators whose layout ConvertLayout infers only when both operands have the same rank.
_ELEMENTWISE_BINARY = frozenset(f"relax.{op}" for op in ("add", "subtract", "multiply", "divide", "maximum",
                                                          "minimum", "power"))


def _scalar_as_rank(call):
    """The call with its scalar constant operand reshaped to [1, ..., 1] of the other's rank;
    None if it has none. ConvertLayout gives up on a binary operator with a scalar operand and
    wraps it in transposes back to NCHW: ReLU6 (Clip, as maximum and minimum with scalars) then
    stays out of every MobileNet convolution's epilogue, a kernel and two transposes of its own."""
    import tvm
    from tvm import relax

    ranks = [len(a.ty.shape.values) if getattr(a.ty, "shape", None) is not None else None for a in call.args]
    scalar = [i for i, a in enumerate(call.args) if isinstance(a, tvm.ir.GenericConst) and ranks[i] == 0]
    if len(scalar) != 1 or not ranks[1 - scalar[0]]:
        return None
    args = list(call.args)
    args[scalar[0]] = min_max.ranked_constant(args[scalar[0]], ranks[1 - scalar[0]])
    return relax.Call(call.op, args, call.attrs)


def _fast_math():
    """exp, sigmoid, tanh, erf and softmax as TOPI's polynomial forms, which vectorize: LLVM
    turns a vector `llvm.exp` into one libm call per lane, and an EfficientNet's SiLU epilogues
    then cost 3x its convolutions. TOPI's forms are within 4e-6 relative of exp and 4e-7 of
    tanh and erf in float32 (measured over their whole range)."""
    from tvm import topi

    def sigmoid(x):
        return topi.divide(1.0, topi.add(1.0, topi.fast_exp(topi.negative(x))))

    forms = {"relax.exp": topi.fast_exp, "relax.erf": topi.fast_erf, "relax.tanh": topi.fast_tanh,
             "relax.sigmoid": sigmoid}

    def rewrite(builder, call):
        name = getattr(call.op, "name", None)
        if str(getattr(call.ty, "dtype", "")) != "float32":
            return None  # TOPI's forms are float32 polynomials
        if name == "relax.nn.softmax":
            return builder.call_te(topi.nn.fast_softmax, call.args[0], int(call.attrs.axis))
        return builder.call_te(forms[name], call.args[0]) if name in forms else None

    return rewrite_calls("GraphoptFastMath", rewrite)


def _constant_layouts():
    """Transposes and reshapes of constants (the weights ConvertLayout turns to HWIO) folded in
    numpy: TVM's FoldConstant compiles a kernel for each (160 of them, 8 s, for a ResNet-50)."""
    from tvm import relax

    def rewrite(_builder, call):
        if getattr(call.op, "name", None) in ("relax.permute_dims", "relax.reshape") and _is_static_constant(call):
            return relax.const(_reshaped(call))
        return None

    return rewrite_calls("GraphoptConstantLayouts", rewrite)


def _is_static_constant(call) -> bool:
    """Whether the call's input is a constant and its result's shape is known."""
    import tvm

    shape = getattr(call.ty, "shape", None)
    return (isinstance(call.args[0], tvm.ir.GenericConst) and shape is not None
            and all(isinstance(d, tvm.tirx.IntImm) for d in shape.values))


def _reshaped(call) -> np.ndarray:
    """The value of permute_dims or reshape applied to a constant."""
    value = call.args[0].value.numpy()
    if call.op.name == "relax.permute_dims":
        axes = call.attrs.axes
        return np.ascontiguousarray(np.transpose(value, None if axes is None else [int(a) for a in axes]))
    return value.reshape([int(d) for d in call.ty.shape.values])


def _scale_and_shift(call) -> tuple[np.ndarray, np.ndarray] | None:
    """An inference batch_norm with constant statistics as y = x * scale + shift, computed in
    float64; None when it is in training mode or its statistics are not constants."""
    import tvm

    if call.attrs.training or not all(isinstance(a, tvm.ir.GenericConst) for a in call.args[1:5]):
        return None
    gamma, beta, mean, var = (a.value.numpy().astype(np.float64) for a in call.args[1:5])
    scale = 1.0 / np.sqrt(var + float(call.attrs.epsilon))
    if call.attrs.scale:
        scale = scale * gamma
    shift = (beta if call.attrs.center else 0.0) - mean * scale
    shape = [1] * len(call.args[0].ty.shape.values)
    shape[int(call.attrs.axis)] = -1
    dtype = str(call.args[0].ty.dtype)
    return scale.reshape(shape).astype(dtype), shift.reshape(shape).astype(dtype)
