"""The machine a run uses: device and dtype from the options, the memory budget, TF32."""

from __future__ import annotations

import os
import resource
from contextlib import contextmanager

import torch

from ..errors import JaccliError, OutOfMemoryError, UsageError
from ..units import available_ram, format_bytes

DTYPES = {"float32": torch.float32, "float64": torch.float64}
CPU_FRACTION = 0.25  # of available RAM, by default
CUDA_FRACTION = 0.5  # of free device memory, by default
# `inspect` traces one sample, holding the input and each layer's recorded input and output:
# a few times the input for the networks jaccli sees (measured: ~3.7x for a wide Tanh).
TRACE_COPIES = 4


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


def memory_budget(device: torch.device, max_memory: int | None) -> tuple[int, str]:
    """The bytes a run may hold at once on `device`, and where that number came from."""
    if max_memory is not None:
        return max_memory, "--max-memory"
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * CUDA_FRACTION), f"{CUDA_FRACTION:.0%} of free GPU memory"
    return int(available_ram() * CPU_FRACTION), f"{CPU_FRACTION:.0%} of available RAM"


def baseline_memory(device: torch.device) -> tuple[int, str]:
    """What the process holds before a run's batches, outside the budget: the resident set
    on CPU (torch, the model, its weights), the allocated device memory on CUDA."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device)), "allocated on the GPU when planned"
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE"), "resident when planned"
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak before planning"


@contextmanager
def tf32_mode(enabled: bool):
    """TF32 matmuls/convolutions on CUDA only when asked: they round to ~10 mantissa bits."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


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
