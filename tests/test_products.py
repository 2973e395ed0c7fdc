"""JVP/VJP/HVP without forming matrices, Hessian spectra, and the differentiable API."""

import json

import h5py
import jsonschema
import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import jaccli
from jaccli.cli import app
from jaccli.params.hessian import hessian_spectrum, inputs_hvp, params_hvp
from jaccli.params.jacobians import select_params
from jaccli.params.objectives import per_sample_loss
from jaccli.spectra.trace import hutchinson_trace

from .conftest import CNN_SPEC, ROOT, reference_jacobian

SCHEMAS = ROOT / "jaccli" / "schemas"

runner = CliRunner()
F64 = torch.float64


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()


def dense_param_hessian(model, x, t, loss):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def mean_loss(theta):
        params, i = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            params[name] = theta[i:i + shape.numel()].reshape(shape)
            i += shape.numel()
        return loss(torch.func.functional_call(model, params, (x,)), t).mean()

    return torch.autograd.functional.hessian(mean_loss, flat)


def test_api_jvp_vjp_equal_dense_products(cnn):
    model = cnn.double()
    x = torch.randn(3, 2, 6, 6, dtype=F64)
    jac = reference_jacobian(model, x)
    v = torch.randn(3, 72, dtype=F64)
    u = torch.randn(3, 3, dtype=F64)
    torch.testing.assert_close(jaccli.jvp(model, x, v), (jac @ v[:, :, None])[:, :, 0])
    torch.testing.assert_close(jaccli.vjp(model, x, u), (u[:, None, :] @ jac)[:, 0, :])
    layer = jaccli.layer_jacobians(model, x, layers=["head.0"])["head.0"]
    w = torch.randn(3, 5, dtype=F64)
    torch.testing.assert_close(jaccli.vjp(model, x, w, layer="head.0"),
                               (w[:, None, :] @ layer)[:, 0, :])


def test_hvp_equals_dense_hessian_products():
    model = small_model()
    x = torch.randn(8, 4, dtype=F64)
    t = torch.randint(0, 3, (8,))
    loss = per_sample_loss("cross-entropy")
    hessian = dense_param_hessian(model, x, t, loss)
    v = torch.randn(hessian.shape[0], dtype=F64)
    torch.testing.assert_close(jaccli.hvp(model, x, v, targets=t, loss="cross-entropy"),
                               hessian @ v)
    vi = torch.randn(8, 4, dtype=F64)
    per_sample = torch.stack([torch.autograd.functional.hessian(
        lambda z, i=i: loss(model(z[None]), t[i:i + 1])[0], x[i]) for i in range(8)])
    torch.testing.assert_close(
        jaccli.hvp(model, x, vi, targets=t, loss="cross-entropy", wrt="inputs").detach(),
        (per_sample @ vi[:, :, None])[:, :, 0])


def test_lanczos_eigenvalues_and_hutchinson_trace_of_the_hessian():
    model = small_model()
    x = torch.randn(10, 4, dtype=F64)
    t = torch.randint(0, 3, (10,))
    loss = per_sample_loss("cross-entropy")
    hessian = dense_param_hessian(model, x, t, loss)
    exact = torch.linalg.eigvalsh(hessian)
    operator = params_hvp(model, loss, lambda: [(x[:5], t[:5]), (x[5:], t[5:])],
                          select_params(model), 10)
    result = hessian_spectrum(operator, batch=1, dim=hessian.shape[0], k=3, probes=400,
                              dtype=F64, device=torch.device("cpu"), density_probes=4)
    torch.testing.assert_close(result.eigenvalues[0], exact.flip(0)[:3], rtol=1e-8, atol=1e-10)
    magnitude = hessian_spectrum(operator, batch=1, dim=hessian.shape[0], k=1, probes=4,
                                 dtype=F64, device=torch.device("cpu"), which="magnitude")
    assert magnitude.eigenvalues[0, 0].abs() == pytest.approx(exact.abs().max().item())
    assert result.converged.all() and magnitude.converged.all() and result.tolerance == 1e-8
    trace = torch.trace(hessian).item()
    # Hutch++ (the default): 400 products sketch all 51 directions, so the trace is exact.
    assert result.trace.item() == pytest.approx(trace, rel=1e-10)
    plain, plain_se = hutchinson_trace(operator, n=1, dim=hessian.shape[0], dtype=F64,
                                       device=torch.device("cpu"), probes=400,
                                       method="hutchinson")
    assert abs(plain.item() - trace) <= 4 * plain_se.item() and plain_se.item() > 0
    nodes, weights = result.density
    assert weights.sum().item() == pytest.approx(1.0)
    assert nodes.min() >= exact.min() - 1e-8 and nodes.max() <= exact.max() + 1e-8
    per_input = hessian_spectrum(inputs_hvp(model, loss, x, t), batch=10, dim=4, k=2, probes=8,
                                 dtype=F64, device=torch.device("cpu"))
    hi = torch.stack([torch.autograd.functional.hessian(
        lambda z, i=i: loss(model(z[None]), t[i:i + 1])[0], x[i]) for i in range(10)])
    torch.testing.assert_close(per_input.eigenvalues.detach(),
                               torch.linalg.eigvalsh(hi).flip(1)[:, :2], rtol=1e-7, atol=1e-9)


