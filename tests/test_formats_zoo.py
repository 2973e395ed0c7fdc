"""Real architectures through the command line, in every format a user ships: the same plan
(layers, rules, structures) and the same Jacobians (float64 autograd) from a state_dict with
--arch, a torch.export archive and a TorchScript file."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import jaccli
from jaccli.cli import app

from .conftest import reference_jacobian
from .graph.zoo import ZOO

runner = CliRunner()
FACTORIES = '''
import torch
from tests.graph.zoo import ZOO


def {name}():
    torch.manual_seed(0)
    return ZOO["{name}"]()[0]
'''


@pytest.fixture(scope="module", params=["resnet", "mtcnn"])
def formats(request, tmp_path_factory):
    """The zoo model `name` saved three ways, its input data and float64 reference."""
    name, folder = request.param, tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    model, shape = ZOO[name]()
    (folder / f"factories_{name}.py").write_text(FACTORIES.format(name=name))
    torch.save(model.state_dict(), folder / "weights.pt")
    example = torch.randn(2, *shape)
    program = torch.export.export(model, (example,),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, folder / "model.pt2")
    torch.jit.save(torch.jit.script(model), folder / "model.ts")
    x = np.random.default_rng(0).normal(size=(3, *shape))
    np.save(folder / "x.npy", x)
    files = {"state_dict": [folder / "weights.pt", "--arch", f"factories_{name}:{name}",
                            "--arch-path", folder],
             "pt2": [folder / "model.pt2"], "torchscript": [folder / "model.ts"]}
    model = model.double()

    def every_output(xb):  # jaccli's default: all outputs, flattened and concatenated
        out = model(xb)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return torch.cat([o.reshape(o.shape[0], -1) for o in outs], dim=1)

    return name, folder, files, reference_jacobian(every_output, torch.from_numpy(x))


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_every_format_plans_and_computes_the_same(formats):
    name, folder, files, expected = formats
    plans = {}
    for fmt, model in files.items():
        plan = json.loads(invoke("compute", *model, folder / "x.npy", "--dry-run",
                                 "--json").stdout)
        assert plan["engine"].startswith("graph"), (fmt, plan["engine_note"])
        plans[fmt] = [(e["name"], e["rule"], e["structure"]) for e in plan["entries"]]
        out = folder / f"{fmt}.h5"
        invoke("compute", *model, folder / "x.npy", "--dtype", "float64", "-q", "-o", out)
        with jaccli.open_results(out) as results:
            got = results.jacobian("end_to_end")
            error = np.abs(got - expected.numpy()).max() / np.abs(expected.numpy()).max()
            assert error < 1e-10, (fmt, error)
    assert plans["pt2"] == plans["state_dict"] == plans["torchscript"], plans
    generic = [entry for entry in plans["pt2"] if "generic" in entry[1]]
    assert not generic, generic


def test_residual_and_head_models_are_not_chains(formats):
    name, folder, files, _ = formats
    summary = json.loads(invoke("spectrum", *files["pt2"], folder / "x.npy", "--json",
                                "--no-profile").stdout)
    assert not summary["chain"] and summary["bounds"] is None  # no false Lipschitz bound
