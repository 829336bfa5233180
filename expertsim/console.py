"""Console output shared by every command: one number formatter, plain-text tables (rich) and
JSON on stdout.

Tables are for a terminal and for pasting into notes: no colours, no frame, a dashed line under
the header, numbers right-aligned; units are in the column names.
"""
from __future__ import annotations

import io
import json

from rich import box
from rich.console import Console
from rich.table import Table

# A frame of spaces with a dashed line under the header (rich's Box: top, head, head_row, mid,
# row, foot_row, foot, bottom; each left, horizontal, divider, right).
_DASHED = box.Box("    \n    \n -  \n    \n    \n    \n    \n    \n", ascii=True)


def format_value(value) -> str:
    """``None`` and NaN as "-", floats to 4 significant digits (thousands separated from 1e5)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:
            return "-"
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def render_table(rows: list[dict], columns: list[str] | None = None, *, right_align: bool = True,
                 max_cell: int | None = None) -> str:
    """``rows`` as an aligned text table. ``right_align``: every column but the first
    right-aligned (numbers line up); else all left. ``max_cell``: cut longer cells with "..."."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])
    table = Table(box=_DASHED, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0), header_style=None,
                  highlight=False)
    for i, column in enumerate(columns):
        table.add_column(column, justify="right" if right_align and i else "left", no_wrap=True)
    for row in rows:
        cells = [format_value(row.get(c)) for c in columns]
        if max_cell:
            cells = [v if len(v) <= max_cell else v[:max_cell - 3] + "..." for v in cells]
        table.add_row(*cells)
    out = io.StringIO()
    Console(file=out, width=100_000, color_system=None, highlight=False, emoji=False, markup=False).print(table)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines())


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    """Print ``rows`` to stdout (see :func:`render_table`)."""
    import typer

    typer.echo(render_table(rows, columns))


def echo_json(obj) -> None:
    """Print ``obj`` as indented JSON to stdout; numpy scalars and arrays as numbers and lists,
    anything else JSON does not know as its ``str``."""
    import typer

    typer.echo(json.dumps(obj, indent=2, sort_keys=False, default=_json_default))


def _json_default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
