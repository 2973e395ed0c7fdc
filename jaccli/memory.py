"""Memory budgets and sizes: how much memory a run may use, and human-readable byte counts."""

from __future__ import annotations

import re

from .errors import OutOfMemoryError, UsageError

_UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1000, "KIB": 1024, "M": 1024**2, "MB": 1000**2,
          "MIB": 1024**2, "G": 1024**3, "GB": 1000**3, "GIB": 1024**3, "T": 1024**4,
          "TB": 1000**4, "TIB": 1024**4}
CPU_FRACTION = 0.25  # of available RAM, by default
CUDA_FRACTION = 0.5  # of free device memory, by default
# `inspect` traces one sample, holding the input and each layer's recorded input and output:
# a few times the input for the networks jaccli sees (measured: ~3.7x for a wide Tanh).
TRACE_COPIES = 4


def parse_size(text: str) -> int:
    """'512MB', '2GiB', '1.5G', '1000000' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise UsageError(f"cannot parse memory size {text!r}; use e.g. 512MB, 2GiB or 8G")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def format_bytes(n: float) -> str:
    """Bytes as a short string with binary units: 1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


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


def memory_budget(device, max_memory: int | None) -> tuple[int, str]:
    """The bytes a run may hold at once on `device` (a torch.device), and where that number
    came from."""
    import torch

    if max_memory is not None:
        return max_memory, "--max-memory"
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * CUDA_FRACTION), f"{CUDA_FRACTION:.0%} of free GPU memory"
    return int(available_ram() * CPU_FRACTION), f"{CPU_FRACTION:.0%} of available RAM"


def check_trace_fits(input_shape: tuple[int, ...], itemsize: int, budget: int,
                     source: str) -> None:
    """Refuse an input shape whose one-sample trace (`TRACE_COPIES` times the sample) would
    not fit `budget` bytes (`source`: where the budget came from)."""
    sample = itemsize
    for d in input_shape:
        sample *= d
    if TRACE_COPIES * sample > budget:
        raise OutOfMemoryError(
            f"one sample of shape {input_shape} is {format_bytes(sample)}; tracing the model "
            f"on it needs about {format_bytes(TRACE_COPIES * sample)}, over the memory budget "
            f"of {format_bytes(budget)} ({source}); pass a smaller --input-shape or raise "
            "--max-memory")
