"""What the terminal shows: infinite condition numbers as inf, exact ranges, the rank
tolerance stated and applied per method, tables that fit 80 and 100 columns."""

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import jaccli
from jaccli.cli import app

runner = CliRunner()
SPEC = {"format": "jaccli-arch", "version": 1, "model": {"type": "Sequential", "children": [
    {"type": "Flatten"}, {"type": "Linear", "args": [6, 6]}, {"type": "ReLU"}]}}


@pytest.fixture
def relu_files(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 6), nn.ReLU()).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(6))
        model[1].bias.copy_(torch.tensor([-10.0, 1, 1, 1, 1, 1]))  # unit 0 is always off
    jaccli.save_model(model, SPEC, tmp_path / "m.safetensors")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).uniform(-1, 1, (4, 2, 3)))
    return tmp_path


def spectrum_table(folder, width, *extra):
    result = runner.invoke(app, ["spectrum", str(folder / "m.safetensors"),
                                 str(folder / "x.npy"), *extra], env={"COLUMNS": str(width)})
    assert result.exit_code == 0, result.output
    return result.stdout


def row(table: str, name: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"│ {name} "))
    return [cell.strip() for cell in line.strip("│").split("│")]


def test_infinite_condition_and_exact_ranges(relu_files):
    table = spectrum_table(relu_files, 200)
    relu = row(table, "2")
    assert relu[5] == "inf"  # cond p50 of a ReLU with one unit always off
    assert relu[-1].endswith("[0, 1]")  # its singular values are exactly 0 and 1
    flatten = row(table, "0")
    assert flatten[5] == "1" and flatten[-1].endswith("[1, 1]")  # identity: all ones
    assert "count as zero (condition number inf): diagonal: σ_max·" in table


def test_small_diagonal_entries_are_not_rank_deficient(tmp_path):
    from jaccli.engine.structures import Diagonal
    from jaccli.spectra.exact import exact_spectrum
    from jaccli.spectra.quantities import all_quantities

    diag = torch.tensor([[1.0, 0.5, 1.5e-4, 2.0]] * 2 + [[1.0, 0.0, 0.5, 2.0]])
    spectrum = exact_spectrum(Diagonal(diag), 3)
    cond = all_quantities(spectrum.values, 4, 4, spectrum.method)["condition_number"]
    assert cond[0].item() == pytest.approx(2.0 / 1.5e-4, rel=1e-5)
    assert cond[2].item() == float("inf")  # an exact zero is a zero
    dense = torch.diag_embed(diag[:1].double()) * 3.0  # the same values through an SVD, D = 4
    assert all_quantities(torch.linalg.svdvals(dense), 4, 4)["condition_number"].item() == \
        pytest.approx(2.0 / 1.5e-4, rel=1e-6)


@pytest.mark.parametrize("width", [80, 100])
def test_tables_fit_narrow_terminals(relu_files, width):
    spectrum = spectrum_table(relu_files, width)
    compute = runner.invoke(app, ["compute", str(relu_files / "m.safetensors"),
                                  str(relu_files / "x.npy")], env={"COLUMNS": str(width)})
    for text in (spectrum, compute.stdout):
        table_lines = [line for line in text.splitlines() if line[:1] in "┏┃┡│└"]
        assert table_lines and max(len(line) for line in table_lines) <= width
    assert "not shown: singular values" in spectrum  # the first column to go, and said so
    assert row(spectrum, "2")[:2] == ["2", "diagonal"]


def test_json_writes_infinite_condition_numbers_as_inf(relu_files):
    """--json: an infinite statistic is the string "inf" (JSON has no Infinity; null stays
    for NaN, "no value"), in every document that carries it, and matches the schemas."""
    import json

    import jsonschema

    from .conftest import ROOT

    def strict(text):  # the standard: no NaN/Infinity tokens
        return json.loads(text, parse_constant=lambda token: pytest.fail(f"JSON has {token}"))

    x = torch.from_numpy(np.load(relu_files / "x.npy"))
    pre = x.reshape(4, 6) + torch.tensor([-10.0, 1, 1, 1, 1, 1])
    relu_jacobians = torch.diag_embed((pre > 0).double())  # float64 reference of layer 2
    assert torch.isinf(torch.linalg.cond(relu_jacobians)).all()
    out = relu_files / "s.h5"
    result = runner.invoke(app, ["spectrum", str(relu_files / "m.safetensors"),
                                 str(relu_files / "x.npy"), "--json", "-o", str(out)])
    assert result.exit_code == 0, result.output
    shown = runner.invoke(app, ["show", str(out), "--json"])
    gate = runner.invoke(app, ["check", str(out), "--max-cond", "1e6", "--json"])
    assert shown.exit_code == 0 and gate.exit_code == 1, gate.output
    schemas = ROOT / "jaccli" / "schemas"
    for text, schema in ((result.stdout, "spectrum-summary"), (shown.stdout, "spectrum-summary"),
                         (gate.stdout, "check-result")):
        doc = strict(text)
        jsonschema.validate(doc, json.loads((schemas / f"{schema}.schema.json").read_text()))
    entries = {e["name"]: e for e in strict(result.stdout)["entries"]}
    cond = entries["2"]["quantities"]["condition_number"]
    assert cond["mean"] == cond["min"] == cond["max"] == cond["p50"] == "inf"
    assert cond["n_nonfinite"] == 4
    assert entries["1"]["quantities"]["condition_number"]["max"] == pytest.approx(1.0)
    assert strict(shown.stdout)["entries"] == strict(result.stdout)["entries"]
    values = [v["value"] for v in strict(gate.stdout)["violations"]
              if v["quantity"] == "condition_number"]
    assert values and set(values) == {"inf"}, strict(gate.stdout)["violations"]