def test_differentiable_jacobian_matches_finite_differences():
    model = small_model()
    x = torch.randn(5, 4, dtype=F64)

    def penalty():
        jac = jaccli.jacobian(model, x, create_graph=True)
        return torch.logdet(jac @ jac.transpose(1, 2)).sum() + jac.square().sum()

    value = penalty()
    value.backward()
    analytic = model[0].weight.grad.clone()
    numeric = torch.zeros_like(analytic)
    eps = 1e-6
    with torch.no_grad():
        for i in range(analytic.shape[0]):
            for j in range(analytic.shape[1]):
                model[0].weight[i, j] += eps
                up = penalty()
                model[0].weight[i, j] -= 2 * eps
                down = penalty()
                model[0].weight[i, j] += eps
                numeric[i, j] = (up - down) / (2 * eps)
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-8)
    assert not jaccli.jacobian(model, x).requires_grad  # no graph unless asked


def test_differentiable_layer_jacobians_carry_gradients_through_earlier_layers():
    model = small_model()
    x = torch.randn(5, 4, dtype=F64)
    jacobians = jaccli.layer_jacobians(model, x, create_graph=True)
    jacobians["1"].sum().backward()  # tanh' depends on the first layer's weights
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0


def test_cli_jvp_vjp_hessian(tmp_path, cnn):
    jaccli.save_model(cnn, CNN_SPEC, tmp_path / "cnn.safetensors")
    x = np.random.default_rng(0).normal(size=(6, 2, 6, 6))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "v.npy", np.random.default_rng(1).normal(size=(6, 72)))
    np.save(tmp_path / "u.npy", np.random.default_rng(2).normal(size=(3,)))
    np.save(tmp_path / "y.npy", np.array([0, 1, 2, 0, 1, 2]))
    base = [str(tmp_path / "cnn.safetensors"), str(tmp_path / "x.npy"), "--dtype", "float64"]
    result = runner.invoke(app, ["jvp", *base, "--vectors", str(tmp_path / "v.npy"), "--json",
                                 "-o", str(tmp_path / "jvp.h5")])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["schema"] == "jaccli/products-summary" and doc["shape"] == [6, 3]
    jsonschema.validate(doc, json.loads((SCHEMAS / "products-summary.schema.json").read_text()))
    jac = reference_jacobian(cnn.double(), torch.from_numpy(x))
    with jaccli.open_results(tmp_path / "jvp.h5") as r:
        assert r.attrs["kind"] == "products"
        np.testing.assert_allclose(r.file["products/product/product"][:],
                                   (jac @ torch.from_numpy(np.load(tmp_path / "v.npy"))[:, :, None]
                                    )[:, :, 0].numpy(), rtol=1e-10)
    vjp = runner.invoke(app, ["vjp", *base, "--vectors", str(tmp_path / "u.npy"), "--wrt",
                              "params", "--json"])
    assert vjp.exit_code == 0, vjp.output
    assert json.loads(vjp.stdout)["shape"] == [6, sum(p.numel() for p in cnn.parameters())]
    bad = runner.invoke(app, ["jvp", *base, "--vectors", str(tmp_path / "u.npy")])
    assert bad.exit_code == 1 and "jvp needs 72" in bad.stderr
    hess = runner.invoke(app, ["hessian", *base, "--targets", str(tmp_path / "y.npy"),
                               "--loss", "cross-entropy", "--top-k", "2", "--json"])
    assert hess.exit_code == 0, hess.output
    doc = json.loads(hess.stdout)
    jsonschema.validate(doc, json.loads((SCHEMAS / "hessian-summary.schema.json").read_text()))
    assert doc["schema"] == "jaccli/hessian-summary" and len(doc["eigenvalues"]) == 2
    assert doc["eigenvalues"][0] >= doc["eigenvalues"][1]


