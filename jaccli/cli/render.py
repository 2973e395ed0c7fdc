"""Everything the CLI prints: Rich tables of summaries, plans, gates and diffs, one JSON
document, progress bars. Results go to stdout; progress, warnings and errors to stderr."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.table import Table

from ..reports.summary import Summary, json_safe
from ..units import format_bytes
from .tables import Column, fitted_table, number, print_fitted


def stdout_console(quiet: bool = False):
    # Rich assumes 80 columns when stdout is not a terminal; tables need more.
    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200
    return Console(file=sys.stdout, quiet=quiet, width=width)


def emit_json(document: Any, quiet: bool = False) -> None:
    """One JSON document on stdout, unwrapped (NaN written as null, infinities as "inf" and
    "-inf")."""
    if quiet:
        return
    sys.stdout.write(json.dumps(json_safe(document), indent=2) + "\n")
    sys.stdout.flush()


@contextmanager
def progress_bar(total: int, enabled: bool | None, label: str = "computing"):
    """A Rich progress bar over samples on stderr, shown when `enabled` (None: when stderr
    is a terminal); yields the callback `(samples done, note=None)`, or None. A note (e.g.
    the layer being decomposed) replaces `label` in front of the bar."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("samples"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n, note=None: progress.update(task, advance=n,
                                                   description=note or label)


def _frobenius_mean(e) -> str:
    warn = f" [red]({e.nonfinite_samples} non-finite)[/red]" if e.nonfinite_samples else ""
    return number(e.frobenius_mean) + warn


COMPUTE_COLUMNS = [
    Column("layer", lambda e: e.name, "left", wrap=True),
    Column("type", lambda e: e.type, "left", wrap=True),
    Column("D_in → D_out", lambda e: f"{e.d_in} → {e.d_out}"),
    Column("Jacobian", lambda e: " × ".join(map(str, e.jacobian_shape))),
    Column("structure", lambda e: e.structure, "left"),
    Column("‖J‖_F mean", _frobenius_mean),
    Column("‖J‖_F max", lambda e: number(e.frobenius_max)),
    Column("time", lambda e: f"{e.seconds:.3f} s"),
]


def render_table(summary: Summary, console: Console) -> None:
    """Print the per-layer table and totals."""
    console.print(f"jaccli {summary.command}: {summary.model} on {summary.data} "
                  f"({summary.n_samples} samples, {summary.device}, {summary.dtype})",
                  highlight=False)
    table, dropped = fitted_table(console, COMPUTE_COLUMNS, summary.entries,
                                  drop_order=["time", "Jacobian", "type", "‖J‖_F max"],
                                  end_section=lambda e: e.kind == "end_to_end")
    print_fitted(console, table, dropped)
    total_time = sum(e.seconds for e in summary.entries)
    where = (f"written to {summary.output} ({format_bytes(summary.output_bytes)})"
             if summary.output else "not saved (pass -o FILE.h5 to keep the Jacobians)")
    console.print(f"{len(summary.entries)} Jacobians × {summary.n_samples} samples in "
                  f"{summary.seconds:.2f} s ({total_time:.2f} s differentiating, batch size "
                  f"{summary.batch_size}); {where}", highlight=False)
    for s in summary.skipped:
        console.print(f"skipped {s['name']} ({s['type']}): {s['reason']}", highlight=False)
    for e in summary.entries:
        if e.note:
            console.print(f"{e.name}: {e.note}", highlight=False)


