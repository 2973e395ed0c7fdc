"""Parameter-side functions of a forward taking several arguments: `param_jacobians`, `ntk`
and the `wrt="params"` products with `inputs=` (per-sample, held fixed) and `consts=`, and
`jaccli ntk` / `jaccli vjp --wrt params` with `--input`/`--const`, for eager, `.pt2` and
TorchScript models, against float64 `torch.autograd.functional.jacobian` per sample."""

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call
from typer.testing import CliRunner

import jaccli
from jaccli.cli import app

runner = CliRunner()
N, SCALE = 5, 2.5


class Mixed(nn.Module):
    """forward(x (B, 1, 6, 6), y (B, 3), scale: float) -> (B, 2): a conv branch on x, a
    linear branch on y (read twice), multiplied and scaled."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.a = nn.Linear(48, 4)
        self.b = nn.Linear(3, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x, y, scale: float):
        h = torch.tanh(self.a(torch.relu(self.conv(x)).flatten(1)))
        return self.out(h * torch.sigmoid(self.b(y)) * scale + 0.1 * self.b(y))


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The float64 model, x, y, and the model as .pt2 (float64, dynamic batch) and
    TorchScript files, with x and y as .npy files."""
    folder = tmp_path_factory.mktemp("params_inputs")
    torch.manual_seed(0)
    model = Mixed().double().eval()
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(N, 1, 6, 6)), rng.normal(size=(N, 3))
    np.save(folder / "x.npy", x)
    np.save(folder / "y.npy", y)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (x[:2], y[:2], SCALE),
                                  dynamic_shapes=({0: batch}, {0: batch}, None))
    torch.export.save(program, folder / "mixed.pt2")
    torch.jit.save(torch.jit.script(model), folder / "mixed.ts")
    return folder, model, x, y


