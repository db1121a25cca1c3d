"""The shell's four output modes: box (DuckDB's look), csv, json, markdown."""
import datetime
import json

import pyarrow as pa

from metaql.format import box, render, type_name

TABLE = pa.table({"split": ["train", "test", None], "n": [48, 16, 3], "score": [0.5, -1.25e-7, float("nan")],
                  "ok": [True, None, False]})


def test_box_looks_like_duckdbs():
    assert render(TABLE, "box").splitlines() == [
        "┌─────────┬───────┬───────────┬─────────┐",
        "│  split  │   n   │   score   │   ok    │",
        "│ varchar │ int64 │  double   │ boolean │",
        "├─────────┼───────┼───────────┼─────────┤",
        "│ train   │    48 │       0.5 │ true    │",
        "│ test    │    16 │ -1.25e-07 │ NULL    │",
        "│ NULL    │     3 │       nan │ false   │",
        "└─────────┴───────┴───────────┴─────────┘",
        "3 rows",
    ]


def test_box_elides_the_middle_rows_past_maxrows():
    table = pa.table({"i": list(range(100)), "s": [f"s{i}" for i in range(100)]})
    lines = box(table, max_rows=6).splitlines()
    body = [line for line in lines if line.startswith("│")][2:]
    assert body == ["│     0 │ s0      │", "│     1 │ s1      │", "│     2 │ s2      │",
                    "│     · │ ·       │", "│     · │ ·       │", "│     · │ ·       │",
                    "│    97 │ s97     │", "│    98 │ s98     │", "│    99 │ s99     │"]
    assert lines[-1] == "100 rows (6 shown)"
    assert "·" not in box(table, max_rows=0) and box(table, max_rows=0).count("\n") == 100 + 5
    assert box(table.slice(0, 1)).splitlines()[-1] == "1 row"
    assert box(table.slice(0, 0)).splitlines()[-2:] == ["└───────┴─────────┘", "0 rows"]


def test_box_narrows_text_columns_to_the_width_but_never_numbers():
    table = pa.table({"name": ["x" * 60], "note": ["a line\nbreak"], "big": [123456789012]})
    lines = box(table, max_width=50).splitlines()
    assert all(len(line) <= 50 for line in lines[:-1])
    assert "123456789012" in lines[4] and "xxxx…" in lines[4]
    assert "a line\\nbreak" in box(table)   # a line break stays inside its cell


def test_type_names_are_duckdbs():
    assert [type_name(t) for t in (pa.string(), pa.int32(), pa.float32(), pa.float64(), pa.bool_(),
                                   pa.timestamp("us"), pa.list_(pa.int64()), pa.decimal128(5, 2))] == [
        "varchar", "int32", "float", "double", "boolean", "timestamp", "int64[]", "decimal(5,2)"]


def test_csv_keeps_full_precision_and_empty_nulls():
    assert render(TABLE, "csv").splitlines() == [
        "split,n,score,ok", "train,48,0.5,true", "test,16,-1.25e-07,", ",3,nan,false"]
    quoted = render(pa.table({"s": ['a,"b"']}), "csv")
    assert quoted.splitlines() == ["s", '"a,""b"""']
    assert render(pa.table({"x": [1 / 3]}), "csv").splitlines()[1] == repr(1 / 3)


def test_json_is_one_valid_array_with_a_row_a_line():
    text = render(TABLE, "json")
    assert len(text.splitlines()) == 3
    assert json.loads(text) == [{"split": "train", "n": 48, "score": 0.5, "ok": True},
                                {"split": "test", "n": 16, "score": -1.25e-7, "ok": None},
                                {"split": None, "n": 3, "score": None, "ok": False}]   # NaN is no JSON
    assert render(pa.table({"t": [datetime.date(2024, 1, 2)]}), "json") == '[{"t": "2024-01-02"}]'
    assert render(TABLE.slice(0, 0), "json") == "[]"


def test_markdown_aligns_numbers_right_and_escapes_pipes():
    table = pa.table({"name": ["a|b", "c"], "n": [5, 10]})
    assert render(table, "markdown").splitlines() == [
        "| name |   n |",
        "|------|----:|",
        "| a\\|b |   5 |",
        "| c    |  10 |",
    ]
