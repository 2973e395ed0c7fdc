"""The shipped sample models: self-describing, trained, and as accurate as metrics.json says."""

import json

import numpy as np
import pytest
import torch

import jaccli
from jaccli.io.models import ModelFormat

from .conftest import ROOT, SAMPLES


@pytest.mark.parametrize(("name", "data"), [("digits_mlp", "digits_test.npy"),
                                            ("digits_cnn", "digits_test_images.npy")])
def test_sample_model_accuracy_matches_metrics(name, data):
    loaded = jaccli.load_model(SAMPLES / f"{name}.safetensors")
    assert loaded.format is ModelFormat.SAFETENSORS
    assert loaded.source == "self-describing safetensors"
    x = torch.from_numpy(np.load(SAMPLES / data))
    labels = torch.from_numpy(np.load(SAMPLES / "digits_test_labels.npy"))
    assert loaded.input_shape == tuple(x.shape[1:])
    with torch.no_grad():
        accuracy = (loaded.module(x).argmax(1) == labels).float().mean().item()
    metrics = json.loads((SAMPLES / "metrics.json").read_text())[name]
    assert accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-4)
    assert accuracy > 0.95
    assert f"{100 * metrics['test_accuracy']:.1f}%" in (ROOT / "README.md").read_text()
