"""Compute the planned Jacobians for one batch, from one recorded forward pass."""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import ModelRunError
from ..layers import CallRecord, batched_extras, first_tensor
from ..planner import PlanEntry
from .generic import per_sample_jacobian

# Relative tolerance for "a sample's output does not depend on the rest of the batch".
_INDEPENDENCE_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def entry_jacobian(entry: PlanEntry, model: nn.Module, records: dict[str, CallRecord],
                   x: torch.Tensor) -> torch.Tensor:
    """The Jacobians of one plan entry for the batch `x`: `(B, D_out, D_in)`.

    records: this batch's call records by site (from `ForwardRecorder.run(x)`).
    """
    if entry.layer is None:
        return per_sample_jacobian(lambda xb: first_tensor(model(xb)), x, mode=entry.mode)
    record = records.get(entry.layer.sites[0])
    if record is None or record.input is None:
        raise ModelRunError(f"layer {entry.name} was not called in this batch's forward pass; "
                            "the model's control flow depends on its input, so its layers "
                            "differ between batches")
    return per_sample_jacobian(entry.layer.function(record), record.input,
                               batched_extras(record), mode=entry.mode)


def timed_jacobians(entries: list[PlanEntry], model: nn.Module,
                    records: dict[str, CallRecord], x: torch.Tensor
                    ) -> Iterator[tuple[PlanEntry, torch.Tensor, float]]:
    """Yield `(entry, jacobian (B, D_out, D_in), seconds)` for each entry in order."""
    for entry in entries:
        start = time.perf_counter()
        jac = entry_jacobian(entry, model, records, x)
        if jac.is_cuda:
            torch.cuda.synchronize(jac.device)
        yield entry, jac, time.perf_counter() - start


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
    rtol = _INDEPENDENCE_RTOL.get(x.dtype, 1e-2)
    scale = together.abs().max().item() + 1e-30
    diff = (together - alone).abs().max().item()
    if diff > rtol * scale:
        raise ModelRunError(
            f"the model's output for a sample changes with the other samples in its batch "
            f"(max difference {diff:.3g}); per-sample Jacobians need independent samples — a "
            "BatchNorm without running statistics, or a layer mixing batch rows, causes this")
