"""Ops linear in their input with fixed weights: convolutions (1-3d, transposed, grouped,
depthwise), average and adaptive-average pooling, interpolation, sums and means.

The Jacobian is one shared linear map, applied matrix-free by running the op itself on the
tangents (bias dropped) and its transpose by the kernel autograd runs for the op's input
gradient (`aten.convolution_backward`, the average pools' backward kernels), else the op's
VJP; formed only if asked (`dense`). Per-sample weight gradients of a convolution come from
`aten.convolution_backward` one sample at a time (`vmap`; other overloads: the VJP), so
every variant is exact and no `torch.func` pullback runs for the common ops.
"""

from __future__ import annotations

import math

import torch
from torch.func import vjp

from ..convolution import Convolution
from ..opgraph import BATCHED, SYMBOLIC
from ..replay import OpCall
from ..structures import Operator
from .registry import OpRule, leaf_node, register

aten = torch.ops.aten

CONVOLUTIONS = (aten.convolution.default, aten.conv1d.default, aten.conv2d.default,
                aten.conv3d.default, aten.conv1d.padding, aten.conv2d.padding,
                aten.conv3d.padding, aten.conv_transpose1d.default,
                aten.conv_transpose2d.input, aten.conv_transpose3d.input)
POOLS = (aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default,
         aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default,
         aten.adaptive_avg_pool3d.default, aten._adaptive_avg_pool2d.default,
         aten._adaptive_avg_pool3d.default)
RESAMPLING = (aten.upsample_bilinear2d.vec, aten.upsample_bilinear2d.default,
              aten.upsample_linear1d.vec, aten.upsample_linear1d.default,
              aten.upsample_trilinear3d.vec, aten.upsample_trilinear3d.default,
              aten.upsample_bicubic2d.vec, aten.upsample_bicubic2d.default)
REDUCTIONS = (aten.mean.dim, aten.sum.dim_IntList, aten.cumsum.default)


class LinearMapRule(OpRule):
    """∂/∂x of an op linear in x (argument 0) whose other tensors are fixed."""

    name = "linear-map"
    family = "linear-map"
    zeroed: tuple[int, ...] = ()  # arguments (by index) to drop, the bias, when applying J

    def applies(self, node, graph, position):
        if position != 0 or node.batch_axis != 0:
            return False
        leaves = node.leaves()[0]
        for i in range(1, len(leaves)):
            leaf = leaf_node(node, graph, i)
            if leaf is not None and (leaf.kind in BATCHED or leaf.kind == SYMBOLIC):
                return False
        return True

    def structure(self, node, graph, position):
        return "shared-operator"

    def _apply(self, call: OpCall, rows: torch.Tensor) -> torch.Tensor:
        """J applied to `(M, *in)` -> `(M, *out)`: the op on M pseudo-samples, bias dropped."""
        args, kwargs = call.arguments({0: rows}, overrides=dict.fromkeys(self.zeroed))
        args = tuple(a.to(rows.dtype) if isinstance(a, torch.Tensor) and a.is_floating_point()
                     else a for a in args)
        return call.node.target(*args, **kwargs)

    def _transpose(self, call: OpCall, rows: torch.Tensor) -> torch.Tensor:
        zeros = rows.new_zeros(rows.shape[0], *call.in_shape(0))
        _, pullback = vjp(lambda a: self._apply(call, a), zeros)
        return pullback(rows)[0]

    def jacobian(self, call, position):
        in_shape, out_shape = call.in_shape(0), call.out_shape
        d_in, d_out = math.prod(in_shape), math.prod(out_shape)

        def forward(rows):
            return self._apply(call, rows.reshape(-1, *in_shape)).reshape(-1, d_out)

        def transpose(rows):
            return self._transpose(call, rows.reshape(-1, *out_shape)).reshape(-1, d_in)

        return Operator(forward, transpose, d_out, d_in, call.output.dtype, call.output.device,
                        row_norms2=self._row_norms2(call))

    def _row_norms2(self, call: OpCall):
        """`() -> (D_out,)` float64: the squared norm of every row of J without forming J,
        where the op allows it (convolutions); None."""
        return None

    def jvp(self, call, position, v):
        b, k = v.shape[:2]
        out = self._apply(call, v.reshape(b * k, *call.in_shape(0)))
        return out.reshape(b, k, *call.out_shape)

    def vjp(self, call, position, u):
        b, k = u.shape[:2]
        out = self._transpose(call, u.reshape(b * k, *call.out_shape))
        return out.reshape(b, k, *call.in_shape(0))


