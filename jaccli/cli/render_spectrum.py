"""Render a spectrum summary: a Rich table with sparklines, bounds, the depth profile; PNGs."""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..errors import JaccliError
from .tables import Column, fitted_table, print_fitted
from .tables import number as _g

_BARS = "▁▂▃▄▅▆▇█"


def sparkline(counts: list[int]) -> str:
    """A one-line histogram, each bin scaled to the largest."""
    if not counts or max(counts) == 0:
        return ""
    top = max(counts)
    return "".join(" " if c == 0 else _BARS[min(7, math.ceil(c / top * 8) - 1)] for c in counts)


def _stat(row: dict, quantity: str, stat: str):
    return row["quantities"].get(quantity, {}).get(stat)


def _spread(row: dict) -> str:
    histogram = row["histogram"]
    if not histogram["counts"]:
        return ""
    low = histogram.get("min", histogram["edges"][0])
    high = histogram.get("max", histogram["edges"][-1])
    return f"{sparkline(histogram['counts'])} [{_g(low)}, {_g(high)}]"


COLUMNS = [
    Column("layer", lambda r: r["name"], "left", wrap=True),
    Column("method", lambda r: _method(r), "left", wrap=True),
    Column("σ_max mean", lambda r: _g(_stat(r, "spectral_norm", "mean"))),
    Column("σ_max p95", lambda r: _g(_stat(r, "spectral_norm", "p95"))),
    Column("σ_min mean", lambda r: _g(r["sigma_min"]["mean"] if r["sigma_min"] else None)),
    Column("cond p50", lambda r: _g(_stat(r, "condition_number", "p50"))),
    Column("‖J‖_F mean", lambda r: _g(_stat(r, "frobenius", "mean"))),
    Column("stable rank", lambda r: _g(_stat(r, "stable_rank", "mean"))),
    Column("σ² mean ± std", lambda r: (f"{_g(r['isometry']['mean_sigma2'])} ± "
                                       f"{_g(r['isometry']['std_sigma2'])}"
                                       if r["isometry"] else "—")),
    Column("singular values", _spread, "left"),
]
# Dropped first to last when the terminal is narrow.
DROP_ORDER = ["singular values", "σ² mean ± std", "stable rank", "σ_max p95", "‖J‖_F mean",
              "σ_min mean"]


def render_spectrum(summary: dict, console: Console) -> None:
    """Per Jacobian: σ_max (mean, p95), σ_min, condition number, Frobenius norm, stable rank,
    σ² mean ± std (isometry: 1 ± 0 is perfect), and the distribution of singular values."""
    console.print(f"jaccli spectrum: {summary['model']} on {summary['data']} "
                  f"({summary['n_samples']} samples, {summary['device']}, {summary['dtype']})",
                  highlight=False)
    table, dropped = fitted_table(console, COLUMNS, summary["entries"], drop_order=DROP_ORDER,
                                  end_section=lambda r: r["kind"] == "end_to_end")
    print_fitted(console, table, dropped)
    tolerances = {f"{r['method']}: σ_max·{r['rank_tolerance']:.1e}"
                  for r in summary["entries"] if r.get("rank_tolerance")}
    if tolerances:
        console.print("singular values at or below the rank tolerance count as zero (condition "
                      f"number inf): {'; '.join(sorted(tolerances))}", highlight=False)
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


def render_spectrum_plan(plan: dict, console: Console) -> None:
    """Print `spectrum --dry-run`: per Jacobian its method, predicted time and memory."""
    from ..units import format_bytes

    table = Table()
    for column, justify in (("layer", "left"), ("D_in → D_out", "right"), ("structure", "left"),
                            ("method", "left"), ("predicted", "right"), ("memory", "right")):
        table.add_column(column, justify=justify)
    for e in plan["entries"]:
        table.add_row(e["name"], f"{e['d_in']} → {e['d_out']}", e["structure"], e["method"],
                      f"{e['seconds']:.3g} s", format_bytes(e["batch_bytes"]),
                      end_section=e["kind"] == "end_to_end")
    console.print(table)
    console.print(f"{plan['n_samples']} samples, batch size {plan['batch_size']}, memory "
                  f"budget {format_bytes(plan['memory_budget_bytes'])}, {plan['device']}, "
                  f"{plan['dtype']}; predicted total {plan['seconds']:.3g} s", highlight=False)
    console.print(plan["note"], highlight=False)
