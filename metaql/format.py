"""Renders an Arrow table for the terminal: box (DuckDB's shell style), csv, json, markdown."""
from __future__ import annotations

import csv
import io
import json
import math

import pyarrow as pa

MODES = ("box", "csv", "json", "markdown")
MIN_COLUMN_WIDTH = 8    # a text column narrowed to fit the terminal keeps at least this many characters


def render(table: pa.Table, mode: str = "box", max_rows: int = 40, max_width: int | None = None) -> str:
    """The table as text; `max_rows` (0: all) and `max_width` (None: any) apply to box mode."""
    if mode == "csv":
        return csv_text(table)
    if mode == "json":
        return json_text(table)
    if mode == "markdown":
        return markdown(table)
    return box(table, max_rows, max_width)


# ---- machine-readable modes: full precision, NULL as the format's own empty value --------------------
def csv_text(table: pa.Table) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(table.column_names)
    writer.writerows([[_csv_cell(v) for v in row] for row in _rows(table)])
    return buf.getvalue().rstrip("\n")


def _csv_cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def json_text(table: pa.Table) -> str:
    """A JSON array with one object per line, as DuckDB's json mode prints it."""
    lines = [json.dumps({k: _json_value(v) for k, v in row.items()}, default=str) for row in table.to_pylist()]
    return "[" + ",\n".join(lines) + "]"


def _json_value(v):
    # NaN and infinities are not JSON; null keeps the output parseable
    return None if isinstance(v, float) and not math.isfinite(v) else v


def markdown(table: pa.Table) -> str:
    """A GitHub table, numbers right-aligned (`---:`), pipes in cells escaped."""
    rows = [[display(v).replace("|", "\\|") for v in row] for row in _rows(table)]
    widths = [max([len(c), 3] + [len(r[i]) for r in rows]) for i, c in enumerate(table.column_names)]
    numeric = _numeric(table)

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if right else c.ljust(w)
                                 for c, w, right in zip(cells, widths, numeric)) + " |"
    rule = "|" + "|".join("-" * (w + 1) + ":" if right else "-" * (w + 2) for w, right in zip(widths, numeric)) + "|"
    return "\n".join([line(table.column_names), rule] + [line(r) for r in rows])


# ---- box -----------------------------------------------------------------------------------------------
def box(table: pa.Table, max_rows: int = 40, max_width: int | None = None) -> str:
    """DuckDB's box: names and types centered, numbers right-aligned, the middle rows elided with
    `·` rows past `max_rows`, a row-count footer; text columns narrowed with '…' to fit `max_width`."""
    n = table.num_rows
    elided = 0 < max_rows < n
    top = (max_rows + 1) // 2
    shown = pa.concat_tables([table.slice(0, top), table.slice(n - (max_rows - top))]) if elided else table
    names, types, numeric = table.column_names, [type_name(f.type) for f in table.schema], _numeric(table)
    rows = [[display(v) for v in row] for row in _rows(shown)]
    widths = [max([len(c), len(t)] + [len(r[i]) for r in rows]) for i, (c, t) in enumerate(zip(names, types))]
    if max_width:
        widths = _narrowed(widths, [not right for right in numeric], max_width)

    def rule(left, mid, right):
        return left + mid.join("─" * (w + 2) for w in widths) + right

    def line(cells, aligns):
        return "│" + "│".join(f" {align(_clip(c, w), w)} " for c, w, align in zip(cells, widths, aligns)) + "│"
    centered = [_center] * len(names)
    by_type = [str.rjust if right else str.ljust for right in numeric]
    body = [line(r, by_type) for r in rows]
    if elided:
        body[top:top] = [line(["·"] * len(names), by_type)] * 3
    lines = [rule("┌", "┬", "┐"), line(names, centered), line(types, centered), rule("├", "┼", "┤"),
             *body, rule("└", "┴", "┘")]
    footer = f"{n} row{'' if n == 1 else 's'}" + (f" ({max_rows} shown)" if elided else "")
    return "\n".join(lines + [footer])


def _narrowed(widths: list[int], narrowable: list[bool], max_width: int) -> list[int]:
    """Column widths with the widest narrowable (text) columns trimmed until the box (3 characters
    per column around the content, plus 1) fits `max_width`, none below MIN_COLUMN_WIDTH. Numbers
    are never cut: a clipped number would read as another number."""
    widths = list(widths)
    excess = sum(w + 3 for w in widths) + 1 - max_width
    candidates = [i for i, ok in enumerate(narrowable) if ok]
    while excess > 0 and candidates:
        widest = max(candidates, key=widths.__getitem__)
        if widths[widest] <= MIN_COLUMN_WIDTH:
            break
        widths[widest] -= 1
        excess -= 1
    return widths


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _center(text: str, width: int) -> str:
    left = (width - len(text)) // 2     # the odd space goes right, as in DuckDB
    return " " * left + text.ljust(width - left)


# ---- cells and types -------------------------------------------------------------------------------------
def display(v) -> str:
    """A value as the box and markdown modes show it (DuckDB's spelling of NULL and booleans)."""
    if v is None:
        return "NULL"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.6g}"
    # a line break or tab inside a cell would break the table's lines
    return str(v).replace("\n", "\\n").replace("\t", "\\t")


def type_name(t: pa.DataType) -> str:
    """DuckDB's name for an Arrow type, as its box header shows it."""
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "varchar"
    if pa.types.is_boolean(t):
        return "boolean"
    if pa.types.is_float32(t):
        return "float"
    if pa.types.is_float64(t):
        return "double"
    if pa.types.is_timestamp(t):
        return "timestamp with time zone" if t.tz else "timestamp"
    if pa.types.is_date(t):
        return "date"
    if pa.types.is_decimal(t):
        return f"decimal({t.precision},{t.scale})"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "blob"
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return type_name(t.value_type) + "[]"
    if pa.types.is_dictionary(t):
        return type_name(t.value_type)
    return str(t)


def _numeric(table: pa.Table) -> list[bool]:
    return [pa.types.is_integer(f.type) or pa.types.is_floating(f.type) or pa.types.is_decimal(f.type)
            for f in table.schema]


def _rows(table: pa.Table) -> list[tuple]:
    # column by column: to_pylist()'s dicts would merge columns that share a name
    return list(zip(*(column.to_pylist() for column in table.columns)))
