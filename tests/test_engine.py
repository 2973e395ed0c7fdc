import pytest
import torch
from torch import nn

import jaccli
from jaccli.engine import per_sample_jacobian
from jaccli.engine.independence import check_sample_independence
from jaccli.errors import ModelRunError

from .conftest import TwoBranch, reference_jacobian


def _check_all_layers(model, x, granularity="module"):
    model = model.double()
    x = x.double()
    jacobians = jaccli.layer_jacobians(model, x, granularity=granularity, end_to_end=True)
    for layer in jaccli.list_layers(model, x, granularity=granularity):
        calls = []
        handle = layer.modules[0].register_forward_pre_hook(
            lambda m, a, calls=calls: calls.append(a[0].clone()))
        model(x)
        handle.remove()
        first_site = layer.sites[0]
        occurrence = int(first_site.split("#")[1]) if "#" in first_site else 0
        layer_input = calls[occurrence]

        def layer_fn(xb, layer=layer):
            for module in layer.modules:
                xb = module(xb)
            return xb

        expected = reference_jacobian(layer_fn, layer_input)
        torch.testing.assert_close(jacobians[layer.name], expected, rtol=1e-10, atol=1e-12,
                                   msg=layer.name)
    torch.testing.assert_close(jacobians["(end-to-end)"], reference_jacobian(model, x),
                               rtol=1e-10, atol=1e-12)
    return jacobians


def test_mlp_layers_match_reference(mlp):
    jac = _check_all_layers(mlp, torch.randn(5, 6))
    # A Linear layer's Jacobian is its weight, for every sample.
    torch.testing.assert_close(jac["0"], mlp[0].weight.expand(5, -1, -1))


def test_cnn_layers_and_blocks_match_reference(cnn):
    x = torch.randn(3, 2, 6, 6)
    _check_all_layers(cnn, x)
    _check_all_layers(cnn, x, granularity="block")


def test_non_chain_model_matches_reference():
    _check_all_layers(TwoBranch().eval(), torch.randn(4, 4))


def test_layernorm_and_nested_containers_match_reference():
    model = nn.Sequential(nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7)),
                          nn.Sequential(nn.Sequential(nn.SiLU(), nn.Linear(7, 2)))).eval()
    _check_all_layers(model, torch.randn(4, 5))


@pytest.mark.parametrize("shape", [(3, 8), (8, 3), (5, 5)])
def test_forward_and_reverse_modes_agree(shape):
    d_in, d_out = shape
    model = nn.Sequential(nn.Linear(d_in, d_out), nn.Softplus()).double().eval()
    x = torch.randn(4, d_in, dtype=torch.float64)
    fwd = per_sample_jacobian(model, x, mode="fwd", chunk_size=2)
    rev = per_sample_jacobian(model, x, mode="rev", chunk_size=3)
    torch.testing.assert_close(fwd, rev, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fwd, reference_jacobian(model, x))


def test_end_to_end_matches_central_finite_differences(mlp):
    model = mlp.double()
    x = torch.randn(3, 6, dtype=torch.float64)
    jac = jaccli.end_to_end_jacobian(model, x)
    eps = 1e-6
    with torch.no_grad():
        for i in range(6):
            step = torch.zeros(6, dtype=torch.float64)
            step[i] = eps
            column = (model(x + step) - model(x - step)) / (2 * eps)
            torch.testing.assert_close(jac[:, :, i], column, rtol=1e-7, atol=1e-8)


def test_extra_batched_inputs_are_held_fixed_per_sample():
    class Gate(nn.Module):
        def forward(self, x, scale):
            return torch.tanh(x) * scale

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.gate = nn.Linear(3, 3), Gate()

        def forward(self, x):
            return self.gate(self.lin(x), x.sum(dim=1, keepdim=True))

    model = Model().double().eval()
    x = torch.randn(4, 3, dtype=torch.float64)
    jac = jaccli.layer_jacobians(model, x)["gate"]
    pre = model.lin(x)
    scale = x.sum(dim=1, keepdim=True)
    expected = torch.diag_embed((1 - torch.tanh(pre) ** 2) * scale)
    torch.testing.assert_close(jac, expected)


def test_batch_coupling_is_detected():
    coupled = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, track_running_stats=False)).eval()
    with pytest.raises(ModelRunError, match="fails on a batch of one sample"):
        check_sample_independence(coupled, torch.randn(4, 3))

    class MixRows(nn.Module):
        def forward(self, x):
            return x - x.mean(dim=0, keepdim=True) + x

    with pytest.raises(ModelRunError, match="changes with the other samples in its batch"):
        check_sample_independence(MixRows(), torch.randn(4, 3))
    check_sample_independence(nn.Sequential(nn.Linear(3, 3)).eval(), torch.randn(4, 3))