@register(*CONVOLUTIONS)
class ConvolutionRule(LinearMapRule):
    name = "convolution"
    family = "affine"
    zeroed = (2,)

    def jacobian(self, call, position):
        """The shared operator, knowing the convolution it is (kernel and geometry, for the
        compact `convolution` encoding) where the overload's settings are plain ints."""
        operator = super().jacobian(call, position)
        settings = _convolution_settings(call)
        if settings is not None:
            stride, padding, dilation, transposed, output_padding, groups = settings
            operator.convolution = Convolution(
                call.values[1].detach(), tuple(stride), tuple(padding), tuple(dilation),
                groups, transposed, tuple(output_padding), tuple(call.in_shape(0)),
                tuple(call.out_shape))
        return operator

    def _transpose(self, call: OpCall, rows: torch.Tensor) -> torch.Tensor:
        """Jᵀ applied to `(M, *out)` -> `(M, *in)`: the convolution's input gradient
        (`aten.convolution_backward`), without the forward pass a VJP would run first; other
        convolution overloads (string padding) by the VJP."""
        settings = _convolution_settings(call)
        if settings is None:
            return super()._transpose(call, rows)
        weight = call.values[1].to(rows.dtype)
        shape = (rows.shape[0], *call.in_shape(0))
        stride, padding, dilation, transposed, output_padding, groups = settings
        grad, _, _ = aten.convolution_backward(
            rows.contiguous(), rows.new_empty(shape), weight, None, stride, padding,
            dilation, transposed, output_padding, groups, [True, False, False])
        return grad

    def _row_norms2(self, call: OpCall):
        """Σ_i J_oi² for every output o: every entry of J is one weight entry w_k (the tap
        joining input i to output o, at most one per pair) or 0, so J∘J is the same
        convolution (stride, padding, dilation, groups, transposed or not; bias dropped) with
        w², and its row sums (J∘J) 1 are its output on an all-ones input — in float64."""
        def row_norms2() -> torch.Tensor:
            ones = torch.ones(1, *call.in_shape(0), dtype=torch.float64,
                              device=call.output.device)
            square = call.values[1].detach().to(torch.float64).square()
            args, kwargs = call.arguments({0: ones, 1: square}, overrides={2: None})
            args = tuple(a.to(torch.float64) if isinstance(a, torch.Tensor)
                         and a.is_floating_point() else a for a in args)
            with torch.no_grad():
                return call.node.target(*args, **kwargs).reshape(-1)

        return row_norms2

    def param_vjp(self, call, position, u):
        """Per-sample `uᵀ ∂out/∂W` `(B, k, *W.shape)` (VJP w.r.t. the weight per sample), and
        `uᵀ ∂out/∂bias` = u summed over positions."""
        if position == 2:
            return u.sum(dim=tuple(range(3, u.ndim)))
        if position != 1:
            return None
        x, weight = call.values[0].to(u.dtype), call.values[1].to(u.dtype)
        settings = _convolution_settings(call)
        if settings is not None:
            # The weight gradient kernel autograd runs, per sample and cotangent (no
            # torch.func pullback: its first call imports torch._dynamo, seconds of CPU).
            stride, padding, dilation, transposed, output_padding, groups = settings

            def weight_grad(xi: torch.Tensor, ci: torch.Tensor) -> torch.Tensor:
                return aten.convolution_backward(
                    ci[None], xi[None], weight, None, stride, padding, dilation, transposed,
                    output_padding, groups, [False, True, False])[1]

            return torch.vmap(lambda xi, ui: torch.vmap(lambda c: weight_grad(xi, c))(ui))(
                x, u)

        def per_sample(xi: torch.Tensor, ui: torch.Tensor) -> torch.Tensor:
            def out(w):
                args, kwargs = call.arguments({0: xi[None], 1: w}, overrides={2: None})
                return call.node.target(*args, **kwargs)[0]

            _, pullback = vjp(out, weight)
            return torch.vmap(lambda c: pullback(c)[0])(ui)

        return torch.vmap(per_sample)(x, u)


