"""Models whose forward takes several arguments: `--input NAME=FILE[:KEY]`, `--const
NAME=VALUE`, `--wrt NAME`. Jacobians w.r.t. the chosen input, the others held fixed, match
float64 autograd per sample (torch.autograd.functional.jacobian) for eager (state_dict +
--arch), `.pt2` and TorchScript models; bad calls fail in one line with no output file."""

import json
import linecache

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import jaccli
from jaccli.cli import app

runner = CliRunner()
FACTORIES_NAME = "<test_model_inputs factories>"
FACTORIES = '''
import torch
from torch import nn


class Gated(nn.Module):
    """forward(x (B, 5), y (B, 3)) -> (B, 2): a product of the two branches, gated."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 4)
        self.b = nn.Linear(3, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x, y):
        return self.out(torch.tanh(self.a(x)) * torch.sigmoid(self.b(y)) + 0.1 * self.b(y))


class Scaled(nn.Module):
    """forward(x (B, 4), shift (4,), scale: float, square: bool = False) -> (B, 3)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, shift, scale: float, square: bool = False):
        h = torch.tanh(self.fc(x + shift)) * scale
        return h * h if square else h


class Tokens(nn.Module):
    """forward(x (B, 4), ids (B, 3) int64) -> (B, 2): an embedding of ids gates x."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x, ids):
        return self.fc(torch.tanh(x * self.embed(ids).mean(1)))


class Rate(nn.Module):
    """forward(x (B, 6), sr: int) like silero-vad: the branch depends on the constant."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x, sr: int):
        if sr == 16000:
            return torch.tanh(self.fc(x))
        return self.fc(x) * 2.0


def gated():
    torch.manual_seed(0)
    return Gated()


def scaled():
    torch.manual_seed(1)
    return Scaled()


def tokens():
    torch.manual_seed(2)
    return Tokens()


def rate():
    torch.manual_seed(3)
    return Rate()
'''
N = 5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "input_factories.py").write_text(FACTORIES)
    rng = np.random.default_rng(0)
    np.save(folder / "x.npy", rng.normal(size=(N, 5)))
    np.savez(folder / "more.npz", y=rng.normal(size=(N, 3)), other=rng.normal(size=(N, 2)))
    np.save(folder / "y_short.npy", rng.normal(size=(N - 1, 3)))
    np.save(folder / "x4.npy", rng.normal(size=(N, 4)))
    np.save(folder / "x6.npy", rng.normal(size=(N, 6)))
    np.save(folder / "shift.npy", rng.normal(size=(4,)))
    np.save(folder / "ids.npy", rng.integers(0, 7, size=(N, 3)))
    return folder


def _model(name):
    # TorchScript reads a module's source through linecache: register it there, so scripting
    # works in a process that never imported the written factories file.
    linecache.cache[FACTORIES_NAME] = (len(FACTORIES), None, FACTORIES.splitlines(True),
                                       FACTORIES_NAME)
    namespace = {}
    exec(compile(FACTORIES, FACTORIES_NAME, "exec"), namespace)  # noqa: S102
    return namespace[name]().eval()


def _source(folder, name, fmt, example):
    """The model file in `fmt` and the options that load it."""
    model = _model(name)
    if fmt == "state_dict":
        torch.save(model.state_dict(), folder / f"{name}.pt")
        return [folder / f"{name}.pt", "--arch", f"input_factories:{name}", "--arch-path",
                folder]
    if fmt == "pt2":
        batch = torch.export.Dim("batch")
        program = torch.export.export(model, example,
                                      dynamic_shapes=tuple({0: batch} for _ in example))
        torch.export.save(program, folder / f"{name}.pt2")
        return [folder / f"{name}.pt2"]
    torch.jit.save(torch.jit.script(model), folder / f"{name}.ts")
    return [folder / f"{name}.ts"]


