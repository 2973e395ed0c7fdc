"""Timing, memory and reporting helpers shared by the benchmarks."""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

JACOBIAN_CASES = ("mlp-layers", "mlp-e2e", "cnn", "samples", "pipeline")
SPECTRA_CASES = ("spectra-all", "spectra-topk")
PARAMS_CASES = ("params-mlp", "params-cnn", "products")
FORMAT_CASES = ("parity", "parity-in-process", "mlp-script", "mlp-in-process", "startup",
                "mtcnn", "resnet", "resnet32")
NTK_CASES = ("ntk-cnn", "ntk-mlp", "ntk-resnet")
SCALING_CASES = ("scaling",)


def selected_cases(requested: list[str] | None, known: tuple[str, ...]) -> list[str]:
    """The requested cases this script runs (all of them by default); unknown names fail."""
    if not requested:
        return list(known)
    everything = (JACOBIAN_CASES + SPECTRA_CASES + PARAMS_CASES + FORMAT_CASES
                  + NTK_CASES + SCALING_CASES)
    unknown = set(requested) - set(everything)
    if unknown:
        raise SystemExit(f"unknown benchmark case(s): {', '.join(sorted(unknown))}; choose "
                         f"from {', '.join(everything)}")
    return [c for c in requested if c in known]


def parse_args(description: str, known: tuple[str, ...]):
    """The options every benchmark script takes; returns (args, cases to run, device).

    Also turns TF32 off, so float32 timings are strict float32."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--output", type=Path, help="also write the report to this file")
    parser.add_argument("--cases", nargs="*", help=f"any of {', '.join(known)}")
    args = parser.parse_args()
    cases = selected_cases(args.cases, known)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return args, cases, device


def header(title: str, device: torch.device, quick: bool) -> str:
    """The report's first line: what ran where, with which torch, when."""
    import datetime
    import platform

    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine())
    return (f"## {title}{device.type.upper()}: {name}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}, {datetime.date.today().isoformat()}"
            f"{' (quick)' if quick else ''}\n")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device: torch.device, *, repeat: int = 3,
           warmup: int = 1) -> tuple[float, object]:
    """Best wall time of `repeat` runs after `warmup` runs; returns (seconds, last result)."""
    result = None
    for _ in range(warmup):
        result = fn()
    sync(device)
    best = math.inf
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best, result


class PeakMemory:
    """Peak bytes while the block runs: CUDA allocator peak, or sampled process RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - self._base)
            time.sleep(0.002)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()


def fill_seconds(n_bytes: int, device: torch.device, dtype: torch.dtype) -> float:
    """Time to write `n_bytes` once on `device` (the bandwidth limit for materializing)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    buffer = torch.empty(max(1, n_bytes // itemsize), dtype=dtype, device=device)
    seconds, _ = timeit(lambda: buffer.fill_(1.0), device)
    return seconds


def gemm_rate(device: torch.device, dtype: torch.dtype, size: int = 2048) -> float:
    """Measured FLOP/s of a square matmul: the arithmetic limit."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds, _ = timeit(lambda: a @ b, device)
    return 2 * size**3 / seconds


@dataclass
class Row:
    method: str
    seconds: float
    extrapolated: bool = False
    peak_bytes: int | None = None
    note: str = ""


@dataclass
class Case:
    title: str
    rows: list[Row] = field(default_factory=list)
    limit: Row | None = None
    notes: list[str] = field(default_factory=list)

    def markdown(self, reference: str = "jaccli") -> str:
        ours = next((r.seconds for r in self.rows if r.method.startswith(reference)), None)
        lines = [f"### {self.title}", "",
                 "| method | time | jaccli speed-up | % of limit | peak memory | note |",
                 "|---|---:|---:|---:|---:|---|"]
        for r in self.rows + ([self.limit] if self.limit else []):
            speedup = f"{r.seconds / ours:.1f}×" if ours and not r.method.startswith(
                reference) and r is not self.limit else ""
            share = (f"{100 * self.limit.seconds / r.seconds:.0f}%"
                     if self.limit and r is not self.limit else "")
            peak = f"{r.peak_bytes / 2**20:.0f} MiB" if r.peak_bytes is not None else ""
            time_text = _seconds(r.seconds) + (" (extrapolated)" if r.extrapolated else "")
            lines.append(f"| {r.method} | {time_text} | {speedup} | {share} | {peak} | {r.note} |")
        lines += [""] + [f"- {n}" for n in self.notes] + [""]
        return "\n".join(lines)


def _seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} µs"
