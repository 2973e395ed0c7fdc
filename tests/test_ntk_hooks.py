"""The NTK's hook route (`jaccli.params.ntk_hooks`, for models without an operator graph)
against an independent float64 reference: per-sample torch.func Jacobians of all parameters
(jacrev of functional_call), flattened and contracted."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from jaccli.errors import UsageError
from jaccli.params.ntk_hooks import hook_factors, hook_ntk


def reference_jacobians(model, x):
    """{param name: (N, C, P_name)}, one sample at a time."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).reshape(-1)

    rows = [jacrev(f)(params, xi) for xi in x]  # no vmap: independent of the code tested
    return {k: torch.stack([r[k] for r in rows]).reshape(len(x), rows[0][k].shape[0], -1)
            for k in params}


def reference_parts(model, x1, x2=None):
    """{module owning the parameters: Θ_l (N, M, C, C)}."""
    j1 = reference_jacobians(model, x1)
    j2 = j1 if x2 is None else reference_jacobians(model, x2)
    parts = {}
    for name in j1:
        block = torch.einsum("ncp,mdp->nmcd", j1[name], j2[name])
        layer = name.rpartition(".")[0] or "(model)"
        parts[layer] = parts.get(layer, 0) + block
    return parts


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
    """Self-attention over 4 tokens; the Linear `embed` runs on every token (T = 4), and the
    attention's `out_proj` parameters are read by the attention module itself."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)
        self.scale = nn.Parameter(torch.tensor(1.5))  # read by the top module itself

    def forward(self, x):
        h = self.embed(x)
        a, _ = self.attn(h, h, h)
        return self.head(self.norm(h + a)).mean(1) * self.scale


def mlp():
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.ReLU(),
                         nn.Linear(12, 3))


def cnn():
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.PReLU(4),
                         nn.MaxPool2d(2), nn.Conv2d(4, 3, 3), nn.PReLU(), nn.Flatten(),
                         nn.Linear(3 * 2 * 2, 5))


CASES = {"mlp": (mlp, (6,)), "cnn": (cnn, (2, 8, 8)), "residual": (Residual, (3, 5, 5)),
         "attention": (Attention, (4, 3))}


@pytest.fixture(params=sorted(CASES))
def case(request):
    torch.manual_seed(0)
    factory, shape = CASES[request.param]
    model = factory().double()
    for m in model.modules():  # non-trivial BatchNorm statistics, then eval mode
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    torch.manual_seed(2)
    return model.eval(), torch.randn(5, *shape, dtype=torch.float64), \
        torch.randn(3, *shape, dtype=torch.float64)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_per_layer_kernels_match_the_reference(case):
    model, x, _ = case
    parts, expected = hook_ntk(model, x), reference_parts(model, x)
    assert sorted(parts) == sorted(expected)
    for name in expected:
        close(parts[name], expected[name])


def test_cross_trace_and_diagonal(case):
    model, x, y = case
    full = sum(reference_parts(model, x, y).values())
    close(sum(hook_ntk(model, x, y).values()), full)
    close(sum(hook_ntk(model, x, y, mode="trace").values()), torch.einsum("nmcc->nm", full))
    own = sum(reference_parts(model, x).values())
    close(sum(hook_ntk(model, x, mode="diagonal").values()), torch.einsum("nncd->ncd", own))


def test_kernel_is_symmetric_positive_semidefinite(case):
    model, x, _ = case
    theta = sum(hook_ntk(model, x).values())
    n, _, c, _ = theta.shape
    matrix = theta.permute(0, 2, 1, 3).reshape(n * c, n * c)
    close(matrix, matrix.T)
    eigenvalues = torch.linalg.eigvalsh(matrix)
    assert eigenvalues.min() >= -1e-10 * eigenvalues.abs().max()


@pytest.mark.parametrize("width", [2, 64])  # both routes of a linear weight on sequences
def test_linear_on_sequences_and_a_module_called_twice(width):
    torch.manual_seed(3)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(width, width)
            self.head = nn.Linear(3 * width, 2)

        def forward(self, x):
            return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))).flatten(1))

    model = Twice().double().eval()
    x = torch.randn(4, 3, width, dtype=torch.float64)
    close(sum(hook_ntk(model, x).values()), sum(reference_parts(model, x).values()))


def test_samples_off_axis_zero_are_refused():
    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 1)

        def forward(self, x):
            h = x.transpose(0, 1)
            return self.attn(h, h, h)[0].transpose(0, 1).flatten(1)

    with pytest.raises(UsageError, match="axis 0"):
        hook_ntk(SeqFirst().double().eval(), torch.randn(3, 2, 4, dtype=torch.float64))


def test_every_hookable_format_gives_the_kernel_of_the_saved_model(model_files, mlp):
    """Loaded from each file format (a .pt2 archive: its unflattened module, whose layers
    run the generic route, or the Gram route when named Linear), the kernel is the saved
    module's."""
    import jaccli

    x = torch.randn(4, 6, dtype=torch.float64)
    expected = sum(reference_parts(mlp.double(), x).values())
    for name, spec in model_files.items():
        loaded = jaccli.load_model(spec["path"], **spec["kwargs"])
        if not loaded.hookable:  # TorchScript: no hooks, no functional_call
            continue
        module = loaded.module.double()
        close(sum(hook_ntk(module, x).values()), expected)
        linear = frozenset(n for n, m in module.named_modules()
                           if loaded.type_name(n, m) == "Linear")
        assert len(linear) == 3, name
        factors = hook_factors(module, x, linear)
        assert [f.kind for k, f in factors.items() if k.endswith("weight")] == ["gram"] * 3
        close(sum(hook_ntk(module, x, linear=linear).values()), expected)


class Branchy(nn.Module):
    """Data-dependent control flow: torch.export cannot capture it, hooks still work."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 6), nn.PReLU(), nn.Linear(6, 2))

    def forward(self, x):
        if float(x.detach().sum()) > 1e9:  # never taken, but export has to choose
            return x[:, :2]
        return self.body(x)


def test_the_api_falls_back_to_hooks_without_a_graph():
    import jaccli

    model = Branchy().double().eval()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    expected = reference_parts(model, x, y)
    theta, parts = jaccli.ntk(model, x, y, per_layer=True)
    close(theta, sum(expected.values()))
    assert sorted(parts) == sorted(expected)
    close(jaccli.ntk(model, x, trace=True),
          torch.einsum("nmcc->nm", sum(reference_parts(model, x).values())))
