"""`jaccli ntk` end to end: the kernel read back from the HDF5 file against the independent
float64 reference (per-sample torch.func jacrev of all parameters, contracted), in every
mode, blocked by a tiny memory budget, from .pt2 and TorchScript files; bad input."""

import json

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import jaccli
from jaccli.cli import app

from .conftest import CNN_SPEC, MLP_SPEC, randomized
from .ntk_reference import AllOutputs, reference_layer_ntk, reference_ntk

runner = CliRunner()
TOL = {"rtol": 1e-9, "atol": 1e-10}
SPECS = {"mlp": MLP_SPEC, "cnn": CNN_SPEC}


def invoke(*args):
    result = runner.invoke(app, ["ntk", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result


def refused(*args, code):
    result = runner.invoke(app, ["ntk", *map(str, args)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == code, result.output
    assert len(lines) == 1 and lines[0].startswith("jaccli: error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module", params=sorted(SPECS))
def case(request, tmp_path_factory):
    """A seeded model saved as self-describing safetensors, .pt2 and TorchScript; X (5
    samples) and X2 (3 samples) as .npy; the float64 model for the reference."""
    name, folder = request.param, tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    spec = SPECS[name]
    model = randomized(jaccli.build_model(spec))
    shape = tuple(spec["input_shape"])
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(5, *shape)), rng.normal(size=(3, *shape))
    np.save(folder / "x.npy", x)
    np.save(folder / "y.npy", y)
    jaccli.save_model(model, spec, folder / "model.safetensors")
    program = torch.export.export(model, (torch.randn(2, *shape),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, folder / "model.pt2")
    torch.jit.save(torch.jit.script(model), folder / "model.ts")
    return name, folder, model.double(), torch.from_numpy(x), torch.from_numpy(y)


def kernel(path, dataset="ntk/kernel"):
    with h5py.File(path, "r") as f:
        return torch.from_numpy(np.asarray(f[dataset]))


def summary_of(result):
    return json.loads(result.stdout)


def test_full_kernel_and_per_layer_parts_match_the_reference(case, tmp_path):
    _, folder, model, x, _ = case
    out = tmp_path / "ntk.h5"
    summary = summary_of(invoke(folder / "model.safetensors", folder / "x.npy", "--dtype",
                                "float64", "--per-layer", "--json", "-o", out))
    expected = reference_ntk(model, x)
    theta = kernel(out)
    torch.testing.assert_close(theta, expected, **TOL)
    layers = reference_layer_ntk(model, x)
    with h5py.File(out, "r") as f:
        assert f.attrs["kind"] == "ntk" and f["ntk"].attrs["mode"] == "full"
        assert f["ntk"].attrs["per_layer"] and f["ntk"].attrs["dtype"] == "float64"
        stored = sorted(f["ntk/layers"])
    assert stored == sorted(layers)
    for layer, part in layers.items():
        torch.testing.assert_close(kernel(out, f"ntk/layers/{layer}/kernel"), part, **TOL)
    total = sum(kernel(out, f"ntk/layers/{layer}/kernel") for layer in stored)
    torch.testing.assert_close(total, theta, **TOL)
    trace = float(torch.einsum("nncc->", expected))
    assert summary["trace"] == pytest.approx(trace, rel=1e-10)
    shares = {r["layer"]: r["share"] for r in summary["layers"]}
    for layer, part in layers.items():
        assert shares[layer] == pytest.approx(float(torch.einsum("nncc->", part)) / trace,
                                              rel=1e-9)


def test_stored_kernel_is_symmetric_positive_semidefinite(case, tmp_path):
    _, folder, _, _, _ = case
    out = tmp_path / "ntk.h5"
    invoke(folder / "model.safetensors", folder / "x.npy", "--dtype", "float64", "-q",
           "--batch-size", "2", "-o", out)  # mirrored off-diagonal blocks
    theta = kernel(out)
    n, _, c, _ = theta.shape
    matrix = theta.permute(0, 2, 1, 3).reshape(n * c, n * c)
    torch.testing.assert_close(matrix, matrix.T, rtol=1e-12, atol=1e-12)
    eigenvalues = torch.linalg.eigvalsh(matrix)
    assert eigenvalues.min() >= -1e-10 * eigenvalues.abs().max()


def test_trace_diagonal_and_cross_kernels(case, tmp_path):
    _, folder, model, x, y = case
    expected, cross = reference_ntk(model, x), reference_ntk(model, x, y)
    runs = {"trace": ("--trace",), "diagonal": ("--diagonal",), "cross": (folder / "y.npy",),
            "cross-trace": (folder / "y.npy", "--trace")}
    wanted = {"trace": torch.einsum("nmcc->nm", expected),
              "diagonal": torch.einsum("nncd->ncd", expected), "cross": cross,
              "cross-trace": torch.einsum("nmcc->nm", cross)}
    for name, extra in runs.items():
        out = tmp_path / f"{name}.h5"
        data = (folder / "x.npy", *extra[:1]) if name.startswith("cross") else (
            folder / "x.npy",)
        flags = extra[1:] if name.startswith("cross") else extra
        invoke(folder / "model.safetensors", *data, *flags, "--dtype", "float64", "-q",
               "-o", out)
        torch.testing.assert_close(kernel(out), wanted[name], **TOL, msg=name)
    with h5py.File(tmp_path / "cross.h5", "r") as f:
        assert f["ntk"].attrs["cross"] and not f["ntk"].attrs["symmetric"]
        assert list(f["samples/index2"]) == [0, 1, 2]


def budget_for(plan: dict) -> int:
    """The smallest --max-memory (bytes) whose terms hold `plan`'s blocks: on CPU the
    allocator's reserve is `RESERVE` of the budget, on top of the other terms."""
    from jaccli.pipelines.planner import RESERVE

    held = sum(t["bytes"] for t in plan["memory_terms"]
               if "reserve" not in t["name"] and "cached" not in t["name"])
    return int(held / (1 - RESERVE)) + 16


@pytest.mark.parametrize("extra", [(), ("--trace",), ("--diagonal",), ("Y",),
                                   ("Y", "--trace")], ids=str)
def test_a_tiny_memory_budget_uses_many_blocks_and_the_same_kernel(case, tmp_path, extra):
    _, folder, model, x, y = case
    args = [folder / "y.npy" if a == "Y" else a for a in extra]
    out = tmp_path / "ntk.h5"
    common = (folder / "model.safetensors", folder / "x.npy", *args, "--dtype", "float64",
              "--per-layer", "--json")
    two = summary_of(invoke(*common, "--dry-run", "--batch-size", "2"))
    summary = summary_of(invoke(*common, "--max-memory", budget_for(two), "-o", out))
    assert summary["block_size"] == 2 and summary["blocks"] > 2, summary
    second = y if "Y" in extra else None
    wanted = {"(total)": reference_ntk(model, x, second),
              **reference_layer_ntk(model, x, second)}
    for layer, expected in wanted.items():
        if "--trace" in extra:
            expected = torch.einsum("nmcc->nm", expected)
        if "--diagonal" in extra:
            expected = torch.einsum("nncd->ncd", expected)
        stored = "ntk/kernel" if layer == "(total)" else f"ntk/layers/{layer}/kernel"
        torch.testing.assert_close(kernel(out, stored), expected, **TOL, msg=layer)


def test_spectrum_matches_numpy_eigvalsh_of_the_reference(case, tmp_path):
    _, folder, model, x, _ = case
    out = tmp_path / "ntk.h5"
    summary = summary_of(invoke(folder / "model.safetensors", folder / "x.npy", "--dtype",
                                "float64", "--spectrum", "--top-k", "4", "--max-memory",
                                "64KiB", "--json", "-o", out))
    theta = reference_ntk(model, x)
    n, _, c, _ = theta.shape
    values = np.linalg.eigvalsh(theta.permute(0, 2, 1, 3).reshape(n * c, n * c).numpy())
    values = values[::-1]
    spectrum = summary["spectrum"]
    np.testing.assert_allclose(spectrum["top_eigenvalues"], values[:4], rtol=1e-9)
    assert spectrum["lambda_max"] == pytest.approx(values[0], rel=1e-9)
    scale = values[0]
    assert abs(spectrum["lambda_min"] - values[-1]) < 1e-9 * scale
    if values[-1] > 1e-6 * scale:
        assert spectrum["condition"] == pytest.approx(values[0] / values[-1], rel=1e-6)
    p = np.clip(values, 0, None) / np.clip(values, 0, None).sum()
    p = p[p > 0]
    assert spectrum["effective_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()),
                                                       rel=1e-8)
    with h5py.File(out, "r") as f:
        np.testing.assert_allclose(f["ntk/spectrum/eigenvalues"][:], values, rtol=1e-8,
                                   atol=1e-9 * scale)


@pytest.mark.parametrize("fmt", ["model.pt2", "model.ts"])
def test_exported_and_torchscript_files_give_the_reference_kernel(case, tmp_path, fmt):
    _, folder, model, x, y = case
    out = tmp_path / "ntk.h5"
    summary = summary_of(invoke(folder / fmt, folder / "x.npy", folder / "y.npy", "--dtype",
                                "float64", "--json", "-o", out))
    assert summary["engine"].startswith("graph"), summary["engine"]
    torch.testing.assert_close(kernel(out), reference_ntk(model, x, y), **TOL)


def test_dry_run_prints_the_routes_and_the_cost_model(case, tmp_path):
    name, folder, _, _, _ = case
    out = tmp_path / "ntk.h5"
    plan = summary_of(invoke(folder / "model.safetensors", folder / "x.npy", "--dry-run",
                             "--json", "-o", out))
    assert not out.exists()
    routes = {p["name"]: p["route"] for p in plan["params"]}
    assert all(routes[k] == "gram" for k in routes if k.endswith("weight")
               and ("head" in k or name == "mlp")), routes
    if name == "cnn":
        assert routes["features.0.weight"] == "jacobian"  # conv: closed-form per-sample VJP
        assert routes["features.1.weight"] == "jacobian"  # eval BatchNorm: closed form
    c = 3
    assert plan["kernel_shape"] == [5, 5, c, c] and plan["block_size"] == 5
    assert plan["pairs"] == 25 and plan["blocks"] == 1  # one block: all pairs at once
    assert plan["kernel_bytes"] == 5 * 5 * c * c * 4
    assert plan["multiply_adds"] == pytest.approx(
        25 * sum(p["pair_multiply_adds"] for p in plan["params"]))
    blocked = summary_of(invoke(folder / "model.safetensors", folder / "x.npy", "--dry-run",
                                "--json", "--batch-size", "2"))
    assert blocked["blocks"] == 6 and blocked["pairs"] == 4 + 4 + 2 + 4 + 2 + 1
    # a linear weight W (o, i) with one position: i + C²·o multiply-adds per pair
    first = next(p for p in plan["params"] if p["route"] == "gram")
    o, i = first["shape"]
    assert first["pair_multiply_adds"] == i + c * c * o
    text = invoke(folder / "model.safetensors", folder / "x.npy", "--dry-run").stdout
    assert "multiply-adds" in text and "gram" in text and "blocks of 5 samples" in text


def test_show_summarises_an_ntk_file(case, tmp_path):
    _, folder, _, _, _ = case
    out = tmp_path / "ntk.h5"
    made = summary_of(invoke(folder / "model.safetensors", folder / "x.npy", "--dtype",
                             "float64", "--per-layer", "--spectrum", "--json", "-o", out))
    shown = runner.invoke(app, ["show", str(out), "--json"])
    assert shown.exit_code == 0, shown.output
    read = json.loads(shown.stdout)
    for key in ("mode", "trace", "kernel_shape", "n_outputs", "layers", "routes", "cross"):
        assert read[key] == made[key], key
    assert read["spectrum"]["top_eigenvalues"] == made["spectrum"]["top_eigenvalues"]
    text = runner.invoke(app, ["show", str(out)]).stdout
    assert "share of the trace by layer" in text and "condition number" in text
    line = runner.invoke(app, ["show", str(out), "--layer", "x", "--sample", "0"])
    assert line.exit_code == 1 and "holds ntk results" in line.stderr


def test_bad_input_is_refused_in_one_line_without_an_output_file(case, tmp_path):
    _, folder, _, _, _ = case
    out = tmp_path / "ntk.h5"
    model, x = folder / "model.safetensors", folder / "x.npy"
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((2, 7)))
    assert "DATA2 samples have shape (7,)" in refused(model, x, wrong, "-o", out, code=1)
    assert "cross kernel" in refused(model, x, folder / "y.npy", "--spectrum", "-o", out,
                                     code=2)
    assert "exclude each other" in refused(model, x, "--trace", "--diagonal", "-o", out,
                                           code=2)
    assert "drop --trace" in refused(model, x, "--trace", "--spectrum", "-o", out, code=2)
    line = refused(model, x, "--spectrum", "--max-memory", "1KiB", "-o", out, code=1)
    assert "the spectrum's 15×15 kernel matrix" in line and "need 3.5 KiB" in line
    assert "more than the memory budget (1.0 KiB, --max-memory)" in line and "--limit" in line
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))


def test_a_budget_below_one_sample_is_refused_as_compute_refuses(case, tmp_path):
    """Where not even one sample's block fits, ntk refuses (naming the term and its size) as
    compute does on the same budget; the smallest budget that holds it runs in blocks of 1;
    a --batch-size over the budget is refused with the one that fits."""
    _, folder, model, x, _ = case
    out = tmp_path / "ntk.h5"
    args = (folder / "model.safetensors", folder / "x.npy", "--dtype", "float64")
    one = summary_of(invoke(*args, "--dry-run", "--batch-size", "1", "--json"))
    from jaccli.pipelines.planner import RESERVE
    from jaccli.units import format_bytes

    terms = {t["name"]: t["bytes"] for t in one["memory_terms"]
             if "reserve" not in t["name"] and "cached" not in t["name"]}
    enough = budget_for(one)
    name, largest = max(terms.items(), key=lambda kv: kv[1])
    below = int((sum(terms.values()) - largest / 2) / (1 - RESERVE))  # half of it is over
    line = refused(*args, "--max-memory", below, "-o", out, code=1)
    assert line.startswith(f"jaccli: error: one sample's {name.removeprefix('the ')}"), line
    assert f"need {format_bytes(largest)}" in line, line
    assert f"more than the memory budget ({format_bytes(below)}, --max-memory)" in line
    assert not out.exists()
    compute = runner.invoke(app, ["compute", *map(str, args), "--wrt", "params",
                                  "--max-memory", "1KiB", "-o", str(out)])
    assert compute.exit_code == 1 and "one sample's" in compute.stderr
    line = refused(*args, "--max-memory", "1KiB", "-o", out, code=1)
    assert "one sample's" in line and "(1.0 KiB, --max-memory) allows" in line
    summary = summary_of(invoke(*args, "--max-memory", enough, "--json", "-o", out))
    assert summary["block_size"] == 1 and summary["blocks"] == 15
    torch.testing.assert_close(kernel(out), reference_ntk(model, x), **TOL)
    line = refused(*args, "--max-memory", enough, "--batch-size", "4", code=1)
    assert "blocks of 4 samples need" in line and "use --batch-size 1 or less" in line


def test_json_documents_match_the_schemas_and_show_needs_no_torch(case, tmp_path):
    import subprocess
    import sys

    import jsonschema

    from .conftest import ROOT

    _, folder, _, _, _ = case
    out = tmp_path / "ntk.h5"
    args = (folder / "model.safetensors", folder / "x.npy", "--per-layer", "--json")
    for document, schema in (
            (summary_of(invoke(*args, "--spectrum", "-o", out)), "ntk-summary"),
            (summary_of(invoke(*args, "--dry-run")), "ntk-plan"),
            (json.loads(runner.invoke(app, ["show", str(out), "--json"]).stdout),
             "ntk-summary")):
        jsonschema.validate(document, json.loads(
            (ROOT / "jaccli" / "schemas" / f"{schema}.schema.json").read_text()))
    # The command ends its own process (exit handlers run, then os._exit), so the
    # probe reports from an exit handler.
    probe = ("import atexit, sys, runpy\nsys.argv = ['jaccli', 'show', sys.argv[1]]\n"
             "atexit.register(lambda: print('TORCH' if 'torch' in sys.modules else 'NO-TORCH',"
             " file=sys.stderr))\nrunpy.run_module('jaccli', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", probe, str(out)], capture_output=True,
                            cwd=ROOT)
    assert result.returncode == 0 and b"trace" in result.stdout, result.stderr[-300:]
    assert result.stderr.strip().endswith(b"NO-TORCH"), result.stderr[-300:]


