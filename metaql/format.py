"""Renders an Arrow table for the terminal, in the output modes of DuckDB's shell: box and duckbox
(boxes with types), table (ASCII), line (a value a line), list and tabs (separated values), csv,
json, jsonlines, markdown."""
from __future__ import annotations

import csv
import io
import json
import math

import pyarrow as pa

MODES = ("box", "duckbox", "csv", "json", "jsonlines", "line", "list", "markdown", "table", "tabs")
MIN_COLUMN_WIDTH = 8    # a text column narrowed to fit the terminal keeps at least this many characters


def render(table: pa.Table, mode: str = "box", max_rows: int = 40, max_width: int | None = None, *,
           headers: bool = True, nullvalue: str | None = None, separator: str | None = None) -> str:
    """The table as text. `max_rows` (0: all) and `max_width` (None: any) apply to box and duckbox;
    `headers` to csv, list and tabs (as DuckDB's .headers); `nullvalue` replaces each mode's own
    spelling of NULL (json keeps null); `separator` replaces the column separator of list and csv."""
    null = "NULL" if nullvalue is None else nullvalue
    if mode == "csv":
        return csv_text(table, headers, "" if nullvalue is None else nullvalue, separator or ",")
    if mode == "json":
        return json_text(table)
    if mode == "jsonlines":
        return jsonlines_text(table)
    if mode == "markdown":
        return markdown(table, null)
    if mode == "line":
        return line_text(table, null)
    if mode in ("list", "tabs"):
        return list_text(table, headers, null, separator or ("\t" if mode == "tabs" else "|"))
    if mode == "table":
        return ascii_table(table, null)
    if mode == "duckbox":
        return duckbox(table, max_rows, max_width, null)
    return box(table, max_rows, max_width, null)


# ---- machine-readable modes: full precision, NULL as the format's own empty value --------------------
def csv_text(table: pa.Table, headers: bool = True, null: str = "", separator: str = ",") -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=separator, lineterminator="\n") if len(separator) == 1 else None
    lines = [table.column_names] if headers else []
    lines += [[plain(v, null) for v in row] for row in _rows(table)]
    if writer is None:   # the csv module takes one character; a longer separator joins, quoting as needed
        return "\n".join(separator.join(_quoted(c, separator) for c in line) for line in lines)
    writer.writerows(lines)
    return buf.getvalue().rstrip("\n")


def _quoted(cell: str, separator: str) -> str:
    if separator in cell or any(c in cell for c in '"\n\r'):
        return '"' + cell.replace('"', '""') + '"'
    return cell


def plain(v, null: str = "") -> str:
    """A value at full precision, as the text modes (csv, list, line, table) print it."""
    if v is None:
        return null
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def json_text(table: pa.Table) -> str:
    """A JSON array with one object per line, as DuckDB's json mode prints it."""
    lines = [json.dumps({k: _json_value(v) for k, v in row.items()}, default=str) for row in table.to_pylist()]
    return "[" + ",\n".join(lines) + "]"


def jsonlines_text(table: pa.Table) -> str:
    """One JSON object a line (NDJSON), as DuckDB's jsonlines mode prints it."""
    return "\n".join(json.dumps({k: _json_value(v) for k, v in row.items()}, default=str)
                     for row in table.to_pylist())


def _json_value(v):
    # NaN and infinities are not JSON; null keeps the output parseable
    return None if isinstance(v, float) and not math.isfinite(v) else v


def markdown(table: pa.Table, null: str = "NULL") -> str:
    """A GitHub table, numbers right-aligned (`---:`), pipes in cells escaped."""
    rows = [[display(v, null).replace("|", "\\|") for v in row] for row in _rows(table)]
    widths = [max([len(c), 3] + [len(r[i]) for r in rows]) for i, c in enumerate(table.column_names)]
    numeric = _numeric(table)

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if right else c.ljust(w)
                                 for c, w, right in zip(cells, widths, numeric)) + " |"
    rule = "|" + "|".join("-" * (w + 1) + ":" if right else "-" * (w + 2) for w, right in zip(widths, numeric)) + "|"
    return "\n".join([line(table.column_names), rule] + [line(r) for r in rows])


