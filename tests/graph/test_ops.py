"""Every op family through the engine: one model per family, one output per op applied to the
input. Each output's per-sample Jacobian matches autograd (float64), its op is planned with
the expected rule structure (never generic where a rule applies), and the plan's tag is the
computed one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from jaccli.graph import END_TO_END, GraphEngine, capture

from .helpers import reference_jacobian, relative_error

TOLERANCE = 1e-10


class Branches(nn.Module):
    """`forward(x) = (f_1(x), f_2(x), ...)`; modules are registered so export sees them."""

    def __init__(self, branches: dict):
        super().__init__()
        self.names = list(branches)
        self.mods = nn.ModuleDict({k: v for k, v in branches.items()
                                   if isinstance(v, nn.Module)})
        self.fns = {k: v for k, v in branches.items() if not isinstance(v, nn.Module)}

    def forward(self, x):
        return tuple(self.mods[k](x) if k in self.mods else self.fns[k](x)
                     for k in self.names)


class Fn(nn.Module):
    """`fn(x, module)`, with the module registered (so export lifts its weights)."""

    def __init__(self, fn, module: nn.Module | None = None):
        super().__init__()
        self.fn, self.module = fn, module

    def forward(self, x):
        return self.fn(x, self.module)


def _prelu(n):
    m = nn.PReLU(n)
    m.weight.data.uniform_(0.1, 0.4)
    return m


def _bn(cls, c):
    m = cls(c)
    m.running_mean.uniform_(-0.5, 0.5)
    m.running_var.uniform_(0.5, 2.0)
    m.weight.data.uniform_(0.5, 1.5)
    return m


W = torch.randn(6, 4, dtype=torch.float64)
LEFT = torch.randn(5, 3, dtype=torch.float64)
INDEX = torch.tensor([2, 1, 1, 0]).expand(1, 1, 3, 4)
MASK = torch.tensor([[0.0, -1.0, 0.5], [0.2, 0.0, -0.3], [-1.0, 0.0, 0.0]],
                    dtype=torch.float64)
# The expected structure is the op's Jacobian w.r.t. its first differentiated input
# (`x - tanh(x)`: the identity w.r.t. x; `x * scale(x)`: diagonal w.r.t. x).
FAMILIES = {
    "activations": ((3, 4), {
        f"{cls.__name__}": (cls(), "diagonal") for cls in (
            nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU,
            nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Softsign, nn.Hardtanh,
            nn.Hardswish, nn.Hardsigmoid, nn.Hardshrink, nn.Softshrink, nn.LogSigmoid,
            nn.RReLU)} | {
        "tanhshrink": (nn.Tanhshrink(), "identity"),
        "gelu_tanh": (nn.GELU(approximate="tanh"), "diagonal"),
        "threshold": (nn.Threshold(0.1, 2.0), "diagonal"),
        "prelu_channels": (_prelu(3), "diagonal"),
        "prelu_single": (_prelu(1), "diagonal"),
    }),
    "binary": ((3, 4), {
        "add_param": (lambda x: x + torch.arange(4.0, dtype=x.dtype), "identity"),
        "scale": (lambda x: x * 2.5, "shared-diagonal"),
        "divide": (lambda x: x / 3.0, "shared-diagonal"),
        "square": (lambda x: x * x, "diagonal"),
        "where": (lambda x: torch.where(x > 0, x, 0.3 * x), "diagonal"),
        "rsub": (lambda x: 1.0 - x, "shared-diagonal"),
        "se_scale": (lambda x: x * torch.sigmoid(x.mean(dim=(2,), keepdim=True)), "diagonal"),
        "broadcast_row": (lambda x: x[:, :1, :] * torch.ones(3, 4, dtype=x.dtype),
                          "shared-gather"),
    }),
    "linear": ((3, 4), {
        "linear_tokens": (nn.Linear(4, 6), "shared-kronecker"),
        "matmul_weight": (lambda x: x @ W.T, "shared-kronecker"),
        "weight_matmul": (lambda x: LEFT @ x, "shared-kronecker"),
        "bmm_scores": (lambda x: torch.bmm(x, x.transpose(1, 2)), "kronecker"),
        "linear_flat": (lambda x: F.linear(x.flatten(1), torch.ones(2, 12, dtype=x.dtype)),
                        "shared"),
    }),
    "convolution": ((2, 5, 5), {
        "conv2d": (nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=1), "shared-operator"),
        "conv2d_dilated": (nn.Conv2d(2, 2, 2, dilation=2), "shared-operator"),
        "grouped": (nn.Conv2d(2, 4, 3, groups=2, padding="same"), "shared-operator"),
        "depthwise": (nn.Conv2d(2, 2, 3, groups=2, bias=False), "shared-operator"),
        "transposed": (nn.ConvTranspose2d(2, 3, 2, stride=2), "shared-operator"),
        "conv1d": (Fn(lambda x, c: c(x[:, :, 0]), nn.Conv1d(2, 3, 2)), "shared-operator"),
        "conv_transpose1d": (Fn(lambda x, c: c(x[:, :, 1]),
                                nn.ConvTranspose1d(2, 2, 3, groups=2)), "shared-operator"),
        "conv3d": (Fn(lambda x, c: c(x[:, None]), nn.Conv3d(1, 2, 2)), "shared-operator"),
        "conv_transpose3d": (Fn(lambda x, c: c(x[:, None, :, :2, :2]),
                                nn.ConvTranspose3d(1, 1, 2)), "shared-operator"),
    }),
    "pooling": ((2, 6, 6), {
        "max2d": (nn.MaxPool2d(2), "selection"),
        "max2d_overlap": (nn.MaxPool2d(3, 2, padding=1, ceil_mode=True), "selection"),
        "adaptive_max": (nn.AdaptiveMaxPool2d(2), "selection"),
        "max1d": (lambda x: F.max_pool1d(x[:, 0], 2), "selection"),
        "max3d": (lambda x: F.max_pool3d(x[:, None], 2), "selection"),
        "avg2d": (nn.AvgPool2d(3, 2, padding=1), "shared-operator"),
        "avg1d": (lambda x: F.avg_pool1d(x[:, 1], 3), "shared-operator"),
        "avg3d": (lambda x: F.avg_pool3d(x[:, None], 2), "shared-operator"),
        "avg2d_ceil": (nn.AvgPool2d(3, 2, padding=1, ceil_mode=True, count_include_pad=False),
                       "shared-operator"),
        "avg2d_divisor": (lambda x: F.avg_pool2d(x, 2, divisor_override=3), "shared-operator"),
        "avg3d_strided": (lambda x: F.avg_pool3d(x[:, None], (1, 3, 3), stride=(1, 2, 1),
                                                 padding=(0, 1, 1)), "shared-operator"),
        "adaptive_avg": (nn.AdaptiveAvgPool2d((2, 3)), "shared-operator"),
        "adaptive_avg1d": (lambda x: F.adaptive_avg_pool1d(x[:, 0], 4), "shared-operator"),
        "nearest": (nn.Upsample(scale_factor=2, mode="nearest"), "shared-gather"),
        "bilinear": (nn.Upsample(scale_factor=2, mode="bilinear"), "shared-operator"),
        "mean": (lambda x: x.mean(dim=(2, 3)), "shared-operator"),
        "sum": (lambda x: x.sum(dim=1), "shared-operator"),
    }),
    "movement": ((2, 3, 4), {
        "permute": (lambda x: x.permute(0, 3, 1, 2), "shared-gather"),
        "transpose": (lambda x: x.transpose(1, 2), "shared-gather"),
        "flatten": (lambda x: x.flatten(1), "identity"),
        "unflatten": (lambda x: x.unflatten(3, (2, 2)), "identity"),
        "slice": (lambda x: x[:, :, 1:3], "shared-gather"),
        "select": (lambda x: x[:, 1], "shared-gather"),
        "cat_constant": (lambda x: torch.cat([x, torch.ones_like(x[:, :1])], 1),
                         "shared-gather"),
        "cat_self": (lambda x: torch.cat([x, x.flip(2)], dim=2), "shared-gather"),
        "split": (lambda x: x.split([1, 3], dim=3)[1], "shared-gather"),
        "chunk": (lambda x: x.chunk(2, dim=3)[0], "shared-gather"),
        "pad": (lambda x: F.pad(x, (1, 2, 0, 1), value=0.5), "shared-gather"),
        "pad_reflect": (lambda x: F.pad(x, (1, 1, 2, 0), mode="reflect"), "shared-gather"),
        "roll": (lambda x: x.roll(1, dims=3), "shared-gather"),
        "repeat": (lambda x: x.repeat(1, 2, 1, 1), "shared-gather"),
        "expand": (lambda x: x[:, :, :, :1].expand(-1, -1, -1, 3), "shared-gather"),
        "index_select": (lambda x: x.index_select(3, torch.tensor([3, 0, 0])),
                         "shared-gather"),
        # an index expanded over the batch could differ per sample: planned per sample
        "gather_expanded": (lambda x: x.gather(3, INDEX.expand(x.shape[0], 2, 3, 4)),
                            "gather"),
        "argmax_select": (lambda x: x.gather(3, x.argmax(3, keepdim=True)), "gather"),
        "pixel_shuffle": (lambda x: F.pixel_shuffle(x[:, :, :2, :2].repeat(1, 2, 1, 1), 2),
                          "shared-gather"),
    }),
    "norm": ((4, 3, 3), {
        "batch_norm": (_bn(nn.BatchNorm2d, 4), "shared-diagonal"),
        "layer_norm": (nn.LayerNorm(3), "kronecker"),
        "layer_norm_2d": (nn.LayerNorm([3, 3], elementwise_affine=False), "kronecker"),
        "group_norm": (nn.GroupNorm(2, 4), "kronecker"),
        "instance_norm": (nn.InstanceNorm2d(4, affine=True), "kronecker"),
        "softmax": (nn.Softmax(dim=-1), "kronecker"),
        "log_softmax": (nn.LogSoftmax(dim=-1), "kronecker"),
    }),
    "attention": ((2, 3, 4), {
        "sdpa": (lambda x: F.scaled_dot_product_attention(x, x.flip(2), x * 2), "kronecker"),
        "sdpa_causal": (lambda x: F.scaled_dot_product_attention(
            x, x.roll(1, 1), x.flip(1), is_causal=True, scale=0.7), "kronecker"),
        "sdpa_mask": (lambda x: F.scaled_dot_product_attention(
            x.roll(1, 2), x, x, attn_mask=MASK), "kronecker"),
        "sdpa_bool_mask": (lambda x: F.scaled_dot_product_attention(
            x, x.roll(1, 2), x.flip(1), attn_mask=MASK >= 0), "kronecker"),
    }),
    "generic": ((3, 4), {
        "cumprod": (lambda x: torch.cumprod(x, dim=2), "dense"),
        "norm": (lambda x: torch.linalg.vector_norm(x, dim=2), "dense"),
        "softmax_dim1": (lambda x: torch.softmax(x, dim=1), "dense"),
    }),
}
GENERIC_OUTPUTS = {"cumprod", "norm", "softmax_dim1"}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    torch.manual_seed(0)
    shape, branches = FAMILIES[request.param]
    model = Branches({k: v[0] for k, v in branches.items()}).double().eval()
    x = torch.randn(2, *shape, dtype=torch.float64)
    engine = GraphEngine(capture(model, x[:1]), granularity="op")
    return model, x, engine, {k: v[1] for k, v in branches.items()}


def test_every_output_matches_autograd(family):
    model, x, engine, _ = family
    result = engine.compute(x)
    assert relative_error(result[END_TO_END].dense(2), reference_jacobian(model, x)) < TOLERANCE
    op = engine.end_to_end_operator(x)
    v = torch.randn(2, op.d_in, 2, dtype=torch.float64)
    u = torch.randn(2, op.d_out, 2, dtype=torch.float64)
    dense = result[END_TO_END].dense(2)
    assert relative_error(op.jvp(v), dense @ v) < TOLERANCE
    assert relative_error(op.vjp(u), dense.transpose(1, 2) @ u) < TOLERANCE


def test_ops_get_their_rule_and_structure(family):
    model, x, engine, expected = family
    result = engine.compute(x)
    plans = {layer.output: layer for layer in engine.plan().layers}
    for (name, node), tag in zip(engine.graph.outputs.items(), expected.values(), strict=True):
        key = list(expected)[int(name)]
        layer = plans[node]
        assert layer.structure == tag, key
        assert result[layer.name].tag == tag, key
        if key in GENERIC_OUTPUTS:
            assert layer.generic, key
        else:
            assert not layer.generic, (key, [(o.op, o.note) for o in layer.ops])
