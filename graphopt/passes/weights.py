"""Which constant weights a lossy pass may rewrite: the rule pruning, factorization, quantization
and Winograd share."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir.errors import Refused
from graphopt.ir.graph import is_graph_output, np_dtype

FLOATS = (np.float16, np.float32, np.float64)


def check_weight(graph: gs.Graph, tensor: gs.Tensor, action: str) -> gs.Constant:
    """`tensor`, when `action` ("prune", "factorize", ...) may rewrite it; raises `Refused` if not.

    A weight shared with another node or that is a graph output is never changed silently.
    """
    if not isinstance(tensor, gs.Constant):
        raise Refused(f"'{tensor.name}' is not a constant")
    if len(tensor.outputs) > 1:
        raise Refused(f"weight '{tensor.name}' is shared with another node")
    if is_graph_output(graph, tensor):
        raise Refused(f"weight '{tensor.name}' is a graph output")
    dtype = np_dtype(tensor.dtype)
    if dtype not in FLOATS:
        raise Refused(f"weight '{tensor.name}' is {dtype.name}, not floating point: {action} before quantizing")
    return tensor