# ---- DuckDB's text modes: full precision, NULL as the shell's nullvalue ----------------------------------
def line_text(table: pa.Table, null: str = "NULL") -> str:
    """A value a line, `name = value` with the names right-aligned, a blank line between rows."""
    width = max([5] + [len(c) for c in table.column_names])    # DuckDB's minimum name width
    return "\n\n".join("\n".join(f"{name.rjust(width)} = {plain(v, null)}" for name, v in zip(table.column_names, row))
                       for row in _rows(table))


def list_text(table: pa.Table, headers: bool = True, null: str = "NULL", separator: str = "|") -> str:
    """A row a line, values joined by `separator` as they are (nothing quoted), names first."""
    lines = [table.column_names] if headers else []
    lines += [[plain(v, null) for v in row] for row in _rows(table)]
    return "\n".join(separator.join(line) for line in lines)


def ascii_table(table: pa.Table, null: str = "NULL") -> str:
    """DuckDB's table mode: `+---+` rules, names centered, values left-aligned."""
    names = table.column_names
    rows = [[plain(v, null).replace("\n", "\\n") for v in row] for row in _rows(table)]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(names)]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def line(cells, align):
        return "| " + " | ".join(align(c, w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([rule, line(names, _center), rule] + [line(r, str.ljust) for r in rows] + [rule])


# ---- box -----------------------------------------------------------------------------------------------
def box(table: pa.Table, max_rows: int = 40, max_width: int | None = None, null: str = "NULL") -> str:
    """DuckDB's box: names and types centered, numbers right-aligned, the middle rows elided with
    `·` rows past `max_rows`, a row-count footer; text columns narrowed with '…' to fit `max_width`."""
    n = table.num_rows
    elided = 0 < max_rows < n
    top = (max_rows + 1) // 2
    shown = pa.concat_tables([table.slice(0, top), table.slice(n - (max_rows - top))]) if elided else table
    names, types, numeric = table.column_names, [type_name(f.type) for f in table.schema], _numeric(table)
    rows = [[display(v, null) for v in row] for row in _rows(shown)]
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


# ---- duckbox -------------------------------------------------------------------------------------------------
def duckbox(table: pa.Table, max_rows: int = 40, max_width: int | None = None, null: str = "NULL") -> str:
    """DuckDB's duckbox: the box with DuckDB's rules for what it leaves out. Rows are elided only past
    `max_rows` + 3 (three `·` rows would show as much), the `·` centred under the values around them;
    past `max_width` text columns narrow, then middle columns give way to a `…` column; a footer
    below the box (`N rows (M shown)  K columns`) shows when rows or columns were left out, when
    there are none, or from 10 rows on."""
    n = table.num_rows
    if 0 < max_rows < n - 3:
        top, bottom = (max_rows + 1) // 2, max_rows - (max_rows + 1) // 2
        shown = pa.concat_tables([table.slice(0, top), table.slice(n - bottom)])
    else:
        top, bottom, shown = n, 0, table
    names, types, numeric = table.column_names, [type_name(f.type) for f in table.schema], _numeric(table)
    rows = [[display(v, null) for v in row] for row in _rows(shown)]
    widths = [max([len(c), len(t)] + [len(r[i]) for r in rows]) for i, (c, t) in enumerate(zip(names, types))]
    columns = list(range(len(names)))
    if max_width:
        widths = _narrowed(widths, [not right for right in numeric], max_width)
        columns = _kept_columns(widths, max_width)
    hidden_rows, hidden_columns = top + bottom < n, len(columns) < len(names)
    rows_text = f"{n} row{'' if n == 1 else 's'}"
    columns_text = f"{len(names)} column{'' if len(names) == 1 else 's'}" + (
        f" ({len(columns)} shown)" if hidden_columns else "")
    shown_text = f"({top + bottom} shown)" if hidden_rows else ""
    cells = [[r[i] if i is not None else "…" for i in _with_gap(columns)] for r in rows]
    head = [[names[i] if i is not None else "…" for i in _with_gap(columns)],
            [types[i] if i is not None else "" for i in _with_gap(columns)]]
    w = [widths[i] if i is not None else 1 for i in _with_gap(columns)]
    right = [numeric[i] if i is not None else False for i in _with_gap(columns)]
    if hidden_rows or n == 0:      # the box is at least as wide as its footer
        need = max(len(rows_text), len(shown_text)) + 4 - (sum(x + 3 for x in w) + 1)
        w[-1] += max(0, need)

    def rule(left, mid, end):
        return left + mid.join("─" * (x + 2) for x in w) + end

    def line(values, aligns):
        return "│" + "│".join(f" {align(_clip(v, x), x)} " for v, x, align in zip(values, w, aligns)) + "│"
    by_type = [str.rjust if r else str.ljust for r in right]
    body = [line(r, by_type) for r in cells]
    if hidden_rows:
        body[top:top] = [line(_dots(cells[top - 1], cells[top], w, right), by_type)] * 3
    lines = [rule("┌", "┬", "┐"), line(head[0], [_center] * len(w)), line(head[1], [_center] * len(w)),
             rule("├", "┼", "┤"), *body, rule("└", "┴", "┘")]
    total = sum(x + 3 for x in w) + 1
    return "\n".join(lines + _footer(total, n, len(names), rows_text, columns_text, shown_text, hidden_columns))


def _kept_columns(widths: list[int], max_width: int) -> list[int]:
    """The columns that fit `max_width` with a `…` column among them: the middle ones go first,
    zig-zag outwards, as DuckDB prunes them."""
    total = sum(w + 3 for w in widths) + 1
    if total <= max_width or len(widths) < 2:
        return list(range(len(widths)))
    total += 4              # the `…` column
    pruned, offset = set(), 0
    while total > max_width and len(pruned) < len(widths) - 1:
        c = len(widths) // 2 + offset
        if 0 <= c < len(widths) and c not in pruned:
            pruned.add(c)
            total -= widths[c] + 3
        offset = -offset - 1 if offset >= 0 else -offset
    return [c for c in range(len(widths)) if c not in pruned]


def _with_gap(columns: list[int]) -> list[int | None]:
    """The kept columns with None where left-out ones were (once)."""
    out = []
    for k, c in enumerate(columns):
        if k and c != columns[k - 1] + 1:
            out.append(None)
        out.append(c)
    return out


def _dots(above: list[str], below: list[str], widths: list[int], right: list[bool]) -> list[str]:
    """A `·` per column, centred under the shorter of the values around the gap."""
    out = []
    for a, b, w, r in zip(above, below, widths, right):
        length = min(len(a), len(b), w) or max(len(a), len(b))
        pad = max(length - 1, 0)
        left = pad - pad // 2 if r else pad // 2
        out.append(" " * left + "·" + " " * (pad - left))
    return out


def _footer(total: int, n: int, ncols: int, rows_text: str, columns_text: str, shown_text: str,
            hidden_columns: bool) -> list[str]:
    both = total >= len(rows_text) + len(columns_text) + 6 and ((hidden_columns and n > 0) or (n >= 10 and ncols > 1))
    rows_only = (n == 0 or n >= 10 or shown_text) and total >= max(len(rows_text), len(shown_text)) + 4
    if not both and not rows_only:
        return []
    padding = total - len(rows_text) - 4 - (len(columns_text) if both else 0)
    extra = ""
    if shown_text and padding >= len(shown_text) + 1:
        extra, padding, shown_text = " " + shown_text, padding - len(shown_text) - 1, ""
    if both:
        lines = ["  " + rows_text + extra + " " * padding + columns_text]
    else:
        lines = ["  " + " " * (padding // 2) + rows_text + extra]
    if shown_text:
        lines.append(("  " + shown_text) if both else _center(shown_text, total).rstrip())
    return lines


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
def display(v, null: str = "NULL") -> str:
    """A value as the box and markdown modes show it (DuckDB's spelling of NULL and booleans)."""
    if v is None:
        return null
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
