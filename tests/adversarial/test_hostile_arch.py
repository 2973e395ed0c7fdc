"""Hostile architectures: specs nested thousands deep, choosing device or dtype, declaring
huge layers or inputs; `--arch` import strings that would call something other than a model
factory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import jaccli
from jaccli.io.models.loader import ARCH_METADATA_KEY

from ..conftest import MLP_SPEC
from .crafted import assert_one_error, invoke

ROOT = Path(__file__).resolve().parents[2]


def _self_describing(path: Path, spec: dict | str, tensors: dict | None = None) -> Path:
    text = spec if isinstance(spec, str) else json.dumps(spec)
    save_file(tensors or {"unused": torch.zeros(1)}, path, metadata={ARCH_METADATA_KEY: text})
    return path


def _nested(depth: int) -> str:
    """The JSON text of a spec `depth` Sequentials deep (too deep for json.dumps)."""
    node = '{"type": "Sequential", "children": [' * depth + '{"type": "Tanh"}' + "]}" * depth
    return f'{{"format": "jaccli-arch", "version": 1, "input_shape": [6], "model": {node}}}'


@pytest.mark.parametrize("depth", [200, 5000])
def test_deeply_nested_spec(work, depth):
    """5000 deep overflows the JSON parser's recursion; 200 would overflow the builder."""
    model = _self_describing(work / "deep.safetensors", _nested(depth))
    assert_one_error(invoke("inspect", model), says="deep")
    (work / "deep.json").write_text(_nested(depth))
    torch.save({"w": torch.zeros(1)}, work / "state.pt")
    assert_one_error(invoke("compute", work / "state.pt", work / "x.npy", "--arch",
                            work / "deep.json"), says="deep")


@pytest.mark.parametrize("node", [
    {"type": "Linear", "args": [6, 3], "kwargs": {"device": "meta"}},
    {"type": "Linear", "args": [6, 3], "kwargs": {"dtype": "float16"}},
    {"type": "Linear", "args": [6, 3, True, "meta"]},
])
def test_spec_choosing_device_or_dtype(work, node):
    spec = {"format": "jaccli-arch", "version": 1, "input_shape": [6], "model": node}
    model = _self_describing(work / "m.safetensors", spec,
                             {"weight": torch.zeros(3, 6), "bias": torch.zeros(3)})
    assert_one_error(invoke("compute", model, work / "x.npy"), says="jaccli chooses the device")


def test_spec_arguments_must_be_plain_values(work):
    spec = {"format": "jaccli-arch", "version": 1,
            "model": {"type": "Linear", "args": [6, {"x": 1}]}}
    assert_one_error(invoke("inspect", _self_describing(work / "m.safetensors", spec)),
                     says="arguments must be numbers")


def test_huge_declared_layer_fails_before_allocating(tmp_path):
    """A 100-byte spec declaring Linear(30000, 30000) and no weights: refused without the
    3.4 GiB allocation (main: 3.7 GB resident before noticing)."""
    spec = {"format": "jaccli-arch", "version": 1, "input_shape": [30000],
            "model": {"type": "Linear", "args": [30000, 30000]}}
    model = _self_describing(tmp_path / "huge.safetensors", spec)
    # VmHWM, not ru_maxrss: the latter also counts the test worker that spawned the process
    script = ("import sys\nfrom jaccli.cli import main\ntry:\n    main(sys.argv[2:])\n"
              "finally:\n    peak = next(int(line.split()[1]) for line in open("
              "'/proc/self/status') if line.startswith('VmHWM:'))\n"
              "    open(sys.argv[1], 'w').write(str(peak))\n")
    process = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "peak"), "inspect", str(model)],
        capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    assert process.returncode == 1, process.stderr
    assert "2 missing (weight; bias)" in process.stderr
    peak_bytes = int((tmp_path / "peak").read_text()) * 1024  # VmHWM is in KiB
    assert peak_bytes < 1.5 * 2**30  # the weights alone would be 3.4 GiB


def test_spec_weights_load_through_the_meta_device(work, mlp):
    loaded = jaccli.load_model(work / "mlp.safetensors")
    for name, tensor in mlp.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[name], tensor)
        assert loaded.module.state_dict()[name].device.type == "cpu"


def test_inspect_refuses_an_input_over_the_memory_budget(work):
    spec = {"format": "jaccli-arch", "version": 1, "input_shape": [9000, 9000],
            "model": {"type": "Tanh"}}
    model = work / "wide.safetensors"
    jaccli.save_model(jaccli.build_model(spec), spec, model)
    assert_one_error(invoke("inspect", model, "--max-memory", "100MB"),
                     says="over the memory budget")
    assert_one_error(invoke("inspect", work / "mlp.safetensors", "--input-shape", "9000,9000",
                            "--max-memory", "100MB"), says="309.0 MiB")


# ------------------------------------------------------------------------ --arch import strings


@pytest.fixture
def arch_dir(tmp_path):
    """A user's folder of factories, one good and several that must not be called."""
    folder = tmp_path / "archs"
    folder.mkdir()
    marker = tmp_path / "MARKER"
    (folder / "helpers.py").write_text(
        f"def touch():\n    open({str(marker)!r}, 'w').close()\n")
    (folder / "factories.py").write_text(
        "import torch.nn as nn\nfrom os import system\nfrom subprocess import run\n"
        "from helpers import touch\n"
        "def make_mlp():\n"
        "    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Sigmoid(),\n"
        "                         nn.Linear(4, 3))\n"
        "def make_wide(width):\n    return nn.Linear(6, width)\n"
        "class NotAModel:\n    pass\n")
    return folder, marker


@pytest.mark.parametrize("target, says", [
    ("os:system", "standard library"),
    ("subprocess:run", "standard library"),
    ("builtins:exec", "standard library"),
    ("factories:system", "not a Python class or function"),
    ("factories:run", "defined in subprocess"),
    ("factories:touch", "defined in helpers"),
    ("factories:make_wide", "needs arguments (width)"),
    ("factories:NotAModel", "not a torch.nn.Module subclass"),
    ("factories:__builtins__", "no attribute"),
])
def test_arch_import_string_that_is_not_a_model_factory(work, mlp, arch_dir, target, says):
    folder, marker = arch_dir
    torch.save(mlp.state_dict(), work / "state.pt")
    assert_one_error(invoke("compute", work / "state.pt", work / "x.npy", "--arch", target,
                            "--arch-path", folder), says=says)
    assert not marker.exists()


def test_arch_factory_of_the_users_module_still_works(work, mlp, arch_dir):
    folder, _ = arch_dir
    torch.save(mlp.state_dict(), work / "state.pt")
    result = invoke("compute", work / "state.pt", work / "x.npy", "--arch",
                    "factories:make_mlp", "--arch-path", folder, "--json")
    assert result.exit_code == 0, result.output


def test_spec_file_still_works(work, mlp):
    (work / "spec.json").write_text(json.dumps(MLP_SPEC))
    torch.save(mlp.state_dict(), work / "state.pt")
    result = invoke("compute", work / "state.pt", work / "x.npy", "--arch", work / "spec.json")
    assert result.exit_code == 0, result.output
