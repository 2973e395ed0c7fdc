"""Resolve `--device` and `--dtype` options."""

from __future__ import annotations

import torch

from .errors import JaccliError, UsageError

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(name: str) -> torch.device:
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:i'."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--device {name!r} is not a device; use auto, cpu, cuda or "
                         "cuda:INDEX") from exc
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r}: jaccli runs on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise JaccliError(f"--device {name}: CUDA is not available on this machine "
                              "(use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise JaccliError(f"--device {name}: only {torch.cuda.device_count()} CUDA "
                              "device(s) present")
    return device


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, not {name!r}")
    return DTYPES[name]
