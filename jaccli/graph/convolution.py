"""One convolution with a fixed weight, as a linear map of its input: the geometry a results
file stores (encoding `convolution`, docs/FORMAT.md) and the shared operator rebuilt from it.

    weight  (C_out, C_in/groups, *k), or (C_in, C_out/groups, *k) when transposed
    input_shape (C_in, *S_in), output_shape (C_out, *S_out): per sample

The bias does not enter the Jacobian. Applied by `aten.convolution` (bias dropped) and its
transpose by `aten.convolution_backward`'s input gradient, never formed unless asked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .structures import Operator

aten = torch.ops.aten

# The attributes (besides the kernel) that fix the Jacobian, in the file's spelling.
GEOMETRY = ("stride", "padding", "dilation", "groups", "transposed", "output_padding",
            "input_shape", "output_shape")


@dataclass(frozen=True)
class Convolution:
    """A convolution's Jacobian: its weight and geometry (spatial settings: one int per dim)."""

    weight: torch.Tensor
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    transposed: bool
    output_padding: tuple[int, ...]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]

    def attrs(self) -> dict:
        """The geometry as results-file attributes (ints, int lists, a bool)."""
        return {"stride": list(self.stride), "padding": list(self.padding),
                "dilation": list(self.dilation), "groups": int(self.groups),
                "transposed": bool(self.transposed),
                "output_padding": list(self.output_padding),
                "input_shape": list(self.input_shape), "output_shape": list(self.output_shape)}

    def _settings(self):
        return (list(self.stride), list(self.padding), list(self.dilation), self.transposed,
                list(self.output_padding), self.groups)

    def apply(self, rows: torch.Tensor) -> torch.Tensor:
        """J applied to `(M, *input_shape)` -> `(M, *output_shape)`."""
        stride, padding, dilation, transposed, output_padding, groups = self._settings()
        return aten.convolution(rows, self.weight.to(rows.dtype), None, stride, padding,
                                dilation, transposed, output_padding, groups)

    def apply_t(self, rows: torch.Tensor) -> torch.Tensor:
        """Jᵀ applied to `(M, *output_shape)` -> `(M, *input_shape)`: the input gradient."""
        stride, padding, dilation, transposed, output_padding, groups = self._settings()
        grad, _, _ = aten.convolution_backward(
            rows.contiguous(), rows.new_empty(rows.shape[0], *self.input_shape),
            self.weight.to(rows.dtype), None, stride, padding, dilation, transposed,
            output_padding, groups, [True, False, False])
        return grad

    def row_norms2(self) -> torch.Tensor:
        """Σ_i J_oi² per output o `(D_out,)`, float64: each entry of J is one weight entry or
        0, so the rows' squared norms are the same convolution with w² applied to ones."""
        stride, padding, dilation, transposed, output_padding, groups = self._settings()
        ones = torch.ones(1, *self.input_shape, dtype=torch.float64,
                          device=self.weight.device)
        with torch.no_grad():
            out = aten.convolution(ones, self.weight.detach().double().square(), None, stride,
                                   padding, dilation, transposed, output_padding, groups)
        return out.reshape(-1)

    def frobenius(self) -> torch.Tensor:
        """‖J‖_F (0-d, float64), from `row_norms2`."""
        return self.row_norms2().sum().sqrt()

    def operator(self, dtype: torch.dtype | None = None) -> Operator:
        """The shared operator J `(D_out, D_in)`, applied through the convolution."""
        d_in, d_out = math.prod(self.input_shape), math.prod(self.output_shape)
        dtype = dtype or self.weight.dtype

        def forward(rows):
            return self.apply(rows.reshape(-1, *self.input_shape)).reshape(-1, d_out)

        def transpose(rows):
            return self.apply_t(rows.reshape(-1, *self.output_shape)).reshape(-1, d_in)

        return Operator(forward, transpose, d_out, d_in, dtype, self.weight.device,
                        convolution=self, row_norms2=self.row_norms2)


def from_attrs(kernel: torch.Tensor, attrs: dict) -> Convolution:
    """The convolution stored as `kernel` and the geometry attributes `attrs` (`GEOMETRY`)."""
    def ints(name):
        return tuple(int(v) for v in attrs[name])

    return Convolution(kernel, ints("stride"), ints("padding"), ints("dilation"),
                       int(attrs["groups"]), bool(attrs["transposed"]), ints("output_padding"),
                       ints("input_shape"), ints("output_shape"))
