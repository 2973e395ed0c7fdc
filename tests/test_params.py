"""Per-sample parameter Jacobians and parameter JVP/VJP against float64 references."""

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import jaccli
from jaccli.params.jacobians import param_jacobians, param_jvp, param_vjp, select_params
from jaccli.params.objectives import objective
from jaccli.pipelines.compute import run_compute
from jaccli.settings import ComputeSettings

from .conftest import MLP_SPEC, TwoBranch

compute_settings = ComputeSettings.from_options


def loop_reference(model, x, fn, targets=None):
    """A per-sample loop of torch.autograd.grad: {name: (N, C, *shape)} or (N, *shape)."""
    result = {name: [] for name, _ in model.named_parameters()}
    for i in range(x.shape[0]):
        value = fn(model(x[i:i + 1]), None if targets is None else targets[i:i + 1])[0]
        rows = value.reshape(-1)
        for name, p in model.named_parameters():
            grads = torch.stack([torch.autograd.grad(rows[c], p, retain_graph=True,
                                                     allow_unused=True)[0]
                                 if p.requires_grad else torch.zeros_like(p)
                                 for c in range(rows.numel())])
            result[name].append(grads if value.ndim else grads[0])
    return {name: torch.stack(v) for name, v in result.items()}


def functorch_reference(model, x, fn):
    """torch.func per sample: vmap(jacrev(functional_call))."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def single(p, xi):
        return fn(torch.func.functional_call(model, p, (xi[None],)), None)[0]

    return torch.func.vmap(torch.func.jacrev(single), in_dims=(None, 0))(params, x)


MODELS = {
    "mlp": lambda: jaccli.build_model(MLP_SPEC),
    "cnn": lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.ReLU(),
                                 nn.Conv2d(3, 2, 2, dilation=1), nn.Tanh(), nn.Flatten(),
                                 nn.Linear(8, 3)),
    "layernorm+nested": lambda: nn.Sequential(nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5)),
                                              nn.Sequential(nn.GELU(), nn.Linear(5, 3))),
    "shared module": lambda: TwoBranch(),
}
INPUTS = {"mlp": (6,), "cnn": (2, 5, 5), "layernorm+nested": (6,), "shared module": (4,)}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("what", ["outputs", "index", "loss"])
def test_parameter_jacobians_match_loop_and_functorch(name, what):
    torch.manual_seed(0)
    model = MODELS[name]().double().eval()
    x = torch.randn(3, *INPUTS[name], dtype=torch.float64)
    n_out = model(x).shape[1]
    targets = torch.randint(0, n_out, (3,)) if what == "loss" else None
    fn = objective(output_index=1 if what == "index" else None,
                   loss="cross-entropy" if what == "loss" else None)
    got = param_jacobians(model, x, fn, targets)
    expected = loop_reference(model, x, fn, targets)
    for param, value in expected.items():
        torch.testing.assert_close(got[param], value, rtol=1e-10, atol=1e-12, msg=param)
    if what == "outputs":
        reference = functorch_reference(model, x, fn)
        for param, value in reference.items():
            torch.testing.assert_close(got[param], value, rtol=1e-10, atol=1e-12)
    structured = {p.name for p in select_params(model) if p.structured}
    assert structured >= {f"{n}.weight" for n, m in model.named_modules()
                          if type(m) is nn.Linear}


def test_param_selection_and_errors():
    model = jaccli.build_model(MLP_SPEC)
    assert [p.name for p in select_params(model, ["*.bias"])] == ["0.bias", "2.bias", "4.bias"]
    with pytest.raises(jaccli.JaccliError, match="matches no parameter"):
        select_params(model, ["conv*"])


def test_parameter_vjp_and_jvp_equal_contractions_of_the_jacobian():
    torch.manual_seed(1)
    model = MODELS["cnn"]().double().eval()
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    fn = objective()
    jac = param_jacobians(model, x, fn)
    u = torch.randn(4, 3, dtype=torch.float64)
    vjp = param_vjp(model, x, fn, u)
    for name, j in jac.items():
        torch.testing.assert_close(vjp[name], torch.einsum("nc,nc...->n...", u, j))
    tangents = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    expected = sum(torch.einsum("nc...,...->nc", jac[n], t) for n, t in tangents.items())
    torch.testing.assert_close(param_jvp(model, x, fn, tangents), expected)


def test_compute_wrt_params_writes_per_parameter_and_flattened(tmp_path, mlp):
    jaccli.save_model(mlp, MLP_SPEC, tmp_path / "m.safetensors")
    x = np.random.default_rng(0).normal(size=(7, 6))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.array([0, 1, 2, 0, 1, 2, 0]))
    run_compute(compute_settings(model=tmp_path / "m.safetensors", data=tmp_path / "x.npy",
                              output=tmp_path / "p.h5", dtype="float64", wrt=("params",),
                              loss="cross-entropy", targets=tmp_path / "y.npy", flatten=True,
                              batch_size=3, params=["2.*", "4.weight"]))
    model = mlp.double()
    fn = objective(loss="cross-entropy")
    expected = loop_reference(model, torch.from_numpy(x), fn, torch.tensor([0, 1, 2, 0, 1, 2, 0]))
    with h5py.File(tmp_path / "p.h5") as f:
        assert list(f["params"]) == ["2.weight", "2.bias", "4.weight", "(flattened)"]
        assert "end_to_end" not in f and "layers" not in f
        weight = f["params/2.weight"]
        assert list(weight.attrs["param_shape"]) == [4, 5]
        np.testing.assert_allclose(weight["jacobian"][:].reshape(7, 4, 5),
                                   expected["2.weight"].numpy(), rtol=1e-10)
        flat = f["params/(flattened)/jacobian"][:]
        assert flat.shape == (7, 1, 20 + 4 + 12)
        np.testing.assert_allclose(flat[:, 0, 24:], expected["4.weight"].reshape(7, -1),
                                   rtol=1e-10)


def test_targets_must_match_and_go_with_a_loss(tmp_path, mlp):
    jaccli.save_model(mlp, MLP_SPEC, tmp_path / "m.safetensors")
    np.save(tmp_path / "x.npy", np.zeros((5, 6)))
    np.save(tmp_path / "y.npy", np.zeros(4))
    base = {"model": tmp_path / "m.safetensors", "data": tmp_path / "x.npy"}
    with pytest.raises(jaccli.JaccliError, match="4 targets for 5 samples"):
        run_compute(compute_settings(**base, wrt=("params",), loss="mse",
                                  targets=tmp_path / "y.npy"))
    with pytest.raises(jaccli.JaccliError, match="--loss needs --targets"):
        run_compute(compute_settings(**base, wrt=("params",), loss="mse"))
    with pytest.raises(jaccli.JaccliError, match="go with --wrt params"):
        run_compute(compute_settings(**base, loss="mse"))


def test_cli_wrt_params_json_follows_the_schema(tmp_path, mlp):
    import json

    import jsonschema
    from typer.testing import CliRunner

    from jaccli.cli import app

    from .conftest import ROOT

    jaccli.save_model(mlp, MLP_SPEC, tmp_path / "m.safetensors")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(5, 6)))
    result = CliRunner().invoke(app, ["compute", str(tmp_path / "m.safetensors"),
                                      str(tmp_path / "x.npy"), "--wrt", "params", "--wrt",
                                      "inputs", "--params", "4.*", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    schema = json.loads((ROOT / "jaccli/schemas/compute-summary.schema.json").read_text())
    jsonschema.validate(doc, schema)
    params = [e for e in doc["entries"] if e["kind"] == "param"]
    assert [(e["name"], e["jacobian_shape"]) for e in params] == [
        ("4.weight", [5, 3, 12]), ("4.bias", [5, 3, 3])]
    assert any(e["kind"] == "end_to_end" for e in doc["entries"])


def test_agrees_with_backpack_batchgrad_when_installed():
    backpack = pytest.importorskip("backpack", reason="backpack-for-pytorch not installed")
    from backpack.extensions import BatchGrad

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    ours = param_jacobians(model, x, objective(loss="cross-entropy"), y)
    extended = backpack.extend(model)
    loss = backpack.extend(nn.CrossEntropyLoss(reduction="sum"))(extended(x), y)
    with backpack.backpack(BatchGrad()):
        loss.backward()
    for name, p in extended.named_parameters():
        torch.testing.assert_close(ours[name], p.grad_batch)
