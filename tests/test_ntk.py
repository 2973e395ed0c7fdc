"""The empirical NTK against an independent float64 reference: torch.func Jacobians of all
parameters (jacrev of functional_call), flattened and contracted."""

import pytest
import torch
from torch import nn

import jaccli

from .ntk_reference import reference_jacobians, reference_ntk


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(3)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(3)
        self.head = nn.Linear(3 * 5 * 5, 4)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.head(torch.relu(out).flatten(1))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        a, _ = self.attn(h, h, h)
        return self.head(self.norm(h + a)).mean(1)


def mlp():
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.ReLU(),
                         nn.Linear(12, 3))


def cnn():
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.PReLU(4),
                         nn.MaxPool2d(2), nn.Conv2d(4, 3, 3), nn.PReLU(), nn.Flatten(),
                         nn.Linear(3 * 2 * 2, 5))


def strided():
    """Convolutions with stride, padding, dilation and groups (the im2col route's cases)."""
    return nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2),
                         nn.Tanh(), nn.Conv2d(6, 4, (1, 2), bias=False), nn.Flatten(),
                         nn.Linear(4 * 4 * 3, 3))


def randomised(model):
    """Non-trivial BatchNorm statistics and affine parameters, then eval mode, float64."""
    torch.manual_seed(1)
    model = model.double()
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d,)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


CASES = {
    "mlp": (mlp, (6,)),
    "cnn": (cnn, (2, 8, 8)),
    "strided": (strided, (4, 7, 7)),
    "residual": (Residual, (3, 5, 5)),
    "attention": (Attention, (4, 3)),
}


@pytest.fixture(params=sorted(CASES))
def case(request):
    torch.manual_seed(0)
    factory, shape = CASES[request.param]
    model = randomised(factory())
    torch.manual_seed(2)
    return model, torch.randn(5, *shape, dtype=torch.float64), \
        torch.randn(3, *shape, dtype=torch.float64)


def test_kernel_matches_the_reference(case):
    model, x, _ = case
    theta = jaccli.ntk(model, x)
    expected = reference_ntk(model, x)
    assert theta.shape == expected.shape
    torch.testing.assert_close(theta, expected, rtol=1e-9, atol=1e-10)