def _reference(fn, inputs, wrt: int) -> np.ndarray:
    """(N, D_out, D_in) Jacobians of fn(*inputs) w.r.t. inputs[wrt], per sample, float64."""
    out = []
    for i in range(inputs[wrt].shape[0]):
        rows = [t[i:i + 1] for t in inputs]

        def one(v, rows=rows):
            args = list(rows)
            args[wrt] = v[None]
            return fn(*args)[0]

        jac = torch.autograd.functional.jacobian(one, rows[wrt][0])
        out.append(jac.reshape(-1, rows[wrt][0].numel()).numpy())
    return np.stack(out)


def _run(args):
    return runner.invoke(app, [str(a) for a in args])


def _end_to_end(path):
    with jaccli.open_results(path) as results:
        return results.jacobian("end_to_end")


@pytest.mark.parametrize("fmt", ["state_dict", "pt2", "torchscript"])
@pytest.mark.parametrize("wrt", [None, "x", "y", "1"])
def test_two_inputs_match_autograd_wrt_either(folder, fmt, wrt):
    x = torch.from_numpy(np.load(folder / "x.npy"))
    y = torch.from_numpy(np.load(folder / "more.npz")["y"])
    source = _source(folder, "gated", fmt, (x[:2].float(), y[:2].float()))
    out = folder / f"gated_{fmt}_{wrt}.h5"
    result = _run(["compute", *source, folder / "x.npy", "--input",
                   f"y={folder / 'more.npz'}:y", *(["--wrt", wrt] if wrt else []),
                   "--dtype", "float64", "-q", "-o", out])
    assert result.exit_code == 0, result.output
    position = 1 if wrt in ("y", "1") else 0
    expected = _reference(_model("gated").double(), [x, y], position)
    got = _end_to_end(out)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-12 * max(1.0, np.abs(expected).max())
    with h5py.File(out) as f:
        record = json.loads(f.attrs["model_inputs"])
        assert f.attrs["wrt_input"] == ("y" if position else "x")
    assert record["arguments"] == ["x", "y"]
    assert record["inputs"]["y"] == {"path": str(folder / "more.npz"), "key": "y",
                                     "held": not position}
    assert record["inputs"]["x"]["held"] is bool(position)


def test_per_layer_jacobians_are_those_on_the_differentiated_path(folder):
    """w.r.t. y, both calls of layer b have its weight as Jacobian, and layer a (reading x
    only) is absent."""
    source = _source(folder, "gated", "state_dict", None)
    out = folder / "layers.h5"
    result = _run(["compute", *source, folder / "x.npy", "--input",
                   f"y={folder / 'more.npz'}:y", "--wrt", "y", "--dtype", "float64",
                   "--store", "dense", "-q", "-o", out])
    assert result.exit_code == 0, result.output
    weight = _model("gated").b.weight.detach().double().numpy()
    with jaccli.open_results(out) as results:
        names = [g.name for g in results.groups()]
        calls = [results.jacobian(name) for name in ("b#0", "b#1")]
    assert "a" not in names
    for got in calls:
        np.testing.assert_allclose(got, np.broadcast_to(weight, (N, 4, 3)), rtol=0,
                                   atol=1e-15)


@pytest.mark.parametrize("fmt", ["state_dict", "torchscript"])
def test_constants_number_tensor_and_bool(folder, fmt):
    x = torch.from_numpy(np.load(folder / "x4.npy"))
    shift = torch.from_numpy(np.load(folder / "shift.npy"))
    source = _source(folder, "scaled", fmt, None)
    for square in (False, True):
        out = folder / f"scaled_{fmt}_{square}.h5"
        result = _run(["compute", *source, folder / "x4.npy", "--const",
                       f"shift={folder / 'shift.npy'}", "--const", "scale=2.5",
                       *(["--const", "square=true"] if square else []), "--dtype", "float64",
                       "-q", "-o", out])
        assert result.exit_code == 0, result.output
        model = _model("scaled").double()
        expected = _reference(lambda v, m=model, s=square: m(v, shift, 2.5, s), [x], 0)
        assert np.abs(_end_to_end(out) - expected).max() < 1e-12