def render_plan(plan_dict: dict[str, Any], console: Console, *, title: str,
                show_batches: bool = True) -> None:
    """Print a plan (from `Plan.to_dict()`): one row per Jacobian, then the totals."""
    console.print(title, highlight=False)
    if plan_dict.get("engine"):
        console.print(f"engine: {plan_dict['engine']} ({plan_dict['engine_note']})",
                      highlight=False)
    table = Table()
    for column, justify in (("layer", "left"), ("type", "left"), ("input → output", "right"),
                            ("rule", "left"), ("structure", "left"), ("mode", "left"),
                            ("per sample", "right"), ("shared", "right"),
                            ("all samples", "right")):
        table.add_column(column, justify=justify, no_wrap=column not in ("type", "rule"))
    n = plan_dict["n_samples"]
    for e in plan_dict["entries"]:
        table.add_row(e["name"], e["type"],
                      f"{_shape(e['input_shape'])} → {_shape(e['output_shape'])}", e["rule"],
                      e["structure"], e["mode"], format_bytes(e["bytes_per_sample"]),
                      format_bytes(e["shared_bytes"]) if e["shared_bytes"] else "",
                      format_bytes(e["bytes_per_sample"] * n + e["shared_bytes"]),
                      end_section=e["kind"] == "end_to_end")
    console.print(table)
    budget = (f", batch size {plan_dict['batch_size']} ({plan_dict['n_batches']} batches), "
              f"memory budget {format_bytes(plan_dict['memory_budget_bytes'])} "
              f"({plan_dict['memory_budget_source']}){_baseline(plan_dict)}"
              if show_batches else "")
    console.print(f"{n} sample{'s' if n != 1 else ''}{budget}, {plan_dict['device']}, "
                  f"{plan_dict['dtype']}; output {format_bytes(plan_dict['output_bytes'])} "
                  f"(--store {plan_dict['store']}); "
                  f"layers form a chain: {'yes' if plan_dict['chain'] else 'no'}",
                  highlight=False)
    if plan_dict.get("verification_cost") is not None:
        console.print("generic (torch.func) entries are checked against jvp/vjp probes on one "
                      "sample per batch: about "
                      f"{100 * plan_dict['verification_cost']:.1f}% extra", highlight=False)
    if plan_dict.get("output_cap_bytes") is not None:
        free = plan_dict.get("free_bytes")
        fits = plan_dict["output_bytes"] <= plan_dict["output_cap_bytes"]
        console.print(f"output file: {format_bytes(plan_dict['output_bytes'])} of "
                      f"{format_bytes(plan_dict['output_cap_bytes'])} allowed "
                      f"({plan_dict['output_cap_source']}"
                      + (f"; {format_bytes(free)} free" if free is not None else "") + ")"
                      + ("" if fits else " — compressed, so checked as it is written"),
                      highlight=False)
    for s in plan_dict["skipped"]:
        console.print(f"skipped {s['name']} ({s['type']}): {s['reason']}", highlight=False)
    for e in plan_dict["entries"]:
        if e.get("note"):
            console.print(f"{e['name']}: {e['note']}", highlight=False)


