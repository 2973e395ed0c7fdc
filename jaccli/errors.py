"""Exceptions a user can cause, each mapped to one exit code by the CLI.

Every message is one line that says what was wrong and how to fix it.
"""

from __future__ import annotations

import signal


class JaccliError(Exception):
    """Base class: a problem with the user's input or environment (exit code 1)."""

    exit_code = 1


class UsageError(JaccliError):
    """Options that contradict each other or cannot be parsed (exit code 2)."""

    exit_code = 2


class ModelLoadError(JaccliError):
    """The model file is missing, corrupt, of an unknown format or does not match its spec."""


class UntrustedPickleError(ModelLoadError):
    """The model file needs code execution to load and `--trust-pickle` was not given."""


class DataLoadError(JaccliError):
    """The data file is missing, corrupt, ambiguous or contains non-finite values."""


class ShapeMismatchError(JaccliError):
    """The data's per-sample shape does not match the model's input shape."""


class ModelRunError(JaccliError):
    """The model failed on the data, or couples the samples of a batch."""


class UnsupportedModuleError(JaccliError):
    """A layer cannot be differentiated (non-float input, no tensor output, ...)."""


class OutOfMemoryError(JaccliError):
    """A Jacobian does not fit in the memory budget, even for one sample."""


class OutputError(JaccliError):
    """The output file cannot be written (folder, permissions, space) or would replace an
    input."""


class ResultsFormatError(JaccliError):
    """A results file is not a jaccli file, is incomplete, or has an unknown major version."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocator failure (CUDA or CPU), without importing torch."""
    cls = type(exc)
    if cls.__name__ == "OutOfMemoryError" and cls.__module__.split(".")[0] == "torch":
        return True
    return isinstance(exc, RuntimeError) and ("out of memory" in str(exc)
                                              or "can't allocate memory" in str(exc))


class Terminated(BaseException):
    """The process was asked to stop (SIGTERM or SIGHUP); exit status 128 + signum.

    A BaseException, like KeyboardInterrupt, so that `except Exception` does not swallow it.
    """

    def __init__(self, signum: int):
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(f"terminated by {self.name}")