def test_torchscript_constant_argument_like_silero_vad(folder):
    """forward(x, sr: int): the constant reaches the model (each value takes its branch)."""
    x = torch.from_numpy(np.load(folder / "x6.npy"))
    source = _source(folder, "rate", "torchscript", None)
    model = _model("rate").double()
    for sr in (16000, 8000):
        out = folder / f"rate_{sr}.h5"
        result = _run(["compute", *source, folder / "x6.npy", "--const", f"sr={sr}",
                       "--dtype", "float64", "-q", "-o", out])
        assert result.exit_code == 0, result.output
        expected = _reference(lambda v, s=sr: model(v, s), [x], 0)
        assert np.abs(_end_to_end(out) - expected).max() < 1e-12
    _refused(folder, ["compute", *source, folder / "x6.npy"], 2, "takes x, sr",
             "--const sr=VALUE")


def test_integer_input_held_fixed(folder):
    x = torch.from_numpy(np.load(folder / "x4.npy"))
    ids = torch.from_numpy(np.load(folder / "ids.npy"))
    source = _source(folder, "tokens", "state_dict", None)
    out = folder / "tokens.h5"
    result = _run(["compute", *source, folder / "x4.npy", "--input",
                   f"ids={folder / 'ids.npy'}", "--dtype", "float64", "-q", "-o", out])
    assert result.exit_code == 0, result.output
    model = _model("tokens").double()
    expected = _reference(lambda v, i: model(v, i), [x, ids], 0)
    assert np.abs(_end_to_end(out) - expected).max() < 1e-12


def test_spectrum_and_jvp_with_a_held_input(folder):
    x = torch.from_numpy(np.load(folder / "x.npy"))
    y = torch.from_numpy(np.load(folder / "more.npz")["y"])
    source = _source(folder, "gated", "state_dict", None)
    inputs = ["--input", f"y={folder / 'more.npz'}:y", "--wrt", "y", "--dtype", "float64"]
    jac = torch.from_numpy(_reference(_model("gated").double(), [x, y], 1))
    out = folder / "spectra.h5"
    result = _run(["spectrum", *source, folder / "x.npy", *inputs, "--no-layers", "-q",
                   "-o", out])
    assert result.exit_code == 0, result.output
    with h5py.File(out) as f:
        np.testing.assert_allclose(f["end_to_end/singular_values"][:],
                                   torch.linalg.svdvals(jac).numpy(), rtol=1e-10)
        assert f.attrs["wrt_input"] == "y"
    v = np.random.default_rng(3).normal(size=(N, 3))
    np.save(folder / "v.npy", v)
    result = _run(["jvp", *source, folder / "x.npy", *inputs, "--vectors", folder / "v.npy",
                   "-q", "-o", folder / "jvp.h5"])
    assert result.exit_code == 0, result.output
    with h5py.File(folder / "jvp.h5") as f:
        np.testing.assert_allclose(f["products/product/product"][:],
                                   (jac @ torch.from_numpy(v)[:, :, None])[:, :, 0].numpy(),
                                   rtol=1e-10)


def _refused(folder, args, code, *words):
    out = folder / "refused.h5"
    result = _run([*args, "-o", out])
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaccli: error:"), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert not out.exists()


