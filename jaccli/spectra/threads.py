"""Small dense decompositions on one CPU thread.

LAPACK's eigh / svd of matrices up to a few thousand rows spend most of their time in
synchronisation between threads; on a CPU whose cores are shared with other processes the
OpenMP workers spin-wait for each other, and the call becomes several times slower than on one
thread (measured on a loaded 2-core machine: eigh of 300 x 300 float32 3.1 s on two threads,
0.03 s on one; svdvals of 1024 x 1152 2.2 s and 0.6 s).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

# Up to this many rows or columns, a decomposition runs on one thread.
ONE_THREAD_MAX = 2048


@contextmanager
def decomposition_threads(matrix: torch.Tensor) -> Iterator[None]:
    """One thread for decomposing `matrix` `(..., m, n)` on the CPU when `max(m, n)` is at
    most `ONE_THREAD_MAX`; the thread count is restored afterwards."""
    small = matrix.device.type == "cpu" and max(matrix.shape[-2:]) <= ONE_THREAD_MAX
    before = torch.get_num_threads()
    if not small or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
