"""`jaccli merge`: one results file from the shard files of a run (`--shard i/n`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .errors import guarded
from .options import JsonOpt, QuietOpt, command_line


def merge(
    shards: Annotated[list[Path], typer.Argument(
        help="Shard files of one run (written with --shard), in any order.")],
    output: Annotated[Path, typer.Option(
        "-o", "--output", help="The merged results file.")],
    copy: Annotated[bool, typer.Option(
        "--copy", help="Copy the data into one self-contained file instead of virtual "
                       "datasets that point to the shard files.")] = False,
    json_output: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Join shard files into one results file; refuse gaps, overlaps and shards of
    different runs. Without --copy the file maps the shards (relative paths: keep them in
    the same places relative to it)."""

    def run() -> None:
        from ..pipelines.merge import run_merge
        from .render import emit_json, stdout_console

        summary = run_merge(shards, output, copy=copy, command=command_line())
        if json_output:
            emit_json(summary, quiet)
        elif not quiet:
            stdout_console(quiet).print(
                f"{summary['output']}: samples {summary['first_sample']}.."
                f"{summary['first_sample'] + summary['samples'] - 1} from {summary['shards']} "
                f"shard file(s), {summary['mode']} datasets")

    guarded(run)