def test_bad_calls_fail_in_one_line(folder):
    gated = [*_source(folder, "gated", "state_dict", None), folder / "x.npy"]
    y = f"y={folder / 'more.npz'}:y"
    _refused(folder, ["compute", *gated, "--input", f"z={folder / 'more.npz'}:y"], 2,
             "no argument 'z'", "x, y")
    _refused(folder, ["compute", *gated, "--input", y, "--wrt", "w"], 2, "x, y")
    _refused(folder, ["compute", *gated, "--input", f"y={folder / 'y_short.npy'}"], 1,
             "4 samples", "5")
    _refused(folder, ["spectrum", *gated, "--input", f"y={folder / 'y_short.npy'}"], 1,
             "4 samples")
    _refused(folder, ["compute", *gated, "--input", "y"], 2, "NAME=FILE")
    wide = [*_source(folder, "gated", "state_dict", None), folder / "x6.npy"]
    _refused(folder, ["compute", *wide, "--input", y], 1,
             f"DATA: {folder / 'x6.npy'} has samples of shape (6,) for the forward's "
             "argument x, but its layer a (Linear) expects (5,) per sample")
    scaled = [*_source(folder, "scaled", "state_dict", None), folder / "x4.npy"]
    shift = f"shift={folder / 'shift.npy'}"
    _refused(folder, ["compute", *scaled, "--const", shift, "--const", "scale=2",
                      "--wrt", "scale"], 2, "constant")
    _refused(folder, ["compute", *scaled, "--const", shift], 2, "scale", "--const scale=")
    _refused(folder, ["compute", *scaled, "--const", "shift=nothing.npy", "--const",
                      "scale=2"], 2, "a number, true/false or a tensor file")
    tokens = [*_source(folder, "tokens", "state_dict", None), folder / "x4.npy"]
    _refused(folder, ["compute", *tokens, "--input", f"ids={folder / 'ids.npy'}", "--wrt",
                      "ids"], 1, "integer input")


def test_parameter_jacobians_with_a_held_input(folder):
    """--wrt params with y held: per-sample d output / d b.weight, through the graph."""
    x = torch.from_numpy(np.load(folder / "x.npy"))
    y = torch.from_numpy(np.load(folder / "more.npz")["y"])
    source = _source(folder, "gated", "state_dict", None)
    out = folder / "params.h5"
    result = _run(["compute", *source, folder / "x.npy", "--input", f"y={folder / 'more.npz'}:y",
                   "--wrt", "params", "--params", "b.weight", "--dtype", "float64", "-q",
                   "-o", out])
    assert result.exit_code == 0, result.output
    model = _model("gated").double()
    weight = dict(model.named_parameters())["b.weight"].detach()
    expected = []
    for i in range(N):
        def one(w, i=i):
            params = {**dict(model.named_parameters()), "b.weight": w}
            return torch.func.functional_call(model, params, (x[i:i + 1], y[i:i + 1]))[0]

        expected.append(torch.autograd.functional.jacobian(one, weight).reshape(2, -1).numpy())
    with h5py.File(out) as f:
        got = f["params/b.weight/jacobian"][:].reshape(N, 2, -1)
    np.testing.assert_allclose(got, np.stack(expected), rtol=1e-10, atol=1e-14)


def test_check_and_shards_take_the_same_rows_of_every_input(folder):
    x = torch.from_numpy(np.load(folder / "x.npy"))
    y = torch.from_numpy(np.load(folder / "more.npz")["y"])
    source = _source(folder, "gated", "state_dict", None)
    inputs = ["--input", f"y={folder / 'more.npz'}:y", "--dtype", "float64"]
    expected = _reference(_model("gated").double(), [x, y], 0)
    out = folder / "shard.h5"
    result = _run(["compute", *source, folder / "x.npy", *inputs, "--offset", "1",
                   "--shard", "1/2", "-q", "-o", out])
    assert result.exit_code == 0, result.output
    with jaccli.open_results(out) as results:
        rows = results.sample_index
        got = results.jacobian("end_to_end")
    assert list(rows) == [3, 4]
    np.testing.assert_allclose(got, expected[rows], rtol=1e-12)
    norms = np.linalg.norm(expected, ord=2, axis=(1, 2))
    for bound, code in ((norms.max() * 1.01, 0), (norms.max() * 0.99, 1)):
        result = _run(["check", *source, folder / "x.npy", *inputs, "--max-spectral-norm",
                       str(bound), "--layers", "(end-to-end)"])
        assert result.exit_code == code, result.output


