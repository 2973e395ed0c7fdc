"""`jaccli spectrum`: from a model and data, and from a `compute` results file."""

import json

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import jaccli
from jaccli.cli import app
from jaccli.pipelines.spectrum import run_spectrum
from jaccli.settings import SpectrumSettings

from .conftest import CNN_SPEC, MLP_SPEC, reference_jacobian

spectrum_settings = SpectrumSettings.from_options

runner = CliRunner()


@pytest.fixture
def mlp_files(tmp_path, mlp):
    jaccli.save_model(mlp, MLP_SPEC, tmp_path / "mlp.safetensors")
    x = np.random.default_rng(3).normal(size=(9, 6))
    np.save(tmp_path / "x.npy", x)
    return tmp_path, torch.from_numpy(x)


def test_spectra_match_svdvals_of_reference_jacobians(mlp_files, mlp):
    d, x = mlp_files
    out = d / "spec.h5"
    summary = run_spectrum(spectrum_settings(model=d / "mlp.safetensors", data=d / "x.npy",
                                          output=out, dtype="float64", granularity="block",
                                          batch_size=4)).summary
    model = mlp.double()
    with h5py.File(out) as f:
        assert f.attrs["kind"] == "spectra"
        e2e = f["end_to_end/singular_values"][:]
        expected = torch.linalg.svdvals(reference_jacobian(model, x)).numpy()
        np.testing.assert_allclose(e2e, expected, rtol=1e-9)
        block = f["layers/0+1"]
        assert block.attrs["method"] == "gram" and bool(block.attrs["complete"])
        pre = x @ model[0].weight.detach().T + model[0].bias.detach()
        jac = (1 - torch.tanh(pre) ** 2)[:, :, None] * model[0].weight.detach()
        np.testing.assert_allclose(block["singular_values"][:], torch.linalg.svdvals(jac),
                                   rtol=1e-9)
        np.testing.assert_allclose(block["frobenius"][:], torch.linalg.matrix_norm(jac),
                                   rtol=1e-9)
        np.testing.assert_allclose(block["condition_number"][:], torch.linalg.cond(jac),
                                   rtol=1e-7)
        bounds = f["bounds"]
        assert (bounds["layer_product"][:] >= bounds["end_to_end"][:] * (1 - 1e-12)).all()
        np.testing.assert_allclose(bounds["end_to_end"][:], expected[:, 0], rtol=1e-9)
        profile = f["profile"]
        assert list(profile.attrs["layers"]) == ["0+1", "2+3", "4"]
        # The last cumulative Jacobian is the end-to-end one.
        np.testing.assert_allclose(profile["mean_sigma2"][-1], (expected**2).mean(),
                                   rtol=1e-9)
        np.testing.assert_allclose(profile["var_sigma2"][-1], (expected**2).var(), rtol=1e-7)
    row = {r["name"]: r for r in summary["entries"]}["(end-to-end)"]
    assert row["quantities"]["spectral_norm"]["max"] == pytest.approx(expected[:, 0].max())


def test_top_k_uses_lanczos_for_dense_jacobians_and_agrees(tmp_path):
    spec = {"input_shape": [40], "model": {"type": "Sequential", "children": [
        {"type": "Linear", "args": [40, 30]}, {"type": "Tanh"},
        {"type": "Linear", "args": [30, 20]}]}}
    model = jaccli.build_model(spec).eval()
    jaccli.save_model(model, spec, tmp_path / "m.safetensors")
    x = torch.randn(5, 40, dtype=torch.float64)
    np.save(tmp_path / "x.npy", x.numpy())
    summary = run_spectrum(spectrum_settings(model=tmp_path / "m.safetensors",
                                          data=tmp_path / "x.npy", dtype="float64", top_k=2,
                                          tol=1e-12, layers=["1"])).summary
    rows = {r["name"]: r for r in summary["entries"]}
    assert rows["1"]["method"] == "diagonal" and rows["1"]["k"] == 2
    e2e = rows["(end-to-end)"]
    assert e2e["method"] == "lanczos" and not e2e["complete"] and e2e["k"] == 2
    expected = torch.linalg.svdvals(reference_jacobian(model.double(), x))[:, 0]
    assert e2e["quantities"]["spectral_norm"]["max"] == pytest.approx(expected.max().item(),
                                                                      rel=1e-9)
    assert e2e["max_residual"] <= 1e-12
    frobenius = torch.linalg.matrix_norm(reference_jacobian(model.double(), x))
    assert e2e["quantities"]["frobenius"]["mean"] == pytest.approx(frobenius.mean().item(),
                                                                   rel=0.1)


