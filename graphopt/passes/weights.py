"""Which constant weights a lossy pass may rewrite: the rule pruning and factorization share."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir.graph import is_graph_output, np_dtype

FLOATS = (np.float16, np.float32, np.float64)


def weight_refusal(graph: gs.Graph, tensor: gs.Tensor, action: str) -> str | None:
    """Why `tensor` may not be rewritten by `action` ("prune", "factorize"), or None.

    A weight shared with another node or that is a graph output is never changed silently.
    """
    if not isinstance(tensor, gs.Constant):
        return f"'{tensor.name}' is not a constant"
    if len(tensor.outputs) > 1:
        return f"weight '{tensor.name}' is shared with another node"
    if is_graph_output(graph, tensor):
        return f"weight '{tensor.name}' is a graph output"
    dtype = np_dtype(tensor.dtype)
    if dtype not in FLOATS:
        return f"weight '{tensor.name}' is {dtype.name}, not floating point: {action} before quantizing"
    return None
