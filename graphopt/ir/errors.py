"""Exceptions a user can act on. Every message names the file, the node and what is wrong."""
from __future__ import annotations


class GraphoptError(Exception):
    """Base class: the CLI turns these into one line on stderr and a non-zero exit."""

    exit_code = 1


class ModelError(GraphoptError):
    """The model file is malformed, unsafe or unsupported."""

    exit_code = 2

    def __init__(self, path: object, what: str, node: str | None = None):
        where = f"{path}" + (f": node '{node}'" if node else "")
        super().__init__(f"{where}: {what}")
        self.path, self.node, self.what = path, node, what


class DataError(GraphoptError):
    """Input data (npz, .npy folder) does not fit the model."""

    exit_code = 2


class PipelineError(GraphoptError):
    """A pass spec, option or pipeline file is wrong."""

    exit_code = 2


class VerificationError(GraphoptError):
    """A pass broke an invariant or its declared numeric semantics."""


class CodegenError(GraphoptError):
    """A model, target or toolchain that TVM code generation cannot handle, or a library it cannot load."""
