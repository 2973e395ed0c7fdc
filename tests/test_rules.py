"""Every rule against the independent reference, on seeded random modules and shapes (float64)."""

import random

import pytest
import torch
from torch import nn

from jaccli.engine.rules import registered_classes, rule_for
from jaccli.engine.rules.elementwise import ACTIVATIONS

from .conftest import randomized, reference_jacobian


def _activation(cls):
    if cls is nn.Threshold:
        return nn.Threshold(0.1, 20.0)
    if cls is nn.PReLU:
        return nn.PReLU(3, init=0.3)
    return cls()


def cases(seed: int):
    """(module, input) pairs covering every registered class with random configurations."""
    rng = random.Random(seed)
    n = rng.randint(1, 3)
    c = rng.randint(1, 3) * 2
    length = rng.randint(5, 8)
    k = rng.choice([1, 2, 3])
    stride, dilation = rng.choice([1, 2]), rng.choice([1, 2])
    padding = rng.choice([0, 1])
    out = [
        (nn.Linear(5, rng.randint(2, 7)), torch.randn(n, 5)),
        (nn.Linear(4, 3, bias=False), torch.randn(n, 2, 4)),  # applied along a sequence
        (nn.Conv1d(c, 4, k, stride, padding, dilation, groups=2), torch.randn(n, c, length)),
        (nn.Conv2d(c, 2, k, stride, padding, dilation), torch.randn(n, c, 5, 6)),
        (nn.Conv2d(c, c, 3, padding=1, groups=c, padding_mode="circular"),
         torch.randn(n, c, 4, 4)),
        (nn.Conv3d(2, 2, 2, stride=stride), torch.randn(n, 2, 3, 4, 4)),
        (nn.ConvTranspose1d(c, 3, k, stride=2, padding=padding), torch.randn(n, c, 4)),
        (nn.ConvTranspose2d(c, 2, 3, stride=2, padding=1, output_padding=1, groups=2),
         torch.randn(n, c, 3, 3)),
        (nn.ConvTranspose3d(2, 1, 2, stride=2), torch.randn(n, 2, 2, 2, 2)),
        (nn.AvgPool1d(2, stride=stride), torch.randn(n, c, length)),
        (nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), torch.randn(n, c, 5, 5)),
        (nn.AvgPool3d(2), torch.randn(n, 1, 4, 4, 4)),
        (nn.AdaptiveAvgPool1d(3), torch.randn(n, c, length)),
        (nn.AdaptiveAvgPool2d((2, 3)), torch.randn(n, c, 5, 7)),
        (nn.AdaptiveAvgPool3d(2), torch.randn(n, 1, 3, 4, 5)),
        (nn.ZeroPad1d((1, 2)), torch.randn(n, c, 3)),
        (nn.ZeroPad2d(1), torch.randn(n, c, 3, 3)),
        (nn.ZeroPad3d(1), torch.randn(n, 1, 2, 2, 2)),
        (nn.PixelShuffle(2), torch.randn(n, 4, 2, 3)),
        (nn.PixelUnshuffle(2), torch.randn(n, 1, 4, 2)),
        (nn.MaxPool1d(2, stride=stride), torch.randn(n, c, length)),
        (nn.MaxPool2d(3, stride=2, padding=1, dilation=1), torch.randn(n, c, 6, 5)),
        (nn.MaxPool2d(2, ceil_mode=True), torch.randn(n, 1, 5, 5)),
        (nn.MaxPool3d(2), torch.randn(n, 2, 4, 4, 2)),
        (nn.AdaptiveMaxPool1d(3), torch.randn(n, c, length)),
        (nn.AdaptiveMaxPool2d(2), torch.randn(n, c, 5, 4)),
        (nn.AdaptiveMaxPool3d(1), torch.randn(n, 1, 2, 3, 2)),
        (randomized(nn.BatchNorm1d(c)), torch.randn(n, c)),
        (randomized(nn.BatchNorm1d(c, affine=False)), torch.randn(n, c, 4)),
        (randomized(nn.BatchNorm2d(c)), torch.randn(n, c, 3, 3)),
        (randomized(nn.BatchNorm3d(2)), torch.randn(n, 2, 2, 2, 2)),
        (nn.LayerNorm(6), torch.randn(n, 6)),
        (nn.LayerNorm((2, 3)), torch.randn(n, 2, 3)),
        (nn.LayerNorm(3, elementwise_affine=False), torch.randn(n, 2, 3)),  # per-row blocks
        (nn.GroupNorm(2, 4), torch.randn(n, 4, 3)),
        (nn.Softmax(dim=1), torch.randn(n, 5)),
        (nn.Softmax(dim=1), torch.randn(n, 3, 2)),  # over channels: generic inside the rule
        (nn.LogSoftmax(dim=-1), torch.randn(n, 5)),
        (nn.Identity(), torch.randn(n, 3, 2)),
        (nn.Flatten(), torch.randn(n, 2, 3)),
        (nn.Unflatten(1, (2, 3)), torch.randn(n, 6)),
        (nn.Dropout(0.5).eval(), torch.randn(n, 4)),
        (nn.Dropout1d(0.5).eval(), torch.randn(n, 2, 3)),
        (nn.Dropout2d(0.5).eval(), torch.randn(n, 2, 3, 3)),
        (nn.Dropout3d(0.5).eval(), torch.randn(n, 2, 2, 2, 2)),
        (nn.AlphaDropout(0.5).eval(), torch.randn(n, 4)),
        (nn.FeatureAlphaDropout(0.5).eval(), torch.randn(n, 2, 3)),
    ]
    for cls in ACTIVATIONS:
        shape = (n, 3, 4) if cls is nn.PReLU else rng.choice([(n, 7), (n, 2, 3, 3)])
        out.append((_activation(cls).eval(), torch.randn(*shape) * 2))
    return [(m.double().eval(), x.double()) for m, x in out]