def reference_param_jacobians(model, x, y):
    """{name: (N, 2, P)}: each parameter's per-sample Jacobian of the output, float64."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    result = {}
    for name, value in params.items():
        rows = []
        for i in range(len(x)):
            def one(w, i=i, name=name):
                return functional_call(model, {**params, name: w},
                                       (x[i:i + 1], y[i:i + 1], SCALE))[0]

            rows.append(torch.autograd.functional.jacobian(one, value).reshape(2, -1))
        result[name] = torch.stack(rows)
    return result


def reference_ntk(model, x1, y1, x2=None, y2=None):
    """Θ `(N, M, 2, 2)` = Σ_P J_P(x1, y1) J_P(x2, y2)ᵀ."""
    j1 = torch.cat(list(reference_param_jacobians(model, x1, y1).values()), 2)
    j2 = j1 if x2 is None else torch.cat(
        list(reference_param_jacobians(model, x2, y2).values()), 2)
    return torch.einsum("ncp,mdp->nmcd", j1, j2)


def _model(case, fmt):
    folder, model, _, _ = case
    return model if fmt == "eager" else jaccli.load_model(folder / "mixed.pt2")


@pytest.mark.parametrize("fmt", ["eager", "pt2"])
def test_param_jacobians_with_a_held_input_and_a_constant(case, fmt):
    _, eager, x, y = case
    model = _model(case, fmt)
    expected = reference_param_jacobians(eager, x, y)
    got = jaccli.param_jacobians(model, x, inputs={"y": y}, consts={"scale": SCALE})
    assert list(got) == list(expected)  # named_parameters order
    for name, jac in got.items():
        assert jac.shape == (N, 2, *dict(eager.named_parameters())[name].shape)
        torch.testing.assert_close(jac.reshape(N, 2, -1), expected[name], rtol=1e-10,
                                   atol=1e-13)
    # b reads only the held input y: its parameters still move the output
    assert expected["b.weight"].abs().max() > 0.01
    one = jaccli.param_jacobians(model, x, inputs={"y": y}, consts={"scale": SCALE},
                                 params=["b.*"], output_index=1)
    assert list(one) == ["b.weight", "b.bias"]
    torch.testing.assert_close(one["b.weight"].reshape(N, -1), expected["b.weight"][:, 1],
                               rtol=1e-10, atol=1e-13)


def test_param_jacobians_of_a_loss_with_a_held_input(case):
    _, model, x, y = case
    t = torch.tensor([0, 1, 1, 0, 1])
    params = {k: v.detach() for k, v in model.named_parameters()}
    got = jaccli.param_jacobians(model, x, loss="cross-entropy", targets=t,
                                 inputs={"y": y}, consts={"scale": SCALE})
    for i in range(N):
        def loss(p, i=i):
            out = functional_call(model, p, (x[i:i + 1], y[i:i + 1], SCALE))
            return torch.nn.functional.cross_entropy(out, t[i:i + 1])

        grads = torch.func.grad(loss)(params)
        for name, g in grads.items():
            torch.testing.assert_close(got[name][i], g, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("fmt", ["eager", "pt2"])
def test_ntk_with_a_held_input_and_a_constant(case, fmt):
    _, eager, x, y = case
    model = _model(case, fmt)
    expected = reference_ntk(eager, x, y)
    held = {"inputs": {"y": y}, "consts": {"scale": SCALE}}
    torch.testing.assert_close(jaccli.ntk(model, x, **held), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(jaccli.ntk(model, x, trace=True, **held),
                               expected.diagonal(dim1=2, dim2=3).sum(-1), rtol=1e-10,
                               atol=1e-12)
    torch.testing.assert_close(jaccli.ntk(model, x, diagonal=True, **held),
                               expected[range(N), range(N)], rtol=1e-10, atol=1e-12)
    total, parts = jaccli.ntk(model, x, per_layer=True, **held)
    assert set(parts) == {"conv", "a", "b", "out"}
    torch.testing.assert_close(sum(parts.values()), expected, rtol=1e-10, atol=1e-12)
    cross = jaccli.ntk(model, x[:3], x[3:], inputs={"y": y[:3]}, inputs2={"y": y[3:]},
                       consts={"scale": SCALE})
    torch.testing.assert_close(cross, reference_ntk(eager, x[:3], y[:3], x[3:], y[3:]),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fmt", ["eager", "pt2"])
def test_parameter_products_with_a_held_input(case, fmt):
    _, eager, x, y = case
    model = _model(case, fmt)
    expected = reference_param_jacobians(eager, x, y)
    held = {"inputs": {"y": y}, "consts": {"scale": SCALE}}
    torch.manual_seed(1)
    u = torch.randn(N, 2, dtype=torch.float64)
    got = jaccli.vjp(model, x, u, wrt="params", **held)
    for name, jac in expected.items():
        torch.testing.assert_close(got[name].reshape(N, -1),
                                   torch.einsum("nc,ncp->np", u, jac), rtol=1e-10, atol=1e-13)
    tangents = {name: torch.randn(p.shape, dtype=torch.float64)
                for name, p in eager.named_parameters() if name.startswith(("b.", "conv."))}
    want = sum(expected[q] @ t.reshape(-1) for q, t in tangents.items())
    torch.testing.assert_close(jaccli.jvp(model, x, tangents, wrt="params", **held), want,
                               rtol=1e-10, atol=1e-13)


def test_parameter_side_refusals(case):
    _, model, x, y = case
    held = {"inputs": {"y": y}, "consts": {"scale": SCALE}}
    for call in (lambda: jaccli.param_jacobians(model, x, wrt="y", **held),
                 lambda: jaccli.ntk(model, x, wrt="y", **held)):
        with pytest.raises(jaccli.JaccliError, match="wrt='y' names a forward input"):
            call()
    with pytest.raises(jaccli.JaccliError, match="argument scale has no value"):
        jaccli.param_jacobians(model, x, inputs={"y": y})
    with pytest.raises(jaccli.JaccliError, match="inputs2= must give x2's rows"):
        jaccli.ntk(model, x[:3], x[3:], inputs={"y": y[:3]}, consts={"scale": SCALE})
    with pytest.raises(jaccli.JaccliError, match="create_graph=True takes models of one"):
        jaccli.ntk(model, x, create_graph=True, **held)


@pytest.mark.parametrize("suffix", ["pt2", "ts"])
def test_ntk_cli_with_input_and_const(case, suffix):
    folder, model, x, y = case
    out = folder / f"ntk_{suffix}.h5"
    args = ["ntk", folder / f"mixed.{suffix}", folder / "x.npy", "--input",
            f"y={folder / 'y.npy'}", "--const", f"scale={SCALE}", "--dtype", "float64",
            "--batch-size", "2", "-q", "-o", out]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    with h5py.File(out) as f:
        got = torch.from_numpy(f["ntk/kernel"][:])
        assert f.attrs["wrt_input"] == "x"
    torch.testing.assert_close(got, reference_ntk(model, x, y), rtol=1e-10, atol=1e-12)
    cross_args = [*args[:3], folder / "x.npy", *args[3:-1], folder / "cross.h5"]
    cross = runner.invoke(app, [str(a) for a in cross_args])
    assert cross.exit_code == 2, cross.output
    lines = cross.stderr.strip().splitlines()
    assert len(lines) == 1 and "DATA2" in lines[0] and "--const only" in lines[0], lines
    assert not (folder / "cross.h5").exists()


def test_vjp_cli_wrt_params_with_input_and_const(case):
    folder, model, x, y = case
    rng = np.random.default_rng(2)
    u = rng.normal(size=(N, 2))
    np.save(folder / "u.npy", u)
    out = folder / "vjp.h5"
    result = runner.invoke(app, [str(a) for a in [
        "vjp", folder / "mixed.pt2", folder / "x.npy", "--input", f"y={folder / 'y.npy'}",
        "--const", f"scale={SCALE}", "--wrt", "params", "--vectors", folder / "u.npy",
        "--dtype", "float64", "-q", "-o", out]])
    assert result.exit_code == 0, result.output
    jac = torch.cat(list(reference_param_jacobians(model, x, y).values()), 2)
    with h5py.File(out) as f:
        got = f["products/product/product"][:]
    np.testing.assert_allclose(got, torch.einsum("nc,ncp->np", torch.from_numpy(u), jac),
                               rtol=1e-10, atol=1e-13)
