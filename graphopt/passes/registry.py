"""The built-in passes, listed explicitly: importing a module never registers anything."""
from __future__ import annotations

import difflib

from graphopt.ir.errors import PipelineError
from graphopt.passes.base import Pass
from graphopt.passes.cleanup.canonicalize import Canonicalize
from graphopt.passes.cleanup.eliminate_dead import EliminateDead
from graphopt.passes.cleanup.eliminate_noops import EliminateNoops
from graphopt.passes.cleanup.fold_batchnorm import FoldBatchNorm
from graphopt.passes.cleanup.fold_constants import FoldConstants
from graphopt.passes.cleanup.fuse_matmul_add import FuseMatMulAdd
from graphopt.passes.conv.winograd import Winograd
from graphopt.passes.factorize.svd import FactorizeSVD
from graphopt.passes.factorize.tucker import FactorizeTucker
from graphopt.passes.prune.channels import PruneChannels
from graphopt.passes.prune.magnitude import PruneMagnitude
from graphopt.passes.prune.n_m import PruneNM
from graphopt.passes.quant.fold_qdq import FoldQDQ
from graphopt.passes.quant.binarize import Binarize
from graphopt.passes.quant.cluster_weights import ClusterWeights
from graphopt.passes.quant.insert_qdq import Quantize
from graphopt.passes.quant.ternarize import Ternarize
from graphopt.passes.quant.lower_int8 import LowerInt8

BUILTIN: tuple[type[Pass], ...] = (
    Canonicalize, FoldConstants, FoldBatchNorm, EliminateNoops, FuseMatMulAdd, EliminateDead,
    PruneMagnitude, PruneNM, PruneChannels,
    FactorizeSVD, FactorizeTucker,
    Quantize,
    ClusterWeights, Ternarize, Binarize,
    FoldQDQ,
    LowerInt8,
    Winograd,
)
ALIASES = {"fold-bn": "fold-batchnorm", "dce": "eliminate-dead"}


def lookup(name: str) -> type[Pass]:
    name = ALIASES.get(name, name)
    for cls in BUILTIN:
        if cls.name == name:
            return cls
    names = [c.name for c in BUILTIN] + list(ALIASES)
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; passes: {', '.join(c.name for c in BUILTIN)}"
    raise PipelineError(f"unknown pass '{name}'{hint}")


def create(name: str, options: dict) -> Pass:
    return lookup(name)(**options)
