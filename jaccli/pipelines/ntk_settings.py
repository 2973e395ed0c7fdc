"""The settings of `jaccli ntk` (no torch): the option groups of `jaccli.settings` and the
kernel's own options, checked against each other before anything is loaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError
from ..settings import DataSelection, ModelSource, OutputOptions, RunOptions, _Composed


@dataclass
class NtkSettings(_Composed):
    """`jaccli ntk`: the empirical NTK Θ(X, X), or the cross kernel Θ(X, X2) with `data2`.

    Kernel shape (N samples of X, M of X2, C outputs): `(N, M, C, C)`, with `trace`
    `(N, M)`, with `diagonal` `(N, C, C)`; `spectrum`: eigenvalues of the (N·C)² kernel.
    model_output: for a model returning several outputs, the one whose C entries the kernel
    is of (a name or an index, as `compute --model-output`; None: all of them, flattened and
    concatenated in order)."""

    model: ModelSource
    data: DataSelection
    data2: Path | None = None
    model_output: str | None = None
    trace: bool = False
    diagonal: bool = False
    per_layer: bool = False
    spectrum: bool = False
    top_k: int = 10
    run: RunOptions = field(default_factory=RunOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    command_line: str = ""

    def __post_init__(self):
        self.data2 = None if self.data2 is None else Path(self.data2)
        if self.trace and self.diagonal:
            raise UsageError("--trace and --diagonal exclude each other")
        if self.diagonal and self.data2 is not None:
            raise UsageError("--diagonal gives the blocks Θ(xᵢ, xᵢ) of DATA alone; drop DATA2")
        if self.spectrum and self.data2 is not None:
            raise UsageError("--spectrum needs the square kernel Θ(X, X), not a cross kernel; "
                             "drop DATA2")
        if self.spectrum and (self.trace or self.diagonal):
            raise UsageError("--spectrum is of the full (N·C)×(N·C) kernel; drop --trace or "
                             "--diagonal")
        if self.top_k < 1:
            raise UsageError("--top-k must be at least 1")

    @property
    def mode(self) -> str:
        """`full`, `trace` or `diagonal` (`jaccli.params.ntk.MODES`)."""
        return "diagonal" if self.diagonal else "trace" if self.trace else "full"
