"""Tables that fit the terminal: optional columns are dropped, in a stated order, until the
table is as wide as the console (80 or 100 columns stay readable)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table


@dataclass(frozen=True)
class Column:
    """One table column: its header, alignment and how a row fills it."""

    header: str
    cell: Callable[[Any], str]
    justify: str = "right"
    wrap: bool = False  # may fold over several lines (names) instead of being dropped


def fitted_table(console: Console, columns: Sequence[Column], rows: Sequence[Any], *,
                 drop_order: Sequence[str], end_section: Callable[[Any], bool] = lambda r: False
                 ) -> tuple[Table, list[str]]:
    """The table of `rows`, without the columns of `drop_order` (dropped first to last) that
    do not fit `console.width`; returns it and the headers dropped."""
    dropped: list[str] = []
    while True:
        table = Table()
        shown = [c for c in columns if c.header not in dropped]
        for column in shown:
            table.add_column(column.header, justify=column.justify, no_wrap=not column.wrap,
                             overflow="fold" if column.wrap else "ellipsis")
        for row in rows:
            table.add_row(*(c.cell(row) for c in shown), end_section=end_section(row))
        remaining = [h for h in drop_order if h not in dropped]
        natural = console.measure(table, options=console.options.update_width(10**5)).maximum
        if natural <= console.width or not remaining:
            return table, dropped
        dropped.append(remaining[0])


def print_fitted(console: Console, table: Table, dropped: list[str]) -> None:
    console.print(table)
    if dropped:
        console.print(f"(to fit {console.width} columns, not shown: {', '.join(dropped)}; "
                      "widen the terminal or use --json)", highlight=False)


def number(value) -> str:
    """A number in 4 significant digits; infinities as `inf`, missing values as `—`."""
    if value is None:
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return f"{value:.4g}"