def _convolution_settings(call: OpCall):
    """(stride, padding, dilation, transposed, output_padding, groups) of a convolution
    node as `aten.convolution` takes them, each spatial setting one int per dimension; None
    for an overload this does not cover (padding "same")."""
    args, kwargs = call.arguments()
    target, dims = call.node.target, len(call.in_shape(0)) - 1

    def arg(index, name, default):
        return args[index] if len(args) > index else kwargs.get(name, default)

    def spatial(value):
        value = [value] if isinstance(value, int) else list(value)
        return value * dims if len(value) == 1 else value

    if target is aten.convolution.default:
        return (spatial(arg(3, "stride", 1)), spatial(arg(4, "padding", 0)),
                spatial(arg(5, "dilation", 1)), bool(arg(6, "transposed", False)),
                spatial(arg(7, "output_padding", 0)), int(arg(8, "groups", 1)))
    if target in (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
                  aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding):
        padding = arg(4, "padding", 0)
        if isinstance(padding, str):
            if padding != "valid":
                return None
            padding = 0
        return (spatial(arg(3, "stride", 1)), spatial(padding), spatial(arg(5, "dilation", 1)),
                False, [0] * dims, int(arg(6, "groups", 1)))
    if target in (aten.conv_transpose1d.default, aten.conv_transpose2d.input,
                  aten.conv_transpose3d.input):
        return (spatial(arg(3, "stride", 1)), spatial(arg(4, "padding", 0)),
                spatial(arg(7, "dilation", 1)), True, spatial(arg(5, "output_padding", 0)),
                int(arg(6, "groups", 1)))
    return None


# Average pools whose transpose is their input-gradient kernel, called directly: the kernel
# autograd runs for them, and no `torch.func` transform, whose first pullback in a process
# imports torch._dynamo (~2 s of CPU; a graph loaded from the cache imports nothing else).
_AVERAGE_BACKWARD = {aten.avg_pool2d.default: aten.avg_pool2d_backward.default,
                     aten.avg_pool3d.default: aten.avg_pool3d_backward.default}
_ADAPTIVE_BACKWARD = {aten._adaptive_avg_pool2d.default: aten._adaptive_avg_pool2d_backward.default,
                      aten.adaptive_avg_pool2d.default: aten._adaptive_avg_pool2d_backward.default,
                      aten._adaptive_avg_pool3d.default: aten._adaptive_avg_pool3d_backward.default,
                      aten.adaptive_avg_pool3d.default: aten._adaptive_avg_pool3d_backward.default}
_AVERAGE_SETTINGS = (("kernel_size", None), ("stride", []), ("padding", 0),
                     ("ceil_mode", False), ("count_include_pad", True),
                     ("divisor_override", None))


@register(*POOLS, *RESAMPLING, *REDUCTIONS)
class PoolingRule(LinearMapRule):
    name = "linear-map"
    family = "pooling"

    def _transpose(self, call: OpCall, rows: torch.Tensor) -> torch.Tensor:
        """Jᵀ applied to `(M, *out)` -> `(M, *in)`: for average pools the op's
        input-gradient kernel (what autograd runs for it); other ops by the VJP."""
        target = call.node.target
        if target in _ADAPTIVE_BACKWARD:
            return _ADAPTIVE_BACKWARD[target](rows.contiguous(), self._like(call, rows))
        if target in _AVERAGE_BACKWARD:
            settings = [call.arg(i + 1, name, default)
                        for i, (name, default) in enumerate(_AVERAGE_SETTINGS)]
            return _AVERAGE_BACKWARD[target](rows.contiguous(), self._like(call, rows),
                                             *settings)
        return super()._transpose(call, rows)

    @staticmethod
    def _like(call: OpCall, rows: torch.Tensor) -> torch.Tensor:
        """The backward kernels' `self` argument: only its shape is read."""
        return rows.new_empty(rows.shape[0], *call.in_shape(0))
