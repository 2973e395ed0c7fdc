"""Run the jaccli command line in this test process, answering like `subprocess.run`.

A real process costs a Python start and an `import torch` (~2 s of CPU) per command; the
pipeline tests run dozens of commands, so they run in-process and keep real processes for what
only a real process shows (stray output from C code and warnings, terminal detection, exit
through the interpreter: `tests/test_cli.py`, `test_pipelines.py`)."""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

from typer.testing import CliRunner

from jaccli.cli import app


@contextmanager
def _working_directory(path: Path | None):
    if path is None:
        yield
        return
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def run_in_process(*args, cwd=None, stdin: bytes | None = None,
                   env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`jaccli ARGS...` with stdout and stderr as bytes and the exit status as `returncode`.
    An exception that escapes the command (it would be a traceback in a real process) is
    raised here, so a test never mistakes an internal error for an expected exit code."""
    argv = [str(a) for a in args]
    with _working_directory(cwd):
        result = CliRunner().invoke(app, argv, input=stdin, env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(["jaccli", *argv], result.exit_code,
                                       result.stdout_bytes, result.stderr_bytes)
