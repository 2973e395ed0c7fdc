"""Check that a model treats the samples of a batch independently."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelRunError
from .recorder import first_tensor

# Relative tolerance for "a sample's output does not depend on the rest of the batch".
_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def check_sample_independence(model: nn.Module, x: torch.Tensor) -> None:
    """Raise ModelRunError when a sample's output depends on the other samples of its batch.

    Per-sample Jacobians assume rows are independent; BatchNorm without running statistics,
    or any layer that mixes batch rows, breaks that assumption.
    x: `(B, *in_shape)` with B >= 2 (smaller batches are not checked).
    """
    if x.shape[0] < 2:
        return
    with torch.no_grad():
        together = first_tensor(model(x))
        try:
            alone = torch.cat([first_tensor(model(x[i:i + 1])) for i in range(x.shape[0])])
        except (RuntimeError, ValueError) as exc:
            raise ModelRunError(
                "the model fails on a batch of one sample, so it computes across the batch "
                f"({str(exc).strip().splitlines()[0]}); per-sample Jacobians need independent "
                "samples (BatchNorm in training mode or without running statistics?)") from exc
    scale = together.abs().max().item() + 1e-30
    diff = (together - alone).abs().max().item()
    if diff > _RTOL.get(x.dtype, 1e-2) * scale:
        raise ModelRunError(
            f"the model's output for a sample changes with the other samples in its batch "
            f"(max difference {diff:.3g}); per-sample Jacobians need independent samples — a "
            "BatchNorm without running statistics, or a layer mixing batch rows, causes this")
