"""Exceptions a user can act on. Every message names the file, the node and what is wrong."""
from __future__ import annotations

# Messages quote user content (names, option values, runtime text): one line, at most this long.
MAX_MESSAGE = 600


def bounded(text: object, limit: int = MAX_MESSAGE) -> str:
    """`text` on one line, cut to `limit` characters with the cut said."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 25] + f" ... ({len(line) - limit + 25} more chars)"


class GraphoptError(Exception):
    """Base class: the CLI turns these into one line on stderr and a non-zero exit."""

    exit_code = 1

    def __str__(self) -> str:
        return bounded(super().__str__())


class ModelError(GraphoptError):
    """The model file is malformed, unsafe or unsupported."""

    exit_code = 2

    def __init__(self, path: object, what: str, node: str | None = None, op: str | None = None):
        where = f"{path}" + (f": node '{bounded(node, 120)}'" if node else "") + (f" ({op})" if node and op else "")
        super().__init__(f"{where}: {what}")
        self.path, self.node, self.what, self.op = path, node, what, op


class RuntimeRejected(GraphoptError):
    """onnxruntime refused to load or run a model; `node` is the node its message names, if any.
    Whoever knows whether the model is the user's (exit 2) or a pass's output (exit 1) decides."""

    def __init__(self, what: str, node: str | None = None, loading: bool = True):
        verb = "cannot load" if loading else "failed to run"
        super().__init__(f"onnxruntime {verb} the model" + (f": node '{node}'" if node else "") + f": {what}")
        self.what, self.node, self.loading = what, node, loading


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
