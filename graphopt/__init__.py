"""graphopt: compiler-style compression of ONNX models, compiled with Apache TVM.

    import graphopt
    graph = graphopt.load("model.onnx")
    result = graphopt.optimize(graph, "canonicalize,fold-batchnorm")
    graphopt.save(result.graph, "model.opt.onnx")
"""
from graphopt.ir.errors import GraphoptError, ModelError, PipelineError, VerificationError
from graphopt.ir.io import load, save
from graphopt.optimize import Optimized, optimize
from graphopt.passes.manager import PassManager
from graphopt.passes.pipeline import Pipeline

__version__ = "0.1.0"
__all__ = ["GraphoptError", "ModelError", "Optimized", "PassManager", "Pipeline", "PipelineError",
           "VerificationError", "load", "optimize", "save"]
