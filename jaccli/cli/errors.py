"""Exit codes, and the one place where exceptions become one stderr line and an exit code.

Exit codes: 0 success, 1 a problem with the input or the run (one line on stderr),
2 a usage error, 3 an internal error (a bug: please report it), 130 interrupted (SIGINT),
143 and 129 terminated by SIGTERM and SIGHUP (a partial output file is removed first).
`check` and `diff` use 1 for "a bound is violated" / "the runs differ", so their input and
run errors exit with 4 instead; `check` exits 5 when a value it would judge could not be
verified (an iterative method missed its residual tolerance).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import typer
from typer.exceptions import TyperException

EXIT_INTERNAL = 3
EXIT_GATE_ERROR = 4  # check/diff: an error, as opposed to a violation (1)
EXIT_INTERRUPTED = 130
T = TypeVar("T")


def fail(message: str, code: int) -> typer.Exit:
    """Print `jaccli: error: message` on stderr (under torchrun `jaccli: error: rank R:
    message`); the caller raises the returned Exit."""
    from ..pipelines.distributed import torchrun_rank

    rank = torchrun_rank()
    typer.echo(f"jaccli: error: {'' if rank is None else f'rank {rank}: '}{message}", err=True)
    return typer.Exit(code)


OOM_HINT = "lower --batch-size or --max-memory, or select fewer layers with --layers"


def guarded(action: Callable[[], T], *, input_error_code: int = 1,
            oom_hint: str = OOM_HINT) -> T:
    """Run `action`, mapping exceptions to one stderr line and an exit code.

    input_error_code: the code for input/run errors (1, or 4 for the gate commands).
    oom_hint: what to change when memory runs out, in the options of this command.
    JACCLI_DEBUG=1 lets every exception through with its traceback.
    """
    from ..errors import JaccliError, Terminated, is_out_of_memory

    if os.environ.get("JACCLI_DEBUG") == "1":
        return action()
    try:
        return action()
    except (typer.Exit, typer.Abort, TyperException, BrokenPipeError):
        raise  # deliberate exits, usage errors, a closed stdout: the app handles them
    except JaccliError as exc:
        code = exc.exit_code if exc.exit_code != 1 else input_error_code
        raise fail(str(exc), code) from None
    except KeyboardInterrupt:
        raise fail("interrupted", EXIT_INTERRUPTED) from None
    except Terminated as exc:  # SIGTERM/SIGHUP: any partial output file is already gone
        raise fail(str(exc), 128 + exc.signum) from None
    except RuntimeError as exc:
        if is_out_of_memory(exc):
            raise fail(f"out of memory; {oom_hint}", input_error_code) from None
        raise _internal(exc) from None
    except Exception as exc:  # anything else is a bug in jaccli
        raise _internal(exc) from None


def _internal(exc: BaseException) -> typer.Exit:
    return fail(f"internal error: {type(exc).__name__}: {first_line(exc)} (rerun with "
                "JACCLI_DEBUG=1 for the traceback, and please report it)", EXIT_INTERNAL)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
