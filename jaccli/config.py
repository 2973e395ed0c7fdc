"""The settings of one `jaccli compute` run, as the CLI (or a Python caller) gives them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class ComputeConfig:
    """Options of `jaccli compute`; see `jaccli compute --help` for each one's meaning."""

    model: Path
    data: Path | None
    output: Path | None = None
    arch: str | None = None
    arch_path: Path | None = None
    trust_pickle: bool = False
    key: str | None = None
    offset: int = 0
    limit: int | None = None
    granularity: str = "module"
    layers: list[str] | None = None
    include_layers: bool = True
    end_to_end: bool = True
    batch_size: int | None = None
    max_memory: int | None = None
    device: str = "auto"
    dtype: str = "float32"
    mode: str = "auto"
    store: str = "compact"
    wrt: tuple[str, ...] = ("inputs",)
    params: list[str] | None = None
    output_index: int | None = None
    targets: Path | None = None
    targets_key: str | None = None
    loss: str | None = None
    flatten: bool = False
    strict_rules: bool = False
    tf32: bool = False
    compression: str = "none"
    compression_level: int | None = None
    command_line: str = ""
