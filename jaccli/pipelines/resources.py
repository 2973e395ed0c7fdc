"""The machine a run uses: device and dtype from the options, the memory budget, TF32."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..errors import JaccliError, UsageError

DTYPES = {"float32": torch.float32, "float64": torch.float64}
CPU_FRACTION = 0.25  # of available RAM, by default
CUDA_FRACTION = 0.5  # of free device memory, by default


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


def available_ram() -> int:
    """Bytes of RAM available to new allocations (MemAvailable), or 4 GiB if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 1024**3


def memory_budget(device: torch.device, max_memory: int | None) -> tuple[int, str]:
    """The bytes a run may hold at once on `device`, and where that number came from."""
    if max_memory is not None:
        return max_memory, "--max-memory"
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * CUDA_FRACTION), f"{CUDA_FRACTION:.0%} of free GPU memory"
    return int(available_ram() * CPU_FRACTION), f"{CPU_FRACTION:.0%} of available RAM"


@contextmanager
def tf32_mode(enabled: bool):
    """TF32 matmuls/convolutions on CUDA only when asked: they round to ~10 mantissa bits."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
