"""The benchmark scripts run (quick mode, one small case each) and check their peers agree.
Timings are not asserted here: they are recorded in BENCHMARKS.md by `make bench`."""

import subprocess
import sys

import pytest

from .conftest import ROOT


@pytest.mark.parametrize(("script", "case"), [("bench_jacobians.py", "samples"),
                                              ("bench_params.py", "products")])
def test_benchmark_script_runs(script, case, tmp_path):
    out = tmp_path / "report.md"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick",
                             "--cases", case, "--device", "cpu", "--output", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = out.read_text()
    assert report.startswith("## ") and "| jaccli" in report


def test_unknown_benchmark_case_is_refused():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_spectra.py"),
                             "--cases", "nope"], capture_output=True, text=True)
    assert result.returncode != 0 and "unknown benchmark case(s): nope" in result.stderr
