"""The README's Python examples run as written (in a folder with the sample models)."""

import os
import re

import pytest

from jaccli.pipelines.compute import run_compute
from jaccli.settings import ComputeSettings

from .conftest import ROOT

compute_settings = ComputeSettings.from_options

BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, capsys):
    os.symlink(ROOT / "sample_models", tmp_path / "sample_models")
    (tmp_path / "out").mkdir()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        run_compute(compute_settings(model=tmp_path / "sample_models/digits_mlp.safetensors",
                                  data=tmp_path / "sample_models/digits_test.npy",
                                  granularity="block", output=tmp_path / "out/mlp.h5"))
        exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), {})
    finally:
        os.chdir(cwd)
    printed = capsys.readouterr().out
    for comment in re.findall(r"# (\(?[\w.+-]+\)?\s+\(.*?\))\s*$", BLOCKS[index], re.MULTILINE):
        assert " ".join(comment.split()) in " ".join(printed.split()), comment