def test_cross_kernel_and_trace(case):
    model, x, y = case
    expected = reference_ntk(model, x, y)
    torch.testing.assert_close(jaccli.ntk(model, x, y), expected, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(jaccli.ntk(model, x, y, trace=True),
                               torch.einsum("nmcc->nm", expected), rtol=1e-9, atol=1e-10)


def test_layers_sum_to_the_kernel_and_match_their_parameters(case):
    model, x, _ = case
    theta, parts = jaccli.ntk(model, x, per_layer=True)
    torch.testing.assert_close(sum(parts.values()), reference_ntk(model, x),
                               rtol=1e-9, atol=1e-10)
    jac = reference_jacobians(model, x)
    for name, part in parts.items():  # each layer: its own parameters' Jacobians
        prefix = name + "." if name else ""
        mine = [v for k, v in jac.items() if k.startswith(prefix)
                and not any(k.startswith(o + ".") for o in parts
                            if o != name and o.startswith(prefix))]
        j = torch.cat(mine, 2)
        torch.testing.assert_close(part, torch.einsum("ncp,mdp->nmcd", j, j),
                                   rtol=1e-9, atol=1e-10)


def test_kernel_total_and_layer_traces_from_graph_factors(case):
    """What `jaccli ntk` without --per-layer computes: every parameter's product accumulated
    into one buffer (`kernel_total`), in each mode and for a cross kernel, and the per-layer
    traces from the factors alone (`layer_traces`), against the reference."""
    from jaccli.api import _engine
    from jaccli.graph.ntk import ntk_factors, param_routes
    from jaccli.params.ntk import kernel_total, layer_traces

    from .ntk_reference import reference_layer_ntk

    model, x, y = case
    engine = _engine(model, x, end_to_end=False, include_layers=False).engine
    routes = param_routes(engine)
    with torch.no_grad():
        first, second = ntk_factors(engine, x, routes), ntk_factors(engine, y, routes)
    expected, cross = reference_ntk(model, x), reference_ntk(model, x, y)
    wanted = {("full", None): expected, ("trace", None): torch.einsum("nmcc->nm", expected),
              ("diagonal", None): torch.einsum("nncd->ncd", expected),
              ("full", "y"): cross, ("trace", "y"): torch.einsum("nmcc->nm", cross)}
    for (mode, other), value in wanted.items():
        got = kernel_total(first, second if other else None, mode)
        torch.testing.assert_close(got, value, rtol=1e-9, atol=1e-10, msg=f"{mode} {other}")
    traces = layer_traces(first)
    for layer, part in reference_layer_ntk(model, x).items():
        assert traces[layer] == pytest.approx(float(torch.einsum("nncc->", part)), rel=1e-9)


def test_kernel_is_symmetric_positive_semidefinite(case):
    model, x, _ = case
    theta = jaccli.ntk(model, x)
    n, _, c, _ = theta.shape
    matrix = theta.permute(0, 2, 1, 3).reshape(n * c, n * c)
    torch.testing.assert_close(matrix, matrix.T, rtol=1e-12, atol=1e-12)
    eigenvalues = torch.linalg.eigvalsh(matrix)
    assert eigenvalues.min() >= -1e-10 * eigenvalues.abs().max()


def test_sequence_linear_sums_over_positions():
    """A Linear applied to (N, L, d) inputs: positions summed, both contraction routes."""
    torch.manual_seed(3)
    for width in (2, 64):  # narrow: the per-position route; wide: positions are cheap
        model = nn.Sequential(nn.Linear(width, 5), nn.Tanh(), nn.Flatten(),
                              nn.Linear(15, 2)).double().eval()
        x = torch.randn(4, 3, width, dtype=torch.float64)
        torch.testing.assert_close(jaccli.ntk(model, x), reference_ntk(model, x),
                                   rtol=1e-9, atol=1e-10)


def _relative_change(width):
    """‖Θ after one SGD step − Θ before‖ / ‖Θ before‖ for an MLP in NTK parameterisation."""
    torch.manual_seed(0)
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.randn(8, 1, dtype=torch.float64)

    class Scaled(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer, self.scale = layer, layer.in_features ** -0.5
            nn.init.normal_(layer.weight)
            nn.init.normal_(layer.bias)

        def forward(self, h):
            return self.layer(h * self.scale)

    model = nn.Sequential(Scaled(nn.Linear(4, width)), nn.Tanh(),
                          Scaled(nn.Linear(width, width)), nn.Tanh(),
                          Scaled(nn.Linear(width, 1))).double()
    before = jaccli.ntk(model, x, trace=True)
    loss = ((model(x) - y) ** 2).mean()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads, strict=True):
            p -= 1.0 * g
    after = jaccli.ntk(model, x, trace=True)
    return ((after - before).norm() / before.norm()).item()


def test_kernel_moves_less_for_wider_networks():
    changes = [_relative_change(w) for w in (16, 64, 256)]
    assert changes[0] > changes[1] > changes[2]
    assert changes[2] < 0.5 * changes[0]


def test_exported_program_gives_the_eager_kernel(tmp_path):
    """A .pt2 archive (dynamic batch) loaded by jaccli: same kernel as the reference."""
    torch.manual_seed(0)
    model = randomised(cnn())
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    batch = torch.export.Dim("batch", min=2)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    path = tmp_path / "cnn.pt2"
    torch.export.save(program, path)
    loaded = jaccli.load_model(path)
    torch.testing.assert_close(jaccli.ntk(loaded, x), reference_ntk(model, x),
                               rtol=1e-9, atol=1e-10)


def test_diagonal_blocks(case):
    model, x, _ = case
    expected = reference_ntk(model, x)
    torch.testing.assert_close(jaccli.ntk(model, x, diagonal=True),
                               torch.einsum("nncd->ncd", expected), rtol=1e-9, atol=1e-10)


def _finite_differences(scalar, tensor, h=1e-5):
    """Central differences of `scalar()` w.r.t. every entry of `tensor` (changed in place)."""
    grad = torch.zeros_like(tensor)
    flat, out = tensor.data.view(-1), grad.view(-1)
    for k in range(flat.numel()):
        old = flat[k].item()
        flat[k] = old + h
        up = scalar()
        flat[k] = old - h
        down = scalar()
        flat[k] = old
        out[k] = (up - down) / (2 * h)
    return grad


def test_create_graph_gives_the_gradients_of_finite_differences():
    """trace Θ(X, X) and a weighted cross kernel Σ w·Θ(X, Y): their gradients w.r.t. the
    input and a weight (by autograd through jaccli.ntk) against central differences of the
    torch.func reference. Linear weights take the Gram route, LayerNorm the generic one."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 3)).double()
    with torch.no_grad():
        model[2].weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 4, dtype=torch.float64)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    scalars = {
        "trace": (lambda: jaccli.ntk(model, x, trace=True, create_graph=True).trace(),
                  lambda: torch.einsum("nncc->", reference_ntk(model, x.detach())).item()),
        "cross": (lambda: (w * jaccli.ntk(model, x, y, create_graph=True)).sum(),
                  lambda: (w * reference_ntk(model, x.detach(), y)).sum().item()),
    }
    weight = model[0].weight
    for name, (mine, reference) in scalars.items():
        value = mine()
        assert value.requires_grad, name
        assert value.item() == pytest.approx(reference(), rel=1e-10)
        gx, gw = torch.autograd.grad(value, [x, weight])
        torch.testing.assert_close(gx, _finite_differences(reference, x), rtol=1e-6,
                                   atol=1e-7, msg=name)
        torch.testing.assert_close(gw, _finite_differences(reference, weight), rtol=1e-6,
                                   atol=1e-7, msg=name)
    assert not jaccli.ntk(model, x, trace=True).requires_grad  # without it: no graph
