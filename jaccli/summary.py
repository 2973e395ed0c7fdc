"""The facts a run reports, built once and rendered as a Rich table or as JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from .memory import format_bytes

SCHEMA = "jaccli/compute-summary"
SCHEMA_VERSION = 1


@dataclass
class EntrySummary:
    """One Jacobian's statistics over samples (Frobenius norms of the (D_out, D_in) matrices)."""

    name: str
    kind: str
    type: str
    d_in: int
    d_out: int
    jacobian_shape: list[int]
    frobenius_mean: float
    frobenius_max: float
    seconds: float
    nonfinite_samples: int = 0
    structure: str = "dense"
    rule: str = ""

    @classmethod
    def from_norms(cls, *, name: str, kind: str, type_name: str, d_in: int, d_out: int,
                   frobenius: np.ndarray, seconds: float, structure: str = "dense",
                   rule: str = "") -> EntrySummary:
        """Statistics of per-sample Frobenius norms `frobenius`, shape (N,)."""
        finite = frobenius[np.isfinite(frobenius)]
        return cls(name, kind, type_name, d_in, d_out, [len(frobenius), d_out, d_in],
                   float(finite.mean()) if finite.size else float("nan"),
                   float(finite.max()) if finite.size else float("nan"),
                   float(seconds), int(len(frobenius) - finite.size), structure, rule)


@dataclass
class Summary:
    """What `jaccli compute` did: inputs, settings, one row per Jacobian, totals."""

    model: str
    model_format: str
    data: str
    n_samples: int
    device: str
    dtype: str
    granularity: str
    batch_size: int
    chain: bool
    entries: list[EntrySummary]
    skipped: list[dict[str, str]] = field(default_factory=list)
    output: str | None = None
    output_bytes: int = 0
    seconds: float = 0.0
    command: str = "compute"

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, **asdict(self)}


def render_table(summary: Summary, console: Console) -> None:
    """Print the per-layer table and totals."""
    console.print(f"jaccli {summary.command}: {summary.model} on {summary.data} "
                  f"({summary.n_samples} samples, {summary.device}, {summary.dtype})",
                  highlight=False)
    table = Table()
    for column, justify in (("layer", "left"), ("type", "left"), ("D_in → D_out", "right"),
                            ("Jacobian", "right"), ("structure", "left"),
                            ("‖J‖_F mean", "right"), ("‖J‖_F max", "right"),
                            ("time", "right")):
        table.add_column(column, justify=justify, no_wrap=column != "type")
    for e in summary.entries:
        shape = " × ".join(map(str, e.jacobian_shape))
        warn = f" [red]({e.nonfinite_samples} non-finite)[/red]" if e.nonfinite_samples else ""
        table.add_row(e.name, e.type, f"{e.d_in} → {e.d_out}", shape, e.structure,
                      f"{e.frobenius_mean:.4g}{warn}", f"{e.frobenius_max:.4g}",
                      f"{e.seconds:.3f} s", end_section=e.kind == "end_to_end")
    console.print(table)
    total_time = sum(e.seconds for e in summary.entries)
    where = (f"written to {summary.output} ({format_bytes(summary.output_bytes)})"
             if summary.output else "not saved (pass -o FILE.h5 to keep the Jacobians)")
    console.print(f"{len(summary.entries)} Jacobians × {summary.n_samples} samples in "
                  f"{summary.seconds:.2f} s ({total_time:.2f} s differentiating, batch size "
                  f"{summary.batch_size}); {where}", highlight=False)
    for s in summary.skipped:
        console.print(f"skipped {s['name']} ({s['type']}): {s['reason']}", highlight=False)


def finite_or_none(value: Any) -> Any:
    """JSON has no NaN or Infinity: write them as null."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    return value


def render_plan(plan_dict: dict[str, Any], console: Console, *, title: str,
                show_batches: bool = True) -> None:
    """Print a plan (from `Plan.to_dict()`): one row per Jacobian, then the totals."""
    console.print(title, highlight=False)
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
              f"({plan_dict['memory_budget_source']})" if show_batches else "")
    console.print(f"{n} sample{'s' if n != 1 else ''}{budget}, {plan_dict['device']}, "
                  f"{plan_dict['dtype']}; output {format_bytes(plan_dict['output_bytes'])} "
                  f"(--store {plan_dict['store']}); "
                  f"layers form a chain: {'yes' if plan_dict['chain'] else 'no'}",
                  highlight=False)
    for s in plan_dict["skipped"]:
        console.print(f"skipped {s['name']} ({s['type']}): {s['reason']}", highlight=False)


def _shape(shape: list[int]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"
