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


class GateError(GraphoptError):
    """A pass crossed the quality gate (--max-drop, --min-cosine, or its own LOSSY bound): the
    pipeline stops and nothing is written."""

    exit_code = 4


class CodegenError(GraphoptError):
    """A model, target or toolchain that TVM code generation cannot handle, or a library it cannot load."""


class PassError(GraphoptError):
    """A pass raised where it should not have: a bug, named with the pass and the passes before it."""

    exit_code = 3

    def __init__(self, name: str, before: list[str], error: BaseException):
        after = f" (after {', '.join(before)})" if before else ""
        super().__init__(f"pass '{name}' failed{after}: {type(error).__name__}: {error}")
        self.pass_name, self.error = name, error


class Refused(Exception):
    """Raised by any matching or planning helper: this rewrite is unsafe or useless here.

    Not an error: the driver (a rule walk or `LayerPass`) records the reason against the node and
    goes on, and `--explain` prints it.
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