def test_show_summarises_products_and_hessian_files(tmp_path):
    """`jaccli show` on a jvp/vjp or hessian file prints the run's summary (its --json is the
    run's document), with the values of a float64 torch.autograd reference."""
    model = small_model()
    spec = {"format": "jaccli-arch", "version": 1, "input_shape": [4],
            "model": {"type": "Sequential", "children": [
                {"type": "Linear", "args": [4, 6]}, {"type": "Tanh"},
                {"type": "Linear", "args": [6, 3]}]}}
    jaccli.save_model(model, spec, tmp_path / "m.safetensors")
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(5, 4)))
    u = torch.from_numpy(np.random.default_rng(1).normal(size=(5, 3)))
    t = torch.tensor([0, 1, 2, 0, 1])
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "u.npy", u.numpy())
    np.save(tmp_path / "t.npy", t.numpy())
    base = [str(tmp_path / "m.safetensors"), str(tmp_path / "x.npy"), "--dtype", "float64"]
    loss = per_sample_loss("cross-entropy")
    hessians = torch.stack([torch.autograd.functional.hessian(
        lambda z, i=i: loss(model(z[None]), t[i:i + 1])[0], x[i]) for i in range(5)])
    reference = {
        "vjp": lambda doc: np.testing.assert_allclose(
            doc["norm"]["max"], torch.linalg.norm(
                (u[:, None, :] @ reference_jacobian(model, x))[:, 0], dim=1).max().item(),
            rtol=1e-10),
        "hessian": lambda doc: np.testing.assert_allclose(
            doc["top_eigenvalue"]["max"], torch.linalg.eigvalsh(hessians)[:, -1].max().item(),
            rtol=1e-6)}
    runs = {"vjp": ["vjp", *base, "--vectors", str(tmp_path / "u.npy")],
            "hessian": ["hessian", *base, "--targets", str(tmp_path / "t.npy"), "--loss",
                        "cross-entropy", "--wrt", "inputs", "--top-k", "1"]}
    for name, args in runs.items():
        out = tmp_path / f"{name}.h5"
        run = runner.invoke(app, [*args, "--json", "-o", str(out)])
        assert run.exit_code == 0, run.output
        shown = runner.invoke(app, ["show", str(out), "--json"])
        assert shown.exit_code == 0, shown.output
        doc = json.loads(shown.stdout)
        jsonschema.validate(doc, json.loads(
            (SCHEMAS / f"{'products' if name == 'vjp' else name}-summary.schema.json"
             ).read_text()))
        assert doc == json.loads(run.stdout)
        reference[name](doc)
        table = runner.invoke(app, ["show", str(out)])
        assert table.exit_code == 0 and "upgrade" not in table.output
        assert table.stdout.startswith(f"jaccli {name}:"), table.stdout


def test_per_input_hessian_estimates_do_not_depend_on_the_batch_size(tmp_path):
    """`hessian --wrt inputs`: each sample's trace estimate comes from probes drawn from its
    index in the data, so --batch-size does not change it (an estimate from 4 probes, near
    the exact trace)."""
    model = small_model()
    spec = {"format": "jaccli-arch", "version": 1, "input_shape": [4],
            "model": {"type": "Sequential", "children": [
                {"type": "Linear", "args": [4, 6]}, {"type": "Tanh"},
                {"type": "Linear", "args": [6, 3]}]}}
    jaccli.save_model(model, spec, tmp_path / "m.safetensors")
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(5, 4)))
    t = torch.tensor([0, 1, 2, 0, 1])
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "t.npy", t.numpy())
    traces = {}
    for batch in (5, 2):
        out = tmp_path / f"h{batch}.h5"
        run = runner.invoke(app, ["hessian", str(tmp_path / "m.safetensors"),
                                  str(tmp_path / "x.npy"), "--dtype", "float64", "--targets",
                                  str(tmp_path / "t.npy"), "--loss", "cross-entropy", "--wrt",
                                  "inputs", "--top-k", "1", "--probes", "4", "--batch-size",
                                  str(batch), "-q", "-o", str(out)])
        assert run.exit_code == 0, run.output
        with h5py.File(out) as f:
            traces[batch] = f["hessian_results/hessian/trace"][:]
    np.testing.assert_allclose(traces[2], traces[5], rtol=1e-12)
    loss = per_sample_loss("cross-entropy")
    exact = torch.stack([torch.trace(torch.autograd.functional.hessian(
        lambda z, i=i: loss(model(z[None]), t[i:i + 1])[0], x[i])) for i in range(5)])
    assert not np.allclose(traces[5], exact.numpy(), rtol=1e-3)  # 4 probes: an estimate
    np.testing.assert_allclose(traces[5], exact.numpy(), atol=0.2)
