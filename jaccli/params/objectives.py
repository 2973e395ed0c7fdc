"""What is differentiated: the model outputs, one output entry, or a per-sample loss."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..engine.objective_marks import mark
from ..errors import DataLoadError, ShapeMismatchError, UsageError

LOSSES = ("cross-entropy", "nll", "mse", "bce-logits")


def per_sample_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`loss(outputs (N, ...), targets (N, ...)) -> (N,)`: one value per sample.

    cross-entropy / nll: integer class targets `(N,)` in `[0, C)`; mse: targets shaped like
    the outputs, mean over each sample's entries; bce-logits: targets in [0, 1] shaped like
    the outputs, mean over each sample's entries. Check targets with `check_targets` first:
    these functions run inside torch.func transforms and cannot.
    """
    if name == "cross-entropy":
        return lambda out, t: F.cross_entropy(out, t.long(), reduction="none")
    if name == "nll":
        return lambda out, t: F.nll_loss(out, t.long(), reduction="none")
    if name == "mse":
        return lambda out, t: (out - t.reshape(out.shape).to(out.dtype)).square().reshape(
            out.shape[0], -1).mean(1)
    if name == "bce-logits":
        return lambda out, t: F.binary_cross_entropy_with_logits(
            out, t.reshape(out.shape).to(out.dtype), reduction="none").reshape(
            out.shape[0], -1).mean(1)
    raise UsageError(f"--loss must be one of {', '.join(LOSSES)}, not {name!r}")


def check_targets(name: str, targets, output_shape: tuple[int, ...]) -> None:
    """Refuse targets that `name` would silently truncate, broadcast or cast.

    targets: `(N, ...)` array or tensor; output_shape: the model's per-sample output shape.
    """
    t = np.asarray(targets.detach().cpu() if isinstance(targets, torch.Tensor) else targets)
    if np.iscomplexobj(t) or not np.issubdtype(t.dtype, np.number):
        raise DataLoadError(f"--loss {name} needs real-valued targets, not {t.dtype}")
    if not np.isfinite(t).all():
        raise DataLoadError("the targets contain NaN or Inf")
    if name in ("cross-entropy", "nll"):
        classes = output_shape[0] if output_shape else 1
        if t.ndim != 1:
            raise ShapeMismatchError(f"--loss {name} needs one class index per sample, shape "
                                     f"(N,), not {t.shape}")
        if not (t == np.round(t)).all():
            raise DataLoadError(f"--loss {name} needs whole-number class indices; the targets "
                                "have fractional values (use --loss mse or bce-logits for "
                                "real-valued targets)")
        bad = (t < 0) | (t >= classes)
        if bad.any():
            raise DataLoadError(f"class target {t[bad][0]:g} is out of range: the model has "
                                f"{classes} classes (0..{classes - 1})")
        return
    per_sample = int(np.prod(output_shape, dtype=np.int64))
    if int(np.prod(t.shape[1:], dtype=np.int64)) != per_sample:
        raise ShapeMismatchError(f"--loss {name} needs one target per output entry: outputs "
                                 f"{tuple(output_shape)} per sample, targets {t.shape[1:]}")
    if name == "bce-logits" and ((t < 0) | (t > 1)).any():
        raise DataLoadError("--loss bce-logits needs targets in [0, 1]")


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
        return mark(lambda out, targets: fn(out, targets), "rows")
    if output_index is not None:
        def select(out: torch.Tensor, targets) -> torch.Tensor:
            flat = out.reshape(out.shape[0], -1)
            if not 0 <= output_index < flat.shape[1]:
                raise UsageError(f"--output-index {output_index} is out of range: the model has "
                                 f"{flat.shape[1]} outputs per sample")
            return flat[:, output_index]
        return mark(select, "rows")
    return mark(lambda out, targets: out.reshape(out.shape[0], -1), "outputs")

