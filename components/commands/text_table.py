"""Tables for a terminal: fixed-width text that fits its width (`skinlesion runs`, `exp show`).

Long cells are cut (ending in "~"), then the least useful columns are left out, one by one,
until every line fits; a last line names what was left out. `--wide` prints every column
whole. pandas' own to_string wraps a wide table into blocks instead, which is harder to read.
"""
from __future__ import annotations

import shutil
import textwrap

import pandas as pd

MAX_CELL = 34
SHORT_METRICS = {"balanced_accuracy": "bal_acc", "melanoma_sensitivity": "mel_sens",
                 "accuracy": "acc", "f1_macro": "f1"}  # in this order: bal_acc keeps its acc


def terminal_width() -> int:
    """The terminal's width (COLUMNS when set); 120 when the output is not a terminal."""
    return shutil.get_terminal_size((120, 24)).columns


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)) or value == "":
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def render(table: pd.DataFrame, max_cell: int | None = None) -> str:
    """Fixed-width text; floats with 4 decimals, empty cells as '-', cells longer than
    `max_cell` cut except in the last column (nothing comes after it)."""
    cut = (lambda s: s if max_cell is None or len(s) <= max_cell  # noqa: E731
           else s[:max_cell - 1] + "~")
    last = len(table.columns) - 1
    cells = [[_cell(v) if i == last else cut(_cell(v)) for i, v in enumerate(row)]
             for row in table.itertuples(index=False)]
    widths = [max(len(str(c)), *(len(r[i]) for r in cells)) for i, c in enumerate(table.columns)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(table.columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def short_header(column: str) -> str:
    """A metric column's header in a narrow table: `val_balanced_accuracy` -> `val_bal_acc`."""
    for long, short in SHORT_METRICS.items():
        column = column.replace(long, short)
    return column


def fit(table: pd.DataFrame, drop_order: list[str], width: int | None = None,
        wide: bool = False) -> str:
    """`table` as text no wider than `width` (default: the terminal's), with short metric
    headers, leaving out columns in `drop_order`'s order as needed; `wide`: every column
    whole, with its full name."""
    if table.empty:
        return "(none)"
    if wide:
        return render(table)
    width = width or terminal_width()

    def without(columns: list[str]) -> str | None:
        text = render(table.drop(columns=columns).rename(columns=short_header), MAX_CELL)
        return text if max(map(len, text.splitlines())) <= width else None

    candidates = [c for c in drop_order if c in table.columns]
    left_out = next((candidates[:n] for n in range(len(candidates) + 1)
                     if without(candidates[:n]) is not None), candidates)
    for column in reversed(left_out[:-1]):  # one left out early may fit beside what is left
        if without([c for c in left_out if c != column]) is not None:
            left_out.remove(column)
    text = without(left_out) or render(table.drop(columns=left_out), MAX_CELL)
    if left_out:
        text += "\n" + textwrap.fill(f"(left out to fit {width} columns: {', '.join(left_out)}; "
                                     f"--wide shows all)", width)
    return text
