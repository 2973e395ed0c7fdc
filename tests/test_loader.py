import numpy as np
import pytest
import torch

import jaccli
from jaccli.errors import ModelLoadError, UntrustedPickleError
from jaccli.io.models import save_model

from .conftest import MLP_SPEC


def test_every_format_loads_the_same_function(model_files, mlp):
    x = torch.randn(5, 6)
    expected = mlp(x)
    for name, entry in model_files.items():
        loaded = jaccli.load_model(entry["path"], **entry["kwargs"])
        assert not loaded.module.training, name
        torch.testing.assert_close(loaded.module(x), expected, msg=name)


def test_declared_input_shapes(model_files):
    assert jaccli.load_model(model_files["self-describing safetensors"]["path"]).input_shape == (6,)
    assert jaccli.load_model(model_files["torch.export"]["path"]).input_shape == (6,)
    assert jaccli.load_model(model_files["torchscript"]["path"]).input_shape is None


def test_layer_types_survive_torchscript_and_export(model_files):
    for name in ("torchscript", "torch.export"):
        loaded = jaccli.load_model(model_files[name]["path"])
        sub = dict(loaded.module.named_modules())["1"]
        assert loaded.type_name("1", sub) == "Tanh", name


def test_pickled_module_needs_explicit_trust(model_files, capsys):
    path = model_files["pickled module (trusted)"]["path"]
    with pytest.raises(UntrustedPickleError, match="--trust-pickle"):
        jaccli.load_model(path)
    jaccli.load_model(path, trust_pickle=True)
    assert "runs code" in capsys.readouterr().err


def test_state_dict_needs_arch(model_files):
    with pytest.raises(ModelLoadError, match="no architecture; pass --arch"):
        jaccli.load_model(model_files["state_dict + spec"]["path"])
    with pytest.raises(ModelLoadError, match="no architecture; pass --arch"):
        jaccli.load_model(model_files["plain safetensors + spec"]["path"])


def test_strict_key_and_shape_matching(tmp_path, mlp):
    state = mlp.state_dict()
    state.pop("0.bias")
    state["extra.weight"] = torch.zeros(1)
    state["2.weight"] = torch.zeros(4, 9)
    torch.save(state, tmp_path / "bad.pt")
    spec = tmp_path / "spec.json"
    spec.write_text(__import__("json").dumps(MLP_SPEC))
    with pytest.raises(ModelLoadError) as info:
        jaccli.load_model(tmp_path / "bad.pt", arch=str(spec))
    message = str(info.value)
    assert "1 missing (0.bias)" in message
    assert "1 unexpected (extra.weight)" in message
    assert "2.weight: file (4, 9) vs model (4, 5)" in message
    assert "\n" not in message


def test_dataparallel_prefix_is_stripped(tmp_path, mlp):
    torch.save({f"module.{k}": v for k, v in mlp.state_dict().items()}, tmp_path / "dp.pt")
    spec = tmp_path / "spec.json"
    spec.write_text(__import__("json").dumps(MLP_SPEC))
    loaded = jaccli.load_model(tmp_path / "dp.pt", arch=str(spec))
    x = torch.randn(2, 6)
    torch.testing.assert_close(loaded.module(x), mlp(x))


def test_bad_import_strings(model_files, tmp_path):
    path = model_files["checkpoint + import string"]["path"]
    with pytest.raises(ModelLoadError, match="cannot import 'nowhere_module'"):
        jaccli.load_model(path, arch="nowhere_module:make")
    with pytest.raises(ModelLoadError, match="has no attribute 'missing'"):
        kwargs = model_files["checkpoint + import string"]["kwargs"]
        jaccli.load_model(path, arch="my_factories:missing", arch_path=kwargs["arch_path"])
    with pytest.raises(ModelLoadError, match="is not a directory"):
        jaccli.load_model(path, arch="my_factories:make_mlp", arch_path=tmp_path / "nope")


@pytest.mark.parametrize("batch", [1, 2])
def test_export_with_a_fixed_batch_still_computes(tmp_path, mlp, batch):
    """A .pt2 exported without a dynamic batch axis: re-traced or run a batch at a time."""
    from typer.testing import CliRunner

    from jaccli.cli import app

    from .conftest import reference_jacobian

    program = torch.export.export(mlp, (torch.randn(batch, 6),))
    torch.export.save(program, tmp_path / "fixed.pt2")
    assert jaccli.load_model(tmp_path / "fixed.pt2").static_batch == batch
    x = np.random.default_rng(5).normal(size=(5, 6))
    np.save(tmp_path / "x.npy", x)
    result = CliRunner().invoke(app, ["compute", str(tmp_path / "fixed.pt2"),
                                      str(tmp_path / "x.npy"), "--dtype", "float64", "-o",
                                      str(tmp_path / "j.h5"), "-q"])
    assert result.exit_code == 0, result.output
    with jaccli.open_results(tmp_path / "j.h5") as r:
        np.testing.assert_allclose(r.jacobian("end_to_end"),
                                   reference_jacobian(mlp.double(), torch.from_numpy(x)),
                                   rtol=1e-10)
        assert r.attrs["engine"].startswith("graph: program-")


def test_save_model_refuses_a_spec_that_does_not_match(tmp_path, mlp):
    other = dict(MLP_SPEC, model={"type": "Sequential", "children": [
        {"type": "Linear", "args": [6, 9]}]})
    with pytest.raises(ModelLoadError, match="do not match the architecture"):
        save_model(mlp, other, tmp_path / "x.safetensors")


def test_corrupt_safetensors(tmp_path, model_files):
    data = model_files["self-describing safetensors"]["path"].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated safetensors file"):
        jaccli.load_model(cut)
    cut.write_bytes(data[:-10])
    with pytest.raises(ModelLoadError, match="cannot read safetensors"):
        jaccli.load_model(cut)
