"""The benchmark scripts run (quick mode, one small case each) and check their peers agree.
Timings are not asserted here: they are recorded in BENCHMARKS.md by `make bench`."""

import runpy
import sys

import pytest

from .conftest import ROOT


@pytest.mark.parametrize(("script", "case"), [("bench_jacobians.py", "samples"),
                                              ("bench_params.py", "products")])
def test_benchmark_script_runs(script, case, tmp_path, monkeypatch):
    out = tmp_path / "report.md"
    path = ROOT / "benchmarks" / script
    monkeypatch.setattr(sys, "argv", [str(path), "--quick", "--cases", case, "--device", "cpu",
                                      "--output", str(out)])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script adds benchmarks/ to it
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as stopped:
        assert stopped.code in (None, 0), stopped.code
    report = out.read_text()
    assert report.startswith("## ") and "| jaccli" in report


def test_unknown_benchmark_case_is_refused(monkeypatch):
    script = ROOT / "benchmarks" / "bench_spectra.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--cases", "nope"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script adds benchmarks/ to it
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(script), run_name="__main__")
    assert "unknown benchmark case(s): nope" in str(stopped.value.code)
