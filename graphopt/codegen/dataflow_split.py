"""Dataflow blocks split where a `match_cast` defines a dimension the run computes.

A model with shapes only the run knows (NonZero, a Range as long as an input's value, the
shapes `dynamic_shapes` reads back) binds each such dimension to a symbolic variable with a
`match_cast` inside the importer's one dataflow block. TVM 0.27's FuseOps orders fused groups by
the variables they read, not by the symbolic variables their shapes use: a group that fuses an
op before the `match_cast` with one whose shape uses the variable it defines is emitted where the
first one was, before the variable has a value, and the VM build fails ("PrimExpr ... has not
been computed"). `separate` moves every such `match_cast` out of the dataflow blocks, between
two blocks, so that no fused group spans it; TVM's CanonicalizeBindings then makes the variables
that stay within a block dataflow variables again. A function without such a `match_cast` (every
static model) is left as it is. Verified by tests/codegen/test_dynamic_shapes.py, whose models
fuse across these points.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tvm


def separate(mod: tvm.IRModule) -> tvm.IRModule:
    """`mod` with each Relax function's run-time dimension definitions between dataflow blocks."""
    from tvm import relax

    split = {gvar: _split(mod, gvar) for gvar, func in mod.functions.items()
             if isinstance(func, relax.Function) and _defines_dims(func)}
    if not split:
        return mod
    for gvar, func in split.items():
        mod[gvar] = func
    return relax.transform.CanonicalizeBindings()(mod)


def _defines_dims(func) -> bool:
    """Whether a binding of `func` is a `match_cast` that defines a symbolic variable."""
    return any(_new_vars(b, set()) for b in _bindings(func))


def _split(mod, gvar):
    """The function `gvar` with its bindings in dataflow blocks cut at each defining match_cast."""
    from tvm import relax

    plain = relax.transform.ToNonDataflow()(mod)[gvar]
    known = {v for p in plain.params for v in relax.analysis.tir_vars_in_type(p.ty)}
    blocks, run = [], []
    for binding in _bindings(plain):
        new = _new_vars(binding, known)
        if new:
            if run:
                blocks.append(relax.DataflowBlock(run))
            blocks.append(relax.BindingBlock([binding]))
            run = []
            known |= new
        else:
            run.append(binding)
    if run:
        blocks.append(relax.DataflowBlock(run))
    body = relax.SeqExpr(blocks, plain.body.body)
    return relax.Function(plain.params, body, plain.ret_ty, plain.is_pure, plain.attrs)


def _bindings(func) -> list:
    return [b for block in func.body.blocks for b in block.bindings]


def _new_vars(binding, known: set) -> set:
    from tvm import relax

    if not isinstance(binding, relax.MatchCast):
        return set()
    return set(relax.analysis.tir_vars_in_type(binding.ty)) - known