def test_a_name_given_twice_is_refused(folder):
    gated = [*_source(folder, "gated", "state_dict", None), folder / "x.npy"]
    y = f"y={folder / 'more.npz'}:y"
    _refused(folder, ["compute", *gated, "--input", y, "--input", y], 2, "--input y",
             "twice")
    scaled = [*_source(folder, "scaled", "state_dict", None), folder / "x4.npy"]
    shift = f"shift={folder / 'shift.npy'}"
    _refused(folder, ["compute", *scaled, "--const", shift, "--const", "scale=2",
                      "--const", "scale=3"], 2, "--const scale", "twice")


def test_output_onto_an_input_or_const_file_is_refused_and_the_file_kept(folder, tmp_path):
    gated = [*_source(folder, "gated", "state_dict", None), folder / "x.npy"]
    target = tmp_path / "y.npz"
    target.write_bytes((folder / "more.npz").read_bytes())
    before = target.read_bytes()
    scaled = [*_source(folder, "scaled", "state_dict", None), folder / "x4.npy"]
    shift = tmp_path / "shift.npy"
    shift.write_bytes((folder / "shift.npy").read_bytes())
    for args, path in ((["compute", *gated, "--input", f"y={target}:y"], target),
                       (["compute", *scaled, "--const", f"shift={shift}", "--const",
                         "scale=2"], shift)):
        kept = path.read_bytes()
        result = _run([*args, "-o", path])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 1, result.output
        assert len(lines) == 1 and lines[0].startswith("jaccli: error:"), result.stderr
        assert "is an input of this run" in lines[0], lines[0]
        assert path.read_bytes() == kept and not list(tmp_path.glob(".*partial*"))
    assert target.read_bytes() == before


def test_an_integer_file_where_the_forward_wants_floats_fails_in_one_line(folder, tmp_path):
    gated = [*_source(folder, "gated", "state_dict", None), folder / "x.npy"]
    ints = tmp_path / "ints.npy"
    np.save(ints, np.ones((N, 3), dtype=np.int64))
    _refused(folder, ["compute", *gated, "--input", f"y={ints}"], 1, "the model fails",
             "dtype")


def test_non_finite_constants_are_refused(folder, tmp_path):
    scaled = [*_source(folder, "scaled", "state_dict", None), folder / "x4.npy"]
    shift = f"shift={folder / 'shift.npy'}"
    for value in ("nan", "1e999", "-inf"):
        _refused(folder, ["compute", *scaled, "--const", shift, "--const", f"scale={value}"],
                 2, "give a finite number")
    bad = tmp_path / "shift_nan.npy"
    np.save(bad, np.full(4, np.nan))
    _refused(folder, ["compute", *scaled, "--const", f"shift={bad}", "--const", "scale=2"],
             1, "NaN or Inf")


@pytest.mark.parametrize("fmt", ["state_dict", "pt2"])
def test_a_held_input_of_the_wrong_width_fails_in_one_line(folder, tmp_path, fmt):
    """The line names the input, its file, its shape and the expected one (not the capture).
    In a process of its own: torch's loggers write to the real stderr, which CliRunner does
    not capture."""
    import subprocess
    import sys

    from .conftest import ROOT

    x = torch.from_numpy(np.load(folder / "x.npy")).float()
    y = torch.from_numpy(np.load(folder / "more.npz")["y"]).float()
    gated = [*_source(folder, "gated", fmt, (x[:2], y[:2])), folder / "x.npy"]
    wide, out = tmp_path / "wide.npy", tmp_path / "out.h5"
    np.save(wide, np.random.default_rng(3).normal(size=(N, 4)))
    result = subprocess.run([sys.executable, "-m", "jaccli", "compute", *map(str, gated),
                             "--input", f"y={wide}", "-o", str(out)], capture_output=True,
                            text=True, cwd=ROOT)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr[-500:]
    assert len(lines) == 1 and lines[0].startswith("jaccli: error:"), result.stderr[-500:]
    who = "its layer b (Linear)" if fmt == "state_dict" else "the program"
    assert (f"--input y: {wide} has samples of shape (4,) for the forward's argument y, but "
            f"{who} expects (3,) per sample") in lines[0], lines[0]
    assert "captured" not in lines[0] and not out.exists()
    assert not list(tmp_path.glob(".*partial*"))


