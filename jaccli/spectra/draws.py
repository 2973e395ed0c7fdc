"""Random start and probe vectors that belong to a sample, not to a batch.

Sample i of a batch draws its numbers from its own generator, seeded by the method's seed and
the sample's index in the data file: its Lanczos start block and its trace probes, hence its
estimates, are the same whatever batch size, `--shard` or number of torchrun ranks put it
next to which other samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_STRIDE = 1_000_003  # a prime: seeds of (seed, index) pairs do not collide for small seeds


class SampleDraws:
    """Per-sample generators for `n` samples whose indices are `indices` (default 0..n-1)."""

    def __init__(self, n: int, seed: int, indices: Sequence[int] | None = None):
        if indices is None:
            indices = range(n)
        if len(indices) != n:
            raise ValueError(f"{len(indices)} sample indices for {n} samples")
        self._generators = [torch.Generator(device="cpu").manual_seed(
            (seed * _STRIDE + int(index)) % 2**63) for index in indices]

    def normal(self, dim: int, count: int, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
        """`(N, dim, count)` standard normal entries."""
        return torch.stack([torch.randn(dim, count, generator=g, dtype=dtype)
                            for g in self._generators]).to(device)

    def signs(self, dim: int, count: int, dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
        """`(N, dim, count)` independent ±1 entries."""
        bits = torch.stack([torch.randint(0, 2, (dim, count), generator=g)
                            for g in self._generators])
        return (2 * bits - 1).to(device=device, dtype=dtype)
