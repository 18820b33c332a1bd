"""graphopt: compiler-style compression of ONNX models, compiled with Apache TVM.

    import graphopt
    graph = graphopt.load("model.onnx")
    result = graphopt.optimize(graph, "canonicalize,fold-batchnorm")
    graphopt.save(result.graph, "model.opt.onnx")
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# The public names and the modules that define them. They load on first use: importing onnx,
# onnxruntime and numba takes seconds, and `graphopt --help` or `import graphopt.cli` need none of it.
_EXPORTS = {
    "GraphoptError": "graphopt.ir.errors", "ModelError": "graphopt.ir.errors",
    "PipelineError": "graphopt.ir.errors", "VerificationError": "graphopt.ir.errors",
    "load": "graphopt.ir.io", "save": "graphopt.ir.io",
    "Optimized": "graphopt.optimize", "optimize": "graphopt.optimize",
    "PassManager": "graphopt.passes.manager", "Pipeline": "graphopt.passes.pipeline",
}
__all__ = ["GraphoptError", "ModelError", "Optimized", "PassManager", "Pipeline", "PipelineError",
           "VerificationError", "load", "optimize", "save"]

if TYPE_CHECKING:
    from graphopt.ir.errors import GraphoptError, ModelError, PipelineError, VerificationError
    from graphopt.ir.io import load, save
    from graphopt.optimize import Optimized, optimize
    from graphopt.passes.manager import PassManager
    from graphopt.passes.pipeline import Pipeline


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'graphopt' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """`graphopt.optimize` is the function, as it was when this module imported it eagerly.
    Importing the submodule graphopt.optimize makes the import system set the package's
    attribute to the module; this keeps the function (the module stays in sys.modules)."""

    def __setattr__(self, name: str, value) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