def _pt2_float64(folder, name, example):
    """`name` exported in float64 (dynamic batch on every input), loaded as jaccli does."""
    batch = torch.export.Dim("batch")
    program = torch.export.export(_model(name).double(), example,
                                  dynamic_shapes=tuple({0: batch} for _ in example))
    torch.export.save(program, folder / f"{name}64.pt2")
    return jaccli.load_model(folder / f"{name}64.pt2")


@pytest.mark.parametrize("fmt", ["eager", "pt2"])
def test_api_inputs_consts_and_wrt_match_autograd(folder, fmt):
    """jaccli.jacobian / layer_jacobians / list_layers / jvp / vjp with inputs= and wrt=,
    against float64 torch.autograd.functional.jacobian per sample."""
    x = torch.from_numpy(np.load(folder / "x.npy"))
    y = torch.from_numpy(np.load(folder / "more.npz")["y"])
    eager = _model("gated").double()
    model = eager if fmt == "eager" else _pt2_float64(folder, "gated", (x[:2], y[:2]))
    for wrt, position in ((None, 0), ("x", 0), ("y", 1)):
        expected = torch.from_numpy(_reference(eager, [x, y], position))
        got = jaccli.jacobian(model, x, inputs={"y": y}, wrt=wrt)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
        layered = jaccli.layer_jacobians(model, x, inputs={"y": y}, wrt=wrt, end_to_end=True)
        torch.testing.assert_close(layered["(end-to-end)"], expected, rtol=1e-12, atol=1e-14)
        v = torch.randn(N, expected.shape[2], dtype=torch.float64)
        u = torch.randn(N, expected.shape[1], dtype=torch.float64)
        torch.testing.assert_close(jaccli.jvp(model, x, v, inputs={"y": y},
                                              wrt=wrt or "inputs"),
                                   (expected @ v[:, :, None])[:, :, 0])
        torch.testing.assert_close(jaccli.vjp(model, x, u, inputs={"y": y},
                                              wrt=wrt or "inputs"),
                                   (u[:, None, :] @ expected)[:, 0, :])
    names = [e.name for e in jaccli.list_layers(model, x, inputs={"y": y}, wrt="y")]
    assert "a" not in names and {"b#0", "b#1"} <= set(names), names
    weight = eager.b.weight.detach()
    layers = jaccli.layer_jacobians(model, x, inputs={"y": y}, wrt="y")
    for name in ("b#0", "b#1"):
        torch.testing.assert_close(layers[name], weight.expand(N, 4, 3), rtol=0, atol=1e-15)


def test_api_constants_and_refusals(folder):
    x = torch.from_numpy(np.load(folder / "x4.npy"))
    shift = torch.from_numpy(np.load(folder / "shift.npy"))
    model = _model("scaled").double()
    expected = _reference(lambda v: model(v, shift, 2.5, True), [x], 0)
    got = jaccli.jacobian(model, x, consts={"shift": shift, "scale": 2.5, "square": True})
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-14)
    with pytest.raises(jaccli.JaccliError, match="argument scale has no value"):
        jaccli.jacobian(model, x, consts={"shift": shift})
    with pytest.raises(jaccli.JaccliError, match="no argument 'z'"):
        jaccli.jacobian(model, x, consts={"shift": shift, "scale": 1.0, "z": 1})
    ids = torch.from_numpy(np.load(folder / "ids.npy"))
    with pytest.raises(jaccli.JaccliError, match="integer input"):
        jaccli.jacobian(_model("tokens").double(), x, inputs={"ids": ids}, wrt="ids")
    with pytest.raises(jaccli.JaccliError, match="one row per sample"):
        jaccli.jacobian(_model("gated").double(), torch.from_numpy(np.load(folder / "x.npy")),
                        inputs={"y": torch.zeros(N - 1, 3, dtype=torch.float64)})


