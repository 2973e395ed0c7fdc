"""What is differentiated: the model outputs, one output entry, or a per-sample loss."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import UsageError

LOSSES = ("cross-entropy", "nll", "mse", "bce-logits")


def per_sample_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`loss(outputs (N, ...), targets (N, ...)) -> (N,)`: one value per sample.

    cross-entropy / nll: integer class targets `(N,)`; mse: targets shaped like the outputs,
    mean over each sample's entries; bce-logits: float targets shaped like the outputs, mean
    over each sample's entries.
    """
    if name == "cross-entropy":
        return lambda out, t: F.cross_entropy(out, t.long(), reduction="none")
    if name == "nll":
        return lambda out, t: F.nll_loss(out, t.long(), reduction="none")
    if name == "mse":
        return lambda out, t: (out - t.to(out.dtype)).square().reshape(out.shape[0], -1).mean(1)
    if name == "bce-logits":
        return lambda out, t: F.binary_cross_entropy_with_logits(
            out, t.to(out.dtype), reduction="none").reshape(out.shape[0], -1).mean(1)
    raise UsageError(f"--loss must be one of {', '.join(LOSSES)}, not {name!r}")


def objective(*, output_index: int | None = None, loss: str | None = None
              ) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """`f(outputs (N, ...), targets) -> (N, C)` or `(N,)`: the quantity to differentiate.

    Default: all outputs, flattened to `(N, C)`. `output_index`: that flattened output entry,
    `(N,)`. `loss`: the per-sample loss against targets, `(N,)`.
    """
    if output_index is not None and loss is not None:
        raise UsageError("--output-index and --loss exclude each other")
    if loss is not None:
        fn = per_sample_loss(loss)
        return lambda out, targets: fn(out, targets)
    if output_index is not None:
        def select(out: torch.Tensor, targets) -> torch.Tensor:
            flat = out.reshape(out.shape[0], -1)
            if not 0 <= output_index < flat.shape[1]:
                raise UsageError(f"--output-index {output_index} is out of range: the model has "
                                 f"{flat.shape[1]} outputs per sample")
            return flat[:, output_index]
        return select
    return lambda out, targets: out.reshape(out.shape[0], -1)
