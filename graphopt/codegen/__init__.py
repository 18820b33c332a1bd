"""TVM code generation: compile an ONNX model into a shared library for a target, and run it.

    from graphopt import codegen
    result = codegen.compile("model.onnx", "x86", "out")
    lib = codegen.load(result.library)
    y = lib(x)

Imports nothing from `graphopt.passes`: it consumes the ONNX the passes produce.
"""
from graphopt.codegen.build import BuildResult, compile
from graphopt.codegen.runtime import CompiledModel, load
from graphopt.codegen.targets import NAMES, Target, resolve

__all__ = ["NAMES", "BuildResult", "CompiledModel", "Target", "compile", "load", "resolve"]
