"""The package's shape stays what docs promise: imports run one way between the layers
(cli → pipelines → graph / engine / spectra / params → io and tracing), modules stay small and
say their job, and the torch-free parts import no torch."""

import ast
import subprocess
import sys

import pytest

from .conftest import ROOT

PACKAGE = ROOT / "jaccli"
FOUNDATION = {"errors", "settings", "units", "jaccli"}  # "jaccli": the package root
# Which layers each layer may import (its own layer and the foundation always).
ALLOWED = {
    "cli": {"pipelines", "reports"},
    "api": {"pipelines", "graph", "engine", "spectra", "params", "tracing", "io"},
    "pipelines": {"graph", "engine", "spectra", "params", "reports", "io", "tracing"},
    "spectra": {"engine", "tracing"},
    "params": {"engine", "spectra", "tracing"},
    "graph": {"engine"},
    "engine": {"tracing"},
    "reports": {"io"},
    "tracing": set(),
    "io": set(),
    **{name: set() for name in FOUNDATION},
    "__main__": {"cli"},
}
TORCH_FREE = ["jaccli.cli", "jaccli.reports.show", "jaccli.reports.check",
              "jaccli.reports.diff", "jaccli.io.results", "jaccli.settings", "jaccli.units"]
MAX_LINES = 350


def modules():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def module_name(path) -> list[str]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def layer(parts: list[str]) -> str:
    """`jaccli.pipelines.compute` -> pipelines; `jaccli.errors` -> errors; `jaccli` -> jaccli."""
    return parts[1] if len(parts) > 1 else "jaccli"


def imported(path) -> list[list[str]]:
    """Every jaccli module `path` imports (top level or inside functions), as name parts."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [n.name.split(".") for n in node.names if n.name.split(".")[0] == "jaccli"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "jaccli":
                target = node.module.split(".")
            else:
                continue
            found.append(target)
    return found


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_layers(path):
    source = layer(module_name(path))
    allowed = ALLOWED[source] | FOUNDATION | {source}
    wrong = [".".join(t) for t in imported(path) if layer(t) not in allowed]
    assert not wrong, f"{source} must not import {wrong}"


def test_the_layer_check_sees_violations(tmp_path):
    """The checker itself: a relative import two levels up is resolved to its layer."""
    fake = PACKAGE / "io" / "_probe_for_test.py"
    fake.write_text("from ..pipelines import common\nfrom ...jaccli import errors\n")
    try:
        assert [layer(t) for t in imported(fake)] == ["pipelines", "jaccli"]
    finally:
        fake.unlink()


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_are_small_and_say_their_job(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_LINES
    if path.name != "__main__.py":
        doc = ast.get_docstring(ast.parse(text))
        assert doc and doc.splitlines()[0].strip(), "the first line must say the module's job"


def test_torch_free_parts_import_no_torch():
    probe = ("import sys\n" + "".join(f"import {m}\n" for m in TORCH_FREE)
             + "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
