"""Renders an Arrow table for the terminal: box (DuckDB's shell style), csv, json, markdown."""
from __future__ import annotations

import csv
import io
import json
import math

import pyarrow as pa

MODES = ("box", "csv", "json", "markdown")


def render(table: pa.Table, mode: str = "box", max_rows: int = 40) -> str:
    if mode == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(table.column_names)
        w.writerows([[_cell(v) for v in r.values()] for r in table.to_pylist()])
        return buf.getvalue().rstrip("\n")
    if mode == "json":
        return json.dumps(table.to_pylist(), default=str, indent=None)
    if mode == "markdown":
        rows = [[_cell(v) for v in r.values()] for r in table.to_pylist()]
        head = "| " + " | ".join(table.column_names) + " |"
        sep = "|" + "|".join("---" for _ in table.column_names) + "|"
        return "\n".join([head, sep] + ["| " + " | ".join(r) + " |" for r in rows])
    return _box(table, max_rows)


def _cell(v) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        return "NaN" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def _box(table: pa.Table, max_rows: int) -> str:
    n = table.num_rows
    shown = table if n <= max_rows else pa.concat_tables([table.slice(0, max_rows // 2),
                                                         table.slice(n - max_rows // 2)])
    cols = table.column_names
    types = [str(f.type) for f in table.schema]
    rows = [[_cell(v) for v in r.values()] for r in shown.to_pylist()]
    if n > max_rows:
        rows.insert(max_rows // 2, ["·"] * len(cols))
    widths = [max([len(c), len(t)] + [len(r[i]) for r in rows]) for i, (c, t) in enumerate(zip(cols, types))]
    numeric = [pa.types.is_integer(f.type) or pa.types.is_floating(f.type) for f in table.schema]

    def line(left, mid, right):
        return left + mid.join("─" * (w + 2) for w in widths) + right

    def row(cells, align=True):
        out = []
        for i, c in enumerate(cells):
            out.append(f" {c.rjust(widths[i]) if (align and numeric[i]) else c.ljust(widths[i])} ")
        return "│" + "│".join(out) + "│"
    lines = [line("┌", "┬", "┐"), row(cols, False), row(types, False), line("├", "┼", "┤")]
    lines += [row(r) for r in rows]
    lines.append(line("└", "┴", "┘"))
    footer = f"{n} row{'s' if n != 1 else ''}" + (f" ({max_rows} shown)" if n > max_rows else "")
    return "\n".join(lines + [footer])
