import json

import pytest
import torch
from torch import nn

from jaccli.errors import ModelLoadError
from jaccli.io.models import Residual, build_model, load_spec
from jaccli.io.models.arch import spec_input_shape

from .conftest import CNN_SPEC, MLP_SPEC


def test_builds_nested_named_children():
    model = build_model(CNN_SPEC)
    names = [name for name, _ in model.named_modules()]
    assert "features.0" in names and "head.2" in names and "flatten" in names
    assert isinstance(model.features[0], nn.Conv2d)
    assert model.features[0].padding == (1, 1)
    assert model(torch.zeros(2, 2, 6, 6)).shape == (2, 3)


def test_spec_from_json_text_and_file(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(MLP_SPEC))
    assert load_spec(path)["input_shape"] == [6]
    assert load_spec(json.dumps(MLP_SPEC))["model"]["type"] == "Sequential"
    assert spec_input_shape(load_spec(path)) == (6,)


def test_residual_adds_input():
    model = build_model({"model": {"type": "Residual", "children": [
        {"type": "Linear", "args": [3, 3], "kwargs": {"bias": False}}]}})
    assert isinstance(model, Residual)
    x = torch.randn(4, 3)
    torch.testing.assert_close(model(x), x + x @ model[0].weight.T)


@pytest.mark.parametrize(("node", "message"), [
    ({"type": "Module"}, "unknown layer type 'Module'"),
    ({"type": "os.system"}, "unknown layer type"),
    ({"type": "Linear", "args": [3]}, "cannot build model = Linear"),
    ({"type": "Linear", "args": "3"}, '"args" must be a list'),
    ({"args": [1]}, 'must be an object with a "type"'),
])
def test_bad_nodes_are_refused(node, message):
    with pytest.raises(ModelLoadError, match=message):
        build_model({"model": node})


def test_bad_top_level():
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_spec("{nope")
    with pytest.raises(ModelLoadError, match="version 7 is not supported"):
        load_spec({"version": 7, "model": {"type": "Tanh"}})
    with pytest.raises(ModelLoadError, match='"model" entry'):
        load_spec({"format": "jaccli-arch"})
    with pytest.raises(ModelLoadError, match="cannot read architecture spec"):
        load_spec("/no/such/spec.json")