def _input_hessians(fn, x, t):
    """Per-sample Hessians `(N, D, D)` of the cross-entropy of fn(x_i) against t_i, float64."""
    loss = torch.nn.functional.cross_entropy
    return torch.stack([torch.autograd.functional.hessian(
        lambda z, i=i: loss(fn(z[None], i), t[i:i + 1]), x[i]) for i in range(len(x))])


def test_api_hvp_with_a_held_input_and_constants(folder):
    x = torch.from_numpy(np.load(folder / "x.npy"))
    y = torch.from_numpy(np.load(folder / "more.npz")["y"])
    t = torch.tensor([0, 1, 0, 1, 1])
    gated = _model("gated").double()
    hessians = _input_hessians(lambda z, i: gated(x[i:i + 1], z), y, t)  # w.r.t. y, x held
    v = torch.randn(N, 3, dtype=torch.float64)
    got = jaccli.hvp(gated, x, v, targets=t, loss="cross-entropy", inputs={"y": y}, wrt="y")
    torch.testing.assert_close(got, (hessians @ v[:, :, None])[:, :, 0])
    dense = _param_hessian(gated, (x, y), t)
    w = torch.randn(dense.shape[0], dtype=torch.float64)
    torch.testing.assert_close(jaccli.hvp(gated, x, w, targets=t, loss="cross-entropy",
                                          inputs={"y": y}), dense @ w)


def _param_hessian(model, arguments, t):
    """The Hessian of the mean cross-entropy of model(*arguments) w.r.t. all parameters,
    flattened in `named_parameters` order, float64."""
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def mean_loss(theta):
        params, i = {}, 0
        for name, p in zip(names, model.parameters(), strict=True):
            params[name] = theta[i:i + p.numel()].reshape(p.shape)
            i += p.numel()
        out = torch.func.functional_call(model, params, arguments)
        return torch.nn.functional.cross_entropy(out, t)

    return torch.autograd.functional.hessian(mean_loss, flat)


@pytest.mark.parametrize("fmt", ["state_dict", "pt2"])
def test_hessian_with_a_constant_and_a_held_input_matches_autograd(folder, fmt):
    """jaccli hessian --wrt inputs with --const values, and --wrt y with x held: each
    sample's eigenvalues against float64 torch.autograd.functional.hessian."""
    t = np.array([0, 1, 2, 0, 1])
    np.save(folder / "t3.npy", t)
    np.save(folder / "t2.npy", t % 2)
    x4 = torch.from_numpy(np.load(folder / "x4.npy"))
    shift = torch.from_numpy(np.load(folder / "shift.npy"))
    x = torch.from_numpy(np.load(folder / "x.npy"))
    y = torch.from_numpy(np.load(folder / "more.npz")["y"])
    scaled, gated = _model("scaled").double(), _model("gated").double()
    cases = {
        "scaled": (["--const", f"shift={folder / 'shift.npy'}", "--const", "scale=2.5",
                    "--wrt", "inputs", "--targets", folder / "t3.npy"],
                   folder / "x4.npy", _input_hessians(
                       lambda z, i: scaled(z, shift, 2.5), x4, torch.from_numpy(t)),
                   (x4[:2].float(), shift.float(), 2.5)),
        "gated": (["--input", f"y={folder / 'more.npz'}:y", "--wrt", "y", "--targets",
                   folder / "t2.npy"], folder / "x.npy", _input_hessians(
                       lambda z, i: gated(x[i:i + 1], z), y, torch.from_numpy(t % 2)),
                  (x[:2].float(), y[:2].float()))}
    for name, (options, data, hessians, example) in cases.items():
        if fmt == "pt2" and name == "scaled":
            continue  # export bakes a constant in: the .pt2 case is the held input
        source = _source(folder, name, fmt, example if fmt == "pt2" else None)
        out = folder / f"hessian_{name}_{fmt}.h5"
        result = _run(["hessian", *source, data, *options, "--loss", "cross-entropy",
                       "--top-k", "2", "--dtype", "float64", "--json", "-o", out])
        assert result.exit_code == 0, result.output
        doc = json.loads(result.stdout)
        expected = torch.linalg.eigvalsh(hessians).flip(-1)[:, :2].numpy()
        with h5py.File(out) as f:
            np.testing.assert_allclose(f["hessian_results/hessian/eigenvalues"][:], expected,
                                       rtol=1e-7, atol=1e-10)
            assert f.attrs["wrt_input"] == ("x" if name == "scaled" else "y")
        assert doc["dim"] == hessians.shape[1] and doc["wrt"] == "inputs"
    # the parameter Hessian of the mean loss, y held fixed
    source = _source(folder, "gated", fmt, cases["gated"][3] if fmt == "pt2" else None)
    result = _run(["hessian", *source, folder / "x.npy", "--input",
                   f"y={folder / 'more.npz'}:y", "--targets", folder / "t2.npy", "--loss",
                   "cross-entropy", "--top-k", "2", "--dtype", "float64", "--json"])
    assert result.exit_code == 0, result.output
    dense = _param_hessian(gated, (x, y), torch.from_numpy(t % 2))
    np.testing.assert_allclose(json.loads(result.stdout)["eigenvalues"],
                               torch.linalg.eigvalsh(dense).flip(0)[:2].numpy(), rtol=1e-7,
                               atol=1e-10)