def test_spectrum_from_a_results_file_equals_spectrum_from_the_model(tmp_path, cnn):
    jaccli.save_model(cnn, CNN_SPEC, tmp_path / "cnn.safetensors")
    np.save(tmp_path / "x.npy", np.random.default_rng(4).normal(size=(5, 2, 6, 6)))
    result = runner.invoke(app, ["compute", str(tmp_path / "cnn.safetensors"),
                                 str(tmp_path / "x.npy"), "--dtype", "float64", "-q",
                                 "--granularity", "block", "-o", str(tmp_path / "jac.h5")])
    assert result.exit_code == 0, result.output
    from_file = runner.invoke(app, ["spectrum", str(tmp_path / "jac.h5"), "--json",
                                    "-o", str(tmp_path / "a.h5")])
    from_model = runner.invoke(app, ["spectrum", str(tmp_path / "cnn.safetensors"),
                                     str(tmp_path / "x.npy"), "--dtype", "float64",
                                     "--granularity", "block", "--json",
                                     "-o", str(tmp_path / "b.h5")])
    assert from_file.exit_code == 0, from_file.output
    assert from_model.exit_code == 0, from_model.output
    a, b = json.loads(from_file.stdout), json.loads(from_model.stdout)
    assert [r["name"] for r in a["entries"]] == [r["name"] for r in b["entries"]]
    with h5py.File(tmp_path / "a.h5") as fa, h5py.File(tmp_path / "b.h5") as fb:
        for name in fa["layers"]:
            np.testing.assert_allclose(fa[f"layers/{name}/singular_values"][:],
                                       fb[f"layers/{name}/singular_values"][:], rtol=1e-8,
                                       atol=1e-10, err_msg=name)


def test_circular_conv_layer_uses_the_fft_method(tmp_path):
    spec = {"input_shape": [2, 5, 5], "model": {"type": "Sequential", "children": [
        {"type": "Conv2d", "args": [2, 3, 3],
         "kwargs": {"padding": 1, "padding_mode": "circular"}},
        {"type": "Tanh"}, {"type": "Flatten"}, {"type": "Linear", "args": [75, 2]}]}}
    model = jaccli.build_model(spec).eval()
    jaccli.save_model(model, spec, tmp_path / "m.safetensors")
    np.save(tmp_path / "x.npy", np.random.default_rng(5).normal(size=(3, 2, 5, 5)))
    summary = run_spectrum(spectrum_settings(model=tmp_path / "m.safetensors",
                                          data=tmp_path / "x.npy", dtype="float64")).summary
    conv = summary["entries"][0]
    assert conv["method"] == "fft" and conv["complete"]
    from jaccli.engine.rules.linear import linear_map_matrix

    expected = torch.linalg.svdvals(linear_map_matrix(model[0].double(),
                                                      torch.zeros(1, 2, 5, 5, dtype=torch.float64)))
    assert conv["quantities"]["spectral_norm"]["mean"] == pytest.approx(expected[0].item())
    assert conv["quantities"]["nuclear"]["mean"] == pytest.approx(expected.sum().item())


def test_cli_spectrum_json_table_and_errors(mlp_files, tmp_path):
    d, _ = mlp_files
    table = runner.invoke(app, ["spectrum", str(d / "mlp.safetensors"), str(d / "x.npy")])
    assert table.exit_code == 0, table.output
    assert "σ_max" in table.stdout and "dynamical isometry" in table.stdout
    doc = json.loads(runner.invoke(app, ["spectrum", str(d / "mlp.safetensors"),
                                         str(d / "x.npy"), "--json"]).stdout)
    assert doc["command"] == "spectrum" and len(doc["entries"]) == 6
    assert doc["bounds"]["ratio"]["min"] >= 1 - 1e-6
    missing = runner.invoke(app, ["spectrum", str(d / "mlp.safetensors")])
    assert missing.exit_code == 2 and "DATA" in missing.stderr
    runner.invoke(app, ["compute", str(d / "mlp.safetensors"), str(d / "x.npy"), "-q",
                        "-o", str(d / "jac.h5")])
    extra = runner.invoke(app, ["spectrum", str(d / "jac.h5"), str(d / "x.npy")])
    assert extra.exit_code == 2 and "drop DATA" in extra.stderr
    spectra_file = runner.invoke(app, ["spectrum", str(d / "jac.h5"), "-q",
                                       "-o", str(d / "s.h5")])
    assert spectra_file.exit_code == 0
    again = runner.invoke(app, ["spectrum", str(d / "s.h5")])
    assert again.exit_code == 2 and "not Jacobians" in again.stderr


