"""What `jaccli ntk` prints (and `jaccli show` of an ntk file): the kernel's size and trace,
each layer's share of the trace, the spectrum; for --dry-run, each parameter's route."""

from __future__ import annotations

from rich.table import Table

from ..units import format_bytes
from .tables import Column, fitted_table, number, print_fitted

MODE_WORDS = {"full": "Θ", "trace": "Σ_c Θ_cc", "diagonal": "Θ(xᵢ, xᵢ)"}


def _shape(shape) -> str:
    return " × ".join(map(str, shape))


def render_ntk(summary: dict, out) -> None:
    """Kernel, trace, per-layer shares, spectrum, output."""
    kind = "cross kernel Θ(X, X2)" if summary["cross"] else "kernel Θ(X, X)"
    out.print(f"jaccli ntk: {kind}, {MODE_WORDS[summary['mode']]} "
              f"{_shape(summary['kernel_shape'])} ({format_bytes(summary['kernel_bytes'])}, "
              f"{summary['dtype']}, {summary['device']}); {summary['n_samples']} samples"
              + (f" × {summary['m_samples']}" if summary["cross"] else "")
              + f", {summary['n_outputs']} outputs", highlight=False)
    ranks = summary.get("ranks", 1)
    out.print(f"{summary['method']} ({summary['engine']}); {summary['blocks']} block(s) of "
              f"{summary['block_size']} samples"
              + (f", split over {ranks} ranks" if ranks > 1 else ""), highlight=False)
    if summary.get("model_output"):
        out.print(f"output: {summary['model_output']}", highlight=False)
    out.print(f"trace Σᵢ Σ_c Θ(xᵢ, xᵢ)_cc = {summary['trace']:.6g}", highlight=False)
    table = Table(title="share of the trace by layer")
    for column, justify in (("layer", "left"), ("trace", "right"), ("share", "right"),
                            ("", "left")):
        table.add_column(column, justify=justify)
    for row in sorted(summary["layers"], key=lambda r: -r["share"]):
        table.add_row(row["layer"], number(row["trace"]), f"{100 * row['share']:.1f}%",
                      "█" * round(20 * max(row["share"], 0.0)))
    out.print(table)
    spectrum = summary.get("spectrum")
    if spectrum:
        top = ", ".join(f"{v:.6g}" for v in spectrum["top_eigenvalues"])
        out.print(f"spectrum of the {spectrum['size']}×{spectrum['size']} kernel: top "
                  f"{len(spectrum['top_eigenvalues'])} eigenvalues {top}", highlight=False)
        out.print(f"λ_min {spectrum['lambda_min']:.6g}, condition number "
                  f"{number(spectrum['condition'])}, effective rank "
                  f"{spectrum['effective_rank']:.4g}", highlight=False)
    if summary.get("output"):
        what = " with per-layer parts" if summary["per_layer"] else ""
        out.print(f"written to {summary['output']}{what}", highlight=False)


def render_ntk_plan(plan: dict, out) -> None:
    """Each parameter's route and predicted cost; the blocks; the kernel's bytes."""
    out.print(f"jaccli ntk plan: {MODE_WORDS[plan['mode']]} {_shape(plan['kernel_shape'])}"
              + (" (cross kernel)" if plan["cross"] else "")
              + f", engine {plan['engine']}", highlight=False)
    out.print(f"output: {plan['model_output']}, {plan['n_outputs']} values per sample",
              highlight=False)
    columns = [Column("parameter", lambda p: p["name"], "left", wrap=True),
               Column("shape", lambda p: _shape(p["shape"])),
               Column("route", lambda p: p["route"], "left"),
               Column("multiply-adds / pair", lambda p: number(p["pair_multiply_adds"])),
               Column("bytes / sample", lambda p: format_bytes(int(p["bytes_per_sample"]))),
               Column("how", lambda p: p["how"], "left")]
    table, dropped = fitted_table(out, columns, plan["params"], drop_order=["how"])
    print_fitted(out, table, dropped)
    out.print(f"{plan['pairs']} sample pairs: {number(plan['multiply_adds'])} multiply-adds "
              f"in the contractions; blocks of {plan['block_size']} samples, "
              f"{plan['blocks']} block(s), {plan['factor_passes']} factor pass(es)"
              + (" (factors kept)" if plan["cache_factors"] else ""), highlight=False)
    ranks = plan.get("ranks", 1)
    if ranks > 1:
        out.print(f"under torchrun: {ranks} ranks, each computing a run of about "
                  f"{-(-plan['blocks'] // ranks)} of the {plan['blocks']} blocks (rank 0's "
                  "plan: a rank whose memory allows smaller blocks makes them smaller for "
                  "every rank)",
                  highlight=False)
    out.print(f"peak about {format_bytes(int(plan['peak_bytes']))} of the memory budget "
              f"{format_bytes(plan['memory_budget_bytes'])} ({plan['memory_budget_source']}); "
              f"{plan['device']}, {plan['dtype']}", highlight=False)
    held = ", ".join(f"{t['name'].removeprefix('the ')} {format_bytes(int(t['bytes']))}"
                     for t in plan.get("memory_terms", []) if t["bytes"])
    if held:
        out.print(f"a block holds: {held}; beside the budget, the process held "
                  f"{format_bytes(plan['baseline_bytes'])} ({plan['baseline_source']})",
                  highlight=False)
    out.print(f"kernel {format_bytes(plan['kernel_bytes'])}; output "
              f"{format_bytes(plan['output_bytes'])}"
              + (" (with per-layer parts)" if plan["per_layer"] else ""), highlight=False)