@pytest.mark.parametrize("fmt", ["pt2", "ts"])
def test_a_residual_network_from_deployable_files_gives_the_reference_kernel(tmp_path, fmt):
    """A ResNet of basic blocks (`out += identity`, BatchNorm in eval) from `.pt2` and
    TorchScript, float64, against the per-sample jacrev reference of the eager module."""
    from .graph.zoo import resnet

    torch.manual_seed(3)
    model, shape = resnet()
    x = torch.from_numpy(np.random.default_rng(4).normal(size=(3, *shape)))
    np.save(tmp_path / "x.npy", x.numpy())
    path = tmp_path / f"model.{fmt}"
    if fmt == "pt2":
        program = torch.export.export(model, (torch.randn(2, *shape),),
                                      dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(program, path)
    else:
        torch.jit.save(torch.jit.script(model), str(path))
    out = tmp_path / "ntk.h5"
    summary = summary_of(invoke(path, tmp_path / "x.npy", "--dtype", "float64", "--json",
                                "-o", out))
    assert summary["engine"].startswith("graph"), summary["engine"]
    torch.testing.assert_close(kernel(out), reference_ntk(model.double(), x), **TOL)


class _OneHead(torch.nn.Module):
    """The reference's view of one head of a two-head model: `(N, C_head)`."""

    def __init__(self, model, head: int):
        super().__init__()
        self.model, self.head = model, head

    def forward(self, x):
        return self.model(x)[self.head].flatten(1)


@pytest.fixture(scope="module")
def two_heads(tmp_path_factory):
    """MTCNN-style O-Net (PReLU convs, a softmax head `0` and a box head `1`) as `.pt2`,
    X (3 samples), the float64 eager model for the reference."""
    from .graph.zoo import mtcnn

    folder = tmp_path_factory.mktemp("two_heads")
    torch.manual_seed(5)
    model, shape = mtcnn()
    x = torch.from_numpy(np.random.default_rng(6).normal(size=(3, *shape)))
    np.save(folder / "x.npy", x.numpy())
    program = torch.export.export(model, (torch.randn(2, *shape),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, folder / "model.pt2")
    return folder, model.double(), x


def test_a_two_head_network_from_pt2_gives_the_kernel_of_both_heads(two_heads, tmp_path):
    """By default the kernel's C = 6 outputs are both heads, flattened in order, and the
    summary says so."""
    folder, model, x = two_heads
    out = tmp_path / "ntk.h5"
    summary = summary_of(invoke(folder / "model.pt2", folder / "x.npy", "--dtype", "float64",
                                "--json", "-o", out))
    assert summary["n_outputs"] == 6
    assert summary["model_output"].startswith("all 2 outputs (0, 1), flattened"), summary
    torch.testing.assert_close(kernel(out), reference_ntk(AllOutputs(model), x), **TOL)


@pytest.mark.parametrize(("choice", "head", "c"), [("0", 0, 2), ("1", 1, 4)])
def test_model_output_gives_the_kernel_of_the_chosen_head(two_heads, tmp_path, choice, head,
                                                          c):
    """`--model-output` (as for compute): Θ of that head alone, C = its entries, against
    the float64 jacrev contraction of that head (parameters of the other head add 0)."""
    folder, model, x = two_heads
    out = tmp_path / "ntk.h5"
    summary = summary_of(invoke(folder / "model.pt2", folder / "x.npy", "--model-output",
                                choice, "--dtype", "float64", "--per-layer", "--json",
                                "-o", out))
    assert summary["n_outputs"] == c and summary["kernel_shape"] == [3, 3, c, c]
    assert summary["model_output"] == f"{head} (of the model's 2 outputs 0, 1)"
    one = _OneHead(model, head)
    torch.testing.assert_close(kernel(out), reference_ntk(one, x), **TOL)
    for layer, part in reference_layer_ntk(one, x).items():  # layers of one.model
        name = layer.removeprefix("model.")
        torch.testing.assert_close(kernel(out, f"ntk/layers/{name}/kernel"), part, **TOL,
                                   msg=name)
    with h5py.File(out, "r") as f:
        assert f["ntk"].attrs["model_output"] == summary["model_output"]
    text = invoke(folder / "model.pt2", folder / "x.npy", "--model-output", choice,
                  "--dry-run").stdout
    assert f"output: {head} (of the model's 2 outputs 0, 1), {c} values" in text


def test_an_unknown_model_output_is_refused(two_heads, tmp_path):
    folder, _, _ = two_heads
    line = refused(folder / "model.pt2", folder / "x.npy", "--model-output", "box", "-o",
                   tmp_path / "ntk.h5", code=2)
    assert "no output 'box'" in line and "0, 1" in line
    assert not (tmp_path / "ntk.h5").exists()