def test_plot_writes_pngs_or_explains_the_missing_extra(mlp_files, tmp_path):
    d, _ = mlp_files
    result = runner.invoke(app, ["spectrum", str(d / "mlp.safetensors"), str(d / "x.npy"),
                                 "--plot", str(tmp_path / "plots"), "-q"])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert result.exit_code == 1 and "pip install 'jaccli[plot]'" in result.stderr
    else:
        assert result.exit_code == 0, result.output
        names = sorted(p.name for p in (tmp_path / "plots").iterdir())
        assert "depth_profile.png" in names and "00_0.png" in names


def test_non_chain_model_has_no_profile_or_bounds(tmp_path):
    from .conftest import TwoBranch

    model = TwoBranch().eval()
    x = torch.randn(4, 4)
    from jaccli.settings import SpectrumSettings as Config

    torch.save(model.state_dict(), tmp_path / "m.pt")
    (tmp_path / "arch").mkdir()
    (tmp_path / "arch" / "twobranch.py").write_text(
        "import torch.nn as nn\nfrom tests.conftest import TwoBranch\n")
    np.save(tmp_path / "x.npy", x.numpy())
    summary = run_spectrum(Config.from_options(model=tmp_path / "m.pt", data=tmp_path / "x.npy",
                                  arch="tests.conftest:TwoBranch")).summary
    assert summary["profile"] == [] and summary["bounds"] is None
    assert "not a chain" in summary["profile_note"] or summary["profile_note"] == ""
    assert nn is not None


def test_planner_sends_a_conv_too_large_to_decompose_to_lanczos():
    from jaccli.graph import capture
    from jaccli.pipelines.engines import GraphRun
    from jaccli.spectra.plan import plan_spectra

    def entries(model, x):
        run = GraphRun(capture(model, x), granularity="module", patterns=None,
                       include_layers=True, end_to_end=False, module=model)
        return plan_spectra(run.entries, itemsize=4, budget=4 * 2**30, top_k=None,
                            exact=False)

    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU()).eval()
    x = torch.zeros(2, 64, 32, 32)
    conv, relu = entries(model, x)
    assert conv.method == "lanczos" and "too large" in conv.reason and conv.k == 10
    assert relu.method == "structured" and relu.complete
    circular = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, padding_mode="circular")).eval()
    (entry,) = entries(circular, x)
    assert entry.method == "fft" and entry.complete


def test_estimates_of_a_sample_do_not_depend_on_its_batch(tmp_path):
    """A sample's Lanczos start block and Hutch++ probes are drawn from its index in the data:
    its Frobenius estimate is the same with any batch size and offset, and near the truth."""
    spec = {"input_shape": [40], "model": {"type": "Sequential", "children": [
        {"type": "Linear", "args": [40, 30]}, {"type": "Tanh"},
        {"type": "Linear", "args": [30, 20]}]}}
    model = jaccli.build_model(spec).eval()
    jaccli.save_model(model, spec, tmp_path / "m.safetensors")
    x = torch.randn(6, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    np.save(tmp_path / "x.npy", x.numpy())
    per_sample = {}
    for batch, offset in ((6, 0), (4, 0), (1, 0), (2, 2)):
        out = tmp_path / f"s{batch}_{offset}.h5"
        run_spectrum(spectrum_settings(model=tmp_path / "m.safetensors", output=out,
                                       data=tmp_path / "x.npy", dtype="float64", top_k=2,
                                       tol=1e-12, layers=["1"], batch_size=batch,
                                       offset=offset))
        with h5py.File(out) as f:
            assert f["end_to_end"].attrs["method"] == "lanczos"
            per_sample[batch, offset] = f["end_to_end/frobenius"][:]
    # equal up to the rounding of batched products (a new draw would move them by ~1e-2)
    np.testing.assert_allclose(per_sample[4, 0], per_sample[6, 0], rtol=1e-13)
    np.testing.assert_allclose(per_sample[1, 0], per_sample[6, 0], rtol=1e-13)
    np.testing.assert_allclose(per_sample[2, 2], per_sample[6, 0][2:], rtol=1e-13)
    truth = torch.linalg.matrix_norm(reference_jacobian(model.double(), x)).numpy()
    np.testing.assert_allclose(per_sample[6, 0], truth, rtol=0.15)
