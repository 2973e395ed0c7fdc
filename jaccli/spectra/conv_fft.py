"""Exact singular values of circular convolutions (Sedghi, Gupta & Long, 2019).

A 2-D convolution with circular padding and stride 1 on an H x W input is block-circulant:
its singular values are the union, over the H·W frequencies (u, v), of the singular values of
the `C_out x C_in` matrix K̂(u, v) = Σ_ab K[:, :, a, b] e^{-2πi(au/H + bv/W)}.
"""

from __future__ import annotations

import torch
from torch import nn


def fft_applicable(module: nn.Module, input_shape: tuple[int, ...]) -> bool:
    """Whether the FFT method is exact for this layer on inputs of `input_shape` (C, H, W)."""
    return (type(module) is nn.Conv2d and module.padding_mode == "circular"
            and module.stride == (1, 1) and module.dilation == (1, 1) and module.groups == 1
            and len(input_shape) == 3
            and all(2 * p == k - 1 for p, k in zip(module.padding, module.kernel_size,
                                                    strict=True))
            and all(k <= size for k, size in zip(module.kernel_size, input_shape[1:],
                                                 strict=True)))


def conv2d_circular_singular_values(weight: torch.Tensor, height: int,
                                    width: int) -> torch.Tensor:
    """Singular values, sorted descending, of the circular convolution with
    `weight (C_out, C_in, kh, kw)` on `H x W` inputs: all `min(C_out, C_in)·H·W` of them."""
    c_out, c_in, kh, kw = weight.shape
    padded = weight.new_zeros(c_out, c_in, height, width)
    padded[:, :, :kh, :kw] = weight
    transfer = torch.fft.fft2(padded)  # (C_out, C_in, H, W) complex
    per_frequency = torch.linalg.svdvals(transfer.permute(2, 3, 0, 1))  # (H, W, min(C))
    return torch.sort(per_frequency.reshape(-1), descending=True).values