def _shape(shape: list[int]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def render_check(result: dict, out) -> None:
    table = Table()
    for column in ("layer", "quantity", "stat", "value", "bound", "", "worst samples"):
        table.add_column(column, justify="right" if column in ("value", "bound") else "left")
    for c in result["checks"]:
        op = "≤" if c["kind"] == "max" else "≥"
        mark = "[green]ok[/green]" if c["passed"] else "[bold red]VIOLATED[/bold red]"
        table.add_row(c["layer"], c["quantity"], c["stat"], f"{c['value']:.6g}",
                      f"{op} {c['bound']:.6g}", mark,
                      ", ".join(map(str, c["worst_samples"])))
    out.print(table)
    for u in result.get("unverified", []):
        out.print(f"[bold red]UNVERIFIED[/bold red]: {u['layer']}: {u['unconverged']} value(s) "
                  f"missed the residual tolerance {u['tolerance']:.1e} (largest residual "
                  f"{u['max_residual']:.1e}); raise --max-steps", highlight=False)
    n_bad = len(result["violations"])
    if n_bad:
        out.print(f"[bold red]FAILED[/bold red]: {n_bad} of {len(result['checks'])} checks "
                  f"violated on {result['n_samples']} samples of {result['data']}")
    else:
        out.print(f"[green]passed[/green]: {len(result['checks'])} checks on "
                  f"{result['n_samples']} samples of {result['data']}")


def render_diff(result: dict, out) -> None:
    table = Table()
    for column in ("layer", "metric", "A", "B", "change", ""):
        table.add_column(column, justify="left" if column in ("layer", "metric", "") else
                         "right")
    for layer in result["layers"]:
        for name, m in layer["metrics"].items():
            rel = m["rel_change"]
            beyond = rel is None or abs(rel) > result["rtol"]
            table.add_row(layer["name"], name, f"{m['a']:.6g}", f"{m['b']:.6g}",
                          "undefined" if rel is None else f"{rel:+.2%}",
                          "[bold red]beyond rtol[/bold red]" if beyond else "")
    out.print(table)
    for name in result["only_in_a"]:
        out.print(f"only in A: {name}", highlight=False)
    for name in result["only_in_b"]:
        out.print(f"only in B: {name}", highlight=False)
    verdict = ("[green]same[/green] within" if result["same"]
               else "[bold red]DIFFERENT[/bold red] beyond")
    out.print(f"{verdict} rtol {result['rtol']:g}: {result['a']} vs {result['b']}")


def render_detail(detail: dict, out) -> None:
    import numpy as np

    head = f"{detail['file']}: {detail['layer']} ({detail['type']}), sample {detail['sample']}"
    if detail["input_shape"]:
        head += (f", input {tuple(detail['input_shape'])} → output "
                 f"{tuple(detail['output_shape'])}")
    out.print(head, highlight=False)
    if "jacobian" in detail:
        matrix = np.asarray(detail["jacobian"])
        out.print(f"Jacobian {matrix.shape[0]} × {matrix.shape[1]} (stored as "
                  f"{detail['encoding']}), ‖J‖_F = {detail['frobenius']:.6g}", highlight=False)
        with np.printoptions(precision=4, suppress=True, linewidth=160, threshold=400):
            out.print(str(matrix), markup=False, highlight=False)
    else:
        values = np.asarray(detail["singular_values"])
        label = "all" if detail["complete"] else f"top {values.size}"
        out.print(f"singular values ({label}, {detail['method']}):", highlight=False)
        with np.printoptions(precision=6, linewidth=160, threshold=400):
            out.print(str(values), markup=False, highlight=False)
        for name, value in detail["quantities"].items():
            out.print(f"{name}: {value:.6g}", highlight=False)


def render_products(summary: dict, out) -> None:
    """One line: what was multiplied, the products' shape and norms, where they went."""
    norm = summary["norm"]
    out.print(f"jaccli {summary['command']}: {summary['layer']} w.r.t. {summary['wrt']}, "
              f"{summary['n_samples']} samples → products {tuple(summary['shape'])}; "
              f"‖product‖ mean {norm['mean']:.6g}, max {norm['max']:.6g}"
              + (f"; written to {summary['output']}" if summary["output"] else ""),
              highlight=False)


def render_hessian(summary: dict, out) -> None:
    """Top eigenvalues, trace and (sparkline) density of a Hessian summary."""
    from .render_spectrum import sparkline

    out.print(f"jaccli hessian: {summary['loss']} loss w.r.t. {summary['wrt']} "
              f"(dimension {summary['dim']}, {summary['n_samples']} samples)", highlight=False)
    if summary["wrt"] == "params":
        values = ", ".join(f"{v:.6g}" for v in summary["eigenvalues"])
        out.print(f"top {len(summary['eigenvalues'])} eigenvalues ({summary['which']}): "
                  f"{values}", highlight=False)
        out.print(f"trace {summary['trace']:.6g} ± {summary['trace_se']:.2g} "
                  "(Hutchinson, standard error)", highlight=False)
    else:
        top, trace = summary["top_eigenvalue"], summary["trace"]
        out.print(f"per-sample top eigenvalue: mean {top['mean']:.6g}, max "
                  f"{top['max']:.6g}; per-sample trace mean {trace['mean']:.6g}",
                  highlight=False)
    if summary.get("unconverged"):
        out.print(f"[bold red]{summary['unconverged']} eigenvalue(s) missed the residual "
                  f"tolerance {summary['tolerance']:.1e}: not trustworthy (float64 or more "
                  "Krylov vectors help)[/bold red]", highlight=False)
    if summary.get("density"):
        counts = summary["density"]["density"]
        scale = max(counts) or 1
        out.print("spectral density: " + sparkline([round(100 * c / scale)
                                                    for c in counts[::8]]), highlight=False)
    if summary["output"]:
        out.print(f"written to {summary['output']}", highlight=False)


def _baseline(plan_dict: dict) -> str:
    """What the process held when planned: outside the budget, said beside it."""
    memory = plan_dict.get("memory")
    if not memory or not memory.get("baseline_bytes"):
        return ""
    return (f" on top of {format_bytes(memory['baseline_bytes'])} already held "
            f"({memory['baseline_source']})")
