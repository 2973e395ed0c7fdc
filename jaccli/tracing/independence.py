"""Check that a model is deterministic and treats the samples of a batch independently, at the
batch size a run uses, on distinct rows."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import ModelRunError
from .recorder import first_tensor

# Relative tolerance for "a sample's output does not depend on the rest of the batch".
_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}
_PERTURBATION = 1e-3  # relative size of the nudge that makes repeated rows distinct


def distinct_rows(rows: np.ndarray, seed: int = 0) -> np.ndarray:
    """`rows (B, ...)` with every repeated row nudged (by 1e-3 of the data's spread), so that
    a layer mixing rows (`h - h.mean(0)`) cannot hide behind identical samples."""
    flat = rows.reshape(len(rows), -1).astype(np.float64)
    _, first = np.unique(flat, axis=0, return_index=True)
    repeated = np.setdiff1d(np.arange(len(rows)), first)
    if repeated.size == 0:
        return rows
    scale = float(flat.std()) or 1.0
    noise = np.random.default_rng(seed).standard_normal((repeated.size, flat.shape[1]))
    out = flat.copy()
    out[repeated] += _PERTURBATION * scale * noise
    return out.reshape(rows.shape).astype(rows.dtype)


def check_sample_independence(model: nn.Module, x: torch.Tensor) -> None:
    """Raise ModelRunError when the model is not deterministic, or when a sample's output
    depends on the other samples of its batch.

    Per-sample Jacobians assume rows are independent; BatchNorm without running statistics,
    or any layer that mixes batch rows (perhaps only for larger batches), breaks that.
    x: `(B, *in_shape)` with distinct rows, B the batch size the run uses (B >= 2 is
    needed to see mixing; B = 1 checks determinism only).
    """
    with torch.no_grad():
        together = _run(model, x)
        again = _run(model, x)
        if not _close(together, again, x.dtype):
            raise ModelRunError(
                "the model is not deterministic: two runs on the same batch differ by "
                f"{_gap(together, again):.3g} (random operations in forward, or dropout in "
                "training mode?); Jacobians of a random function are not defined")
        if x.shape[0] < 2:
            return
        half = x.shape[0] // 2
        try:
            alone = _run(model, x[:1])
            parts = torch.cat([_run(model, x[:half]), _run(model, x[half:])])
            reordered = _run(model, x.flip(0)).flip(0)
        except (RuntimeError, ValueError) as exc:
            raise ModelRunError(
                "the model fails on a batch of one sample (or a smaller batch), so it computes "
                f"across the batch ({str(exc).strip().splitlines()[0]}); per-sample Jacobians "
                "need independent samples (BatchNorm in training mode or without running "
                "statistics?)") from exc
    for other, what in ((parts, "split in two"), (alone[:1], "alone"),
                        (reordered, "in reverse order")):
        reference = together[:other.shape[0]]
        if not _close(reference, other, x.dtype):
            raise ModelRunError(
                f"the model's output for a sample changes with the other samples in its batch "
                f"(max difference {_gap(reference, other):.3g} when the batch of "
                f"{x.shape[0]} is run {what}); per-sample Jacobians need independent samples "
                "— a BatchNorm without running statistics, or a layer mixing batch rows, "
                "causes this")


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = first_tensor(model(x))
    if out is None:
        raise ModelRunError("the model's output is not a tensor (nor a tuple holding one)")
    return out


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    if a.shape != b.shape:
        return False
    scale = float(a.abs().max()) + 1e-30 if a.numel() else 1.0
    same_nan = torch.isnan(a) == torch.isnan(b)
    return bool(same_nan.all()) and _gap(torch.nan_to_num(a), torch.nan_to_num(b)) <= \
        _RTOL.get(dtype, 1e-2) * scale
