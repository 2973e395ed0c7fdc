"""`jaccli merge`: join the shard files of one run into one results file (torch-free)."""

from __future__ import annotations

from pathlib import Path

from ..io.results.merge import merge_results


def run_merge(shards: list[Path], output: Path, *, copy: bool, command: str) -> dict:
    """Check that `shards` tile one sample range of one run and write `output`: virtual
    datasets over the shards, or (`copy`) a self-contained file. Returns a summary dict."""
    return merge_results(shards, output, copy=copy, command=command)
