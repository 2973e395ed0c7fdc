"""`jaccli spectrum --dry-run`: per Jacobian the method, a predicted time and memory; nothing
is computed and no output file is written."""

import json
import math

from typer.testing import CliRunner

from jaccli.cli import app

runner = CliRunner()
MLP = "sample_models/digits_mlp.safetensors"
DATA = "sample_models/digits_test.npy"


def test_dry_run_lists_method_time_and_memory_and_writes_nothing(tmp_path):
    out = tmp_path / "s.h5"
    result = runner.invoke(app, ["spectrum", MLP, DATA, "--limit", "16", "--dry-run", "--json",
                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert not out.exists()
    methods = {e["type"]: e["method"] for e in plan["entries"] if e["kind"] == "layer"}
    assert methods["Linear"] == "exact structured"  # one shared matrix
    assert methods["Tanh"] == "exact structured"  # a diagonal
    for e in plan["entries"]:
        assert math.isfinite(e["seconds"]) and e["seconds"] > 0, e
        assert e["batch_bytes"] >= 0
    assert plan["n_samples"] == 16


def test_dry_run_top_k_of_a_large_dense_jacobian_names_lanczos():
    result = runner.invoke(app, ["spectrum", MLP, DATA, "--limit", "4", "--dry-run", "--json",
                                 "--no-layers", "--top-k", "2", "--max-memory", "1MB"])
    assert result.exit_code == 0, result.output
    (entry,) = json.loads(result.stdout)["entries"]
    assert entry["kind"] == "end_to_end"
    assert entry["method"] == "Lanczos (top 2)", entry


def test_dry_run_table_prints_every_layer():
    result = runner.invoke(app, ["spectrum", MLP, DATA, "--limit", "4", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "predicted total" in result.stdout and "exact structured" in result.stdout


def test_progress_reports_each_layer_and_every_sample():
    from jaccli.pipelines.spectrum import run_spectrum
    from jaccli.settings import SpectrumSettings

    settings = SpectrumSettings.from_options(model=MLP, data=DATA, limit=6, batch_size=4,
                                             profile=False)
    calls = []
    run_spectrum(settings, on_batch=lambda n, note=None: calls.append((n, note)))
    notes = [note for _, note in calls]
    layers = len(notes) // 2  # two batches: 4 + 2 samples
    assert notes[:layers] == notes[layers:] and notes[0].startswith(f"layer 1/{layers} ")
    assert abs(sum(n for n, _ in calls) - 6) < 1e-9
