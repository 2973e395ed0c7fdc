"""The command line: commands parse options into settings, call a pipeline, render the result."""

from .app import app, main

__all__ = ["app", "main"]