def test_inspect_with_inputs_lists_the_layers_of_the_wrt_path(folder):
    gated = _source(folder, "gated", "state_dict", None)
    y = f"y={folder / 'more.npz'}:y"
    result = _run(["inspect", *gated, "--data", folder / "x.npy", "--input", y, "--wrt", "y",
                   "--json"])
    assert result.exit_code == 0, result.output
    entries = {e["name"]: e for e in json.loads(result.stdout)["entries"]}
    assert "a" not in entries and entries["b#0"]["input_shape"] == [3]  # b: Linear(3, 4)
    assert entries["(end-to-end)"]["input_shape"] == [3]
    assert entries["(end-to-end)"]["output_shape"] == [2]
    result = _run(["inspect", *gated, "--data", folder / "x.npy", "--input", y, "--json"])
    assert result.exit_code == 0, result.output
    entries = {e["name"]: e for e in json.loads(result.stdout)["entries"]}
    assert "a" in entries and entries["(end-to-end)"]["input_shape"] == [5]
    scaled = _source(folder, "scaled", "state_dict", None)
    result = _run(["inspect", *scaled, "--input-shape", "4", "--const",
                   f"shift={folder / 'shift.npy'}", "--const", "scale=2", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["entries"][-1]["input_shape"] == [4]
    result = _run(["inspect", *gated, "--input-shape", "5", "--input", y])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "needs --data" in lines[0], lines


def test_two_input_program_exported_for_a_fixed_batch(folder):
    """A `.pt2` of a two-input model exported for batch 4 (no dynamic shapes) runs on 6
    samples with --input, and matches float64 autograd."""
    model = _model("gated").double()
    x = torch.from_numpy(np.load(folder / "x.npy"))
    y = torch.from_numpy(np.load(folder / "more.npz")["y"])
    program = torch.export.export(model, (x[:4], y[:4]))
    torch.export.save(program, folder / "gated_static.pt2")
    out = folder / "gated_static.h5"
    result = _run(["compute", folder / "gated_static.pt2", folder / "x.npy", "--input",
                   f"y={folder / 'more.npz'}:y", "--dtype", "float64", "-q", "-o", out])
    assert result.exit_code == 0, result.output
    expected = _reference(model, [x, y], 0)
    got = _end_to_end(out)
    assert got.shape == expected.shape == (N, 2, 5)
    assert np.abs(got - expected).max() < 1e-12 * max(1.0, np.abs(expected).max())
