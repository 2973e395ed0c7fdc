"""Fixtures of the adversarial corpus: a small model and data, and a clean export archive."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import jaccli

from ..conftest import MLP_SPEC
from .crafted import export_archive


@pytest.fixture(scope="session")
def clean_export(tmp_path_factory) -> Path:
    """A genuine torch.export archive (Linear → tanh with a buffer and a constant, 3 → 2)."""
    return export_archive(tmp_path_factory.mktemp("export") / "clean.pt2")


@pytest.fixture
def work(tmp_path: Path, mlp) -> Path:
    """A folder with mlp.safetensors (6 → 3, self-describing) and x.npy (5 × 6)."""
    jaccli.save_model(mlp, MLP_SPEC, tmp_path / "mlp.safetensors")
    np.save(tmp_path / "x.npy", np.random.default_rng(3).normal(size=(5, 6)).astype(np.float32))
    return tmp_path
