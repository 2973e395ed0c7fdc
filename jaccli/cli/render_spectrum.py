"""Render a spectrum summary: a Rich table with sparklines, bounds, the depth profile; PNGs."""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..errors import JaccliError

_BARS = "▁▂▃▄▅▆▇█"


def sparkline(counts: list[int]) -> str:
    """A one-line histogram, each bin scaled to the largest."""
    if not counts or max(counts) == 0:
        return ""
    top = max(counts)
    return "".join(" " if c == 0 else _BARS[min(7, math.ceil(c / top * 8) - 1)] for c in counts)


def _g(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return f"{value:.4g}"


def _stat(row: dict, quantity: str, stat: str):
    return row["quantities"].get(quantity, {}).get(stat)


def render_spectrum(summary: dict, console: Console) -> None:
    """Per Jacobian: σ_max (mean, p95), σ_min, condition number, Frobenius norm, stable rank,
    σ² mean ± std (isometry: 1 ± 0 is perfect), and the distribution of singular values."""
    console.print(f"jaccli spectrum: {summary['model']} on {summary['data']} "
                  f"({summary['n_samples']} samples, {summary['device']}, {summary['dtype']})",
                  highlight=False)
    table = Table()
    for column, justify in (("layer", "left"), ("method", "left"), ("σ_max mean", "right"),
                            ("σ_max p95", "right"), ("σ_min mean", "right"),
                            ("cond p50", "right"), ("‖J‖_F mean", "right"),
                            ("stable rank", "right"), ("σ² mean ± std", "right"),
                            ("singular values", "left")):
        table.add_column(column, justify=justify, no_wrap=True,
                         min_width=10 if column == "method" else None)
    for row in summary["entries"]:
        sigma_min = row["sigma_min"]["mean"] if row["sigma_min"] else None
        iso = row["isometry"]
        edges = row["histogram"]["edges"]
        spread = f" [{_g(edges[0])}, {_g(edges[-1])}]" if edges else ""
        table.add_row(
            row["name"], _method(row), _g(_stat(row, "spectral_norm", "mean")),
            _g(_stat(row, "spectral_norm", "p95")), _g(sigma_min),
            _g(_stat(row, "condition_number", "p50")), _g(_stat(row, "frobenius", "mean")),
            _g(_stat(row, "stable_rank", "mean")),
            f"{_g(iso['mean_sigma2'])} ± {_g(iso['std_sigma2'])}" if iso else "—",
            sparkline(row["histogram"]["counts"]) + spread,
            end_section=row["kind"] == "end_to_end")
    console.print(table)
    bounds = summary.get("bounds")
    if bounds:
        console.print(
            f"Lipschitz along the chain: product of layer spectral norms (upper bound) mean "
            f"{_g(bounds['layer_product']['mean'])}, measured end-to-end spectral norm mean "
            f"{_g(bounds['end_to_end']['mean'])} (max {_g(bounds['end_to_end']['max'])}); "
            f"bound / measured: median {_g(bounds['ratio']['p50'])}", highlight=False)
    if summary.get("profile"):
        console.print("dynamical isometry through depth: σ² of the Jacobian from the model "
                      "input to each layer's output", highlight=False)
        profile = Table()
        for column in ("layer", "mean σ²", "var σ²"):
            profile.add_column(column, justify="left" if column == "layer" else "right")
        for p in summary["profile"]:
            profile.add_row(p["layer"], _g(p["mean_sigma2"]), _g(p["var_sigma2"]))
        console.print(profile)
    elif summary.get("profile_note"):
        console.print(f"no depth profile: {summary['profile_note']}", highlight=False)
    for row in summary["entries"]:
        if row["note"]:
            console.print(f"{row['name']}: {row['note']}", highlight=False)
        if row.get("unconverged"):
            console.print(
                f"[bold red]{row['name']}: {row['unconverged']} value(s) missed the residual "
                f"tolerance {row['tolerance']:.1e} (largest residual "
                f"{row['max_residual']:.1e}): they are not trustworthy; raise --max-steps"
                "[/bold red]", highlight=False)
    where = f"written to {summary['output']}" if summary.get("output") else \
        "not saved (pass -o FILE.h5 to keep the spectra)"
    console.print(f"{len(summary['entries'])} spectra in {summary.get('seconds', 0):.2f} s; "
                  f"{where}", highlight=False)


def _method(row: dict) -> str:
    method = row["method"]
    if not row["complete"]:
        residual = row.get("max_residual")
        method += f", top {row['k']}" + (f" (residual ≤ {residual:.1e})"
                                         if residual is not None else "")
    if row.get("unconverged"):
        method += f" [bold red]{row['unconverged']} UNCONVERGED[/bold red]"
    return method


def write_plots(summary: dict, directory: Path) -> list[Path]:
    """PNG histograms of each layer's singular values and the depth profile."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise JaccliError("--plot needs matplotlib: pip install 'jaccli[plot]' (or pip "
                          "install matplotlib)") from exc
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise JaccliError(f"cannot create the --plot folder {directory}: "
                          f"{exc.strerror}") from exc
    written = []
    for index, row in enumerate(summary["entries"]):
        edges, counts = row["histogram"]["edges"], row["histogram"]["counts"]
        if not counts:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.stairs(counts, edges, fill=True)
        ax.set_xlabel("singular value")
        ax.set_ylabel("count (all samples)")
        ax.set_title(f"{row['name']} ({row['type']})")
        fig.tight_layout()
        path = directory / f"{index:02d}_{_safe(row['name'])}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    if summary.get("profile"):
        fig, ax = plt.subplots(figsize=(5, 3.2))
        names = [p["layer"] for p in summary["profile"]]
        ax.errorbar(range(len(names)), [p["mean_sigma2"] for p in summary["profile"]],
                    yerr=[max(p["var_sigma2"], 0) ** 0.5 for p in summary["profile"]],
                    marker="o", capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_ylabel("mean σ² of J_{1:l} (± std)")
        ax.set_title("dynamical isometry through depth")
        fig.tight_layout()
        path = directory / "depth_profile.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