def test_every_registered_class_is_covered():
    covered = {type(m) for m, _ in cases(0)}
    missing = [c.__name__ for c in registered_classes() if c not in covered]
    assert not missing, f"rules without a test case: {missing}"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rules_match_reference_jacobian_jvp_and_vjp(seed):
    torch.manual_seed(seed)
    for module, x in cases(seed):
        rule = rule_for(module)
        assert rule is not None, type(module).__name__
        name = f"{type(module).__name__} on {tuple(x.shape)}"
        expected = reference_jacobian(module, x)
        structured = rule.jacobian(module, x if not rule.shared else x[:1])
        assert structured.tag == rule.structure, name
        dense = structured.dense(x.shape[0])
        torch.testing.assert_close(dense, expected, rtol=1e-10, atol=1e-12, msg=name)
        torch.testing.assert_close(structured.frobenius(x.shape[0]),
                                   torch.linalg.matrix_norm(expected), msg=name)
        out_shape = module(x).shape
        v = torch.randn_like(x)
        u = torch.randn(out_shape, dtype=x.dtype)
        jv = torch.einsum("noi,ni->no", expected, v.reshape(x.shape[0], -1))
        uj = torch.einsum("no,noi->ni", u.reshape(x.shape[0], -1), expected)
        torch.testing.assert_close(rule.jvp(module, x, v).reshape(jv.shape), jv, msg=name)
        torch.testing.assert_close(rule.vjp(module, x, u).reshape(uj.shape), uj, msg=name)


def test_rules_refuse_configurations_where_they_are_not_exact():
    assert rule_for(nn.BatchNorm1d(3).train()) is None
    assert rule_for(nn.BatchNorm1d(3, track_running_stats=False).eval()) is None
    assert rule_for(nn.Dropout(0.5).train()) is None
    assert rule_for(nn.MaxPool2d(2, return_indices=True)) is None

    class MyLinear(nn.Linear):  # a subclass may change forward: exact classes only
        pass

    assert rule_for(MyLinear(2, 2)) is None
