"""The shell at DuckDB's level (issue #18): DuckDB's options (-csv, -json, -line, -markdown,
-readonly, several -c, statements after the store), its output modes (line, list, tabs, table,
jsonlines, duckbox), its dot commands (.output, .once, .schema, .headers, .nullvalue, .separator,
.maxwidth, .echo, .print, .shell), warnings as one line, and one Ctrl-C stopping any statement.
Outputs are compared with DuckDB's formats (tools/shell/tests/test_rendering_mode_regression.py in
DuckDB's repository); machine-readable ones are parsed back."""
import csv
import io
import json
import os
import shutil
import signal
import sys
import threading
import time
import warnings

import numpy as np
import pyarrow as pa
import pytest

import metaql
from metaql import cli
from metaql.format import render
from metaql.shell import DOT_COMMANDS, Shell

TABLE = pa.table({"split": ["train", "test", None], "n": [48, 16, 3], "score": [0.5, -1.25e-7, float("nan")],
                  "ok": [True, None, False]})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store without captures (plain SQL is all these tests need): 12 samples, a set, a table."""
    path = str(tmp_path_factory.mktemp("duck") / "s.mq")
    with metaql.connect(path) as con:
        con.add_samples(np.arange(12), split="train", labels=np.arange(12) % 3)
        con.execute("CREATE SET few AS SELECT sample_id FROM samples WHERE sample_id < 3")
        con.execute("CREATE TABLE notes AS SELECT 1 AS id, NULL::VARCHAR AS txt")
    return path


@pytest.fixture
def path(store, tmp_path):
    return shutil.copytree(store, str(tmp_path / "s.mq"))


@pytest.fixture
def shell(path):
    with Shell(path, out=io.StringIO(), err=io.StringIO()) as sh:
        yield sh


def outputs(sh: Shell) -> tuple[str, str]:
    out, err = sh.out.getvalue(), sh.err.getvalue()
    for stream in (sh.out, sh.err):
        stream.seek(0)
        stream.truncate()
    return out, err


# ---- modes ------------------------------------------------------------------------------------------------
def test_line_list_tabs_and_table_modes_print_as_duckdbs():
    assert render(TABLE, "line").splitlines() == [
        "split = train", "    n = 48", "score = 0.5", "   ok = true", "",
        "split = test", "    n = 16", "score = -1.25e-07", "   ok = NULL", "",
        "split = NULL", "    n = 3", "score = nan", "   ok = false"]
    assert render(TABLE, "list").splitlines() == [
        "split|n|score|ok", "train|48|0.5|true", "test|16|-1.25e-07|NULL", "NULL|3|nan|false"]
    assert render(TABLE, "list", headers=False, separator=";", nullvalue="-").splitlines()[2] == "-;3;nan;false"
    assert render(TABLE, "tabs").splitlines()[1] == "train\t48\t0.5\ttrue"
    assert render(TABLE, "table").splitlines() == [
        "+-------+----+-----------+-------+",
        "| split | n  |   score   |  ok   |",
        "+-------+----+-----------+-------+",
        "| train | 48 | 0.5       | true  |",
        "| test  | 16 | -1.25e-07 | NULL  |",
        "| NULL  | 3  | nan       | false |",
        "+-------+----+-----------+-------+"]


def test_machine_readable_modes_parse_back():
    assert [json.loads(line) for line in render(TABLE, "jsonlines").splitlines()] == [
        {"split": "train", "n": 48, "score": 0.5, "ok": True},
        {"split": "test", "n": 16, "score": -1.25e-7, "ok": None},
        {"split": None, "n": 3, "score": None, "ok": False}]
    assert render(TABLE.slice(0, 0), "jsonlines") == ""
    text = render(TABLE, "csv", separator=";", nullvalue="NA")
    assert list(csv.reader(io.StringIO(text), delimiter=";")) == [
        ["split", "n", "score", "ok"], ["train", "48", "0.5", "true"], ["test", "16", "-1.25e-07", "NA"],
        ["NA", "3", "nan", "false"]]
    assert render(pa.table({"s": ["a||b"]}), "csv", separator="||", headers=False) == '"a||b"'
    assert render(TABLE, "markdown", nullvalue="∅").splitlines()[-1] == "| ∅     |   3 |       nan | false |"
    assert "│ ∅       │" in render(TABLE, "box", nullvalue="∅")


def test_duckbox_footer_and_elision_follow_duckdb():
    small = render(TABLE, "duckbox")
    assert small.splitlines()[-1] == "└─────────┴───────┴───────────┴─────────┘"    # no footer under 10 rows
    ten = pa.table({"sample_id": list(range(10)), "split_name": ["train"] * 10})
    lines = render(ten, "duckbox").splitlines()
    assert lines[-1] == "  10 rows      2 columns" and len(lines[-1]) == len(lines[-2]) - 2
    assert render(ten.select(["sample_id"]), "duckbox").splitlines()[-1] == "   10 rows"  # too narrow for both
    many = pa.table({"i": list(range(100)), "s": [f"s{i}" for i in range(100)]})
    lines = render(many, "duckbox", max_rows=6).splitlines()
    assert lines[4:13] == ["│     0 │ s0      │", "│     1 │ s1      │", "│     2 │ s2      │",
                           "│     · │ ·       │", "│     · │ ·       │", "│     · │ ·       │",
                           "│    97 │ s97     │", "│    98 │ s98     │", "│    99 │ s99     │"]
    assert [line.strip() for line in lines[-2:]] == ["100 rows", "(6 shown)"]
    assert "·" not in render(many.slice(0, 9), "duckbox", max_rows=6)     # 3 rows over: all shown
    assert render(many.slice(0, 0), "duckbox").splitlines()[-1].strip() == "0 rows"
    wide = pa.table({f"column_{i}": [i * 1000] for i in range(20)})
    lines = render(wide, "duckbox", max_width=80).splitlines()
    assert all(len(line) <= 80 for line in lines) and "│ … │" in lines[1] and "column_0" in lines[1]
    assert "column_19" in lines[1] and lines[-1].endswith("20 columns (6 shown)")


# ---- command line -----------------------------------------------------------------------------------------
def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_mode_flags_and_statements_after_the_store(path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("SELECT 'stdin was read' AS x;"))
    query = "SELECT split, count(*) AS n FROM samples GROUP BY 1"
    assert run_cli(capsys, path, "-csv", query) == (0, "split,n\ntrain,12\n", "")
    assert run_cli(capsys, path, "-json", query)[1] == '[{"split": "train", "n": 12}]\n'
    assert run_cli(capsys, path, "-jsonlines", query)[1] == '{"split": "train", "n": 12}\n'
    assert run_cli(capsys, path, "-line", query)[1] == "split = train\n    n = 12\n"
    assert run_cli(capsys, path, "--markdown", query)[1] == "| split |   n |\n|-------|----:|\n| train |  12 |\n"
    assert run_cli(capsys, path, "-list", "-noheader", "-separator", ",", query)[1] == "train,12\n"
    assert run_cli(capsys, path, "-table", "-nullvalue", "(null)", "SELECT txt FROM notes")[1].splitlines()[3] == \
        "| (null) |"
    # several -c, in order with the options between them, then the statements after the store
    code, out, _ = run_cli(capsys, path, "-csv", "-c", "SELECT 1 AS a", "-json", "-c", "SELECT 2 AS b",
                           "SELECT 3 AS c", ".print done")
    assert code == 0 and out == 'a\n1\n[{"b": 2}]\n[{"c": 3}]\ndone\n'
    code, out, _ = run_cli(capsys, path, "-echo", "-csv", "-c", "SELECT 1 AS a;")
    assert out == "SELECT 1 AS a;\na\n1\n"


def test_readonly_flag_and_exit_codes(path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code, out, err = run_cli(capsys, path, "-readonly", "-csv", "SELECT count(*) AS n FROM samples",
                             "CREATE SET more AS SELECT 1 AS sample_id", "SELECT 'not run' AS x")
    assert code == 1 and out == "n\n12\n" and "read-only" in err and "not run" not in out
    code, out, err = run_cli(capsys, path, "-c", "SELECT nope", "-c", "SELECT 'not run' AS x")
    assert code == 1 and err.startswith("Binder Error:") and out == ""
    for bad, said in ((["-cvs"], "did you mean -csv?"), (["--mode", "xml"], "unknown mode 'xml'"),
                      (["-nosuch"], "unrecognized arguments: -nosuch")):
        with pytest.raises(SystemExit) as done:
            cli.main([path, *bad])
        assert done.value.code == 1 and said in capsys.readouterr().err
    assert run_cli(capsys, path, "-c", ".exit 7")[0] == 7


# ---- dot commands -----------------------------------------------------------------------------------------
def test_output_and_once_redirect_results(shell, tmp_path):
    out_file, once_file = tmp_path / "all.csv", tmp_path / "once.txt"
    assert shell.run_script(f".mode csv\n.output {out_file}\nSELECT 1 AS a;\n.print between\nSELECT 2 AS b;\n"
                            ".output\nSELECT 3 AS c;") == 0
    assert out_file.read_text() == "a\n1\nbetween\nb\n2\n" and outputs(shell) == ("c\n3\n", "")
    assert shell.run_script(f".once {once_file}\nSELECT 4 AS d;\nSELECT 5 AS e;") == 0
    assert once_file.read_text() == "d\n4\n" and outputs(shell)[0] == "e\n5\n"
    assert shell.run_script(f".once {once_file}\nSELECT nope;\nSELECT 6 AS f;") == 1   # an error uses it up too
    assert once_file.read_text() == "" and outputs(shell)[0] == "f\n6\n"
    piped = tmp_path / "piped.txt"
    assert shell.run_script(f".once '|tr a-z A-Z > {piped}'\nSELECT 'quiet' AS word;\nSELECT 7 AS g;") == 0
    assert piped.read_text() == "WORD\nQUIET\n" and outputs(shell)[0] == "g\n7\n"


def test_output_refuses_the_store_folder(shell, path, tmp_path):
    (tmp_path / "link").symlink_to(path)
    for target in (f"{path}/results.csv", f"{path}/catalog.duckdb", path, f"{tmp_path}/link/x.csv"):
        for command in (".output", ".once"):
            before = sorted(os.listdir(path))
            assert shell.run_dot(f"{command} {target}") is False
            err = outputs(shell)[1]
            assert err.startswith(f"Error: cannot write {target}: it is inside the store") and "owns its files" in err
            assert sorted(os.listdir(path)) == before
    assert shell.run_dot(f".output {tmp_path}/no/such/dir/x.csv") is False
    assert outputs(shell)[1].startswith("IO Error: cannot write to")
    assert shell.run_script("SELECT 1 AS still_here;") == 0 and "still_here" in outputs(shell)[0]


def test_schema_shows_user_tables_and_sets(shell):
    assert shell.run_dot(".schema") is True
    lines = outputs(shell)[0].splitlines()
    assert any(line.startswith("CREATE TABLE samples(") for line in lines)
    assert "CREATE TABLE notes(id INTEGER, txt VARCHAR);" in lines
    assert "CREATE SET few AS SELECT sample_id FROM samples WHERE sample_id < 3;" in lines
    assert not any(word in line for line in lines for word in ("set_members", "pending_files", "shards("))
    shell.run_script(".schema no%\n.schema F*\n.schema nothing_like_it")
    assert outputs(shell)[0].splitlines() == [
        "CREATE TABLE notes(id INTEGER, txt VARCHAR);",
        "CREATE SET few AS SELECT sample_id FROM samples WHERE sample_id < 3;"]


def test_settings_dot_commands(shell):
    shell.run_script(".mode list\n.headers off\n.nullvalue <none>\n.separator ;\nSELECT 1 AS a, NULL AS b;\n"
                     ".headers on\n.separator\n.nullvalue\n.mode csv\n.separator\nSELECT NULL AS c;")
    assert outputs(shell) == ("1;<none>\n;\n<none>\n,\nc\n<none>\n", "")
    wide = "SELECT " + ", ".join(f"{i * 1000} AS column_{i}" for i in range(20))
    shell.run_script(f".mode duckbox\n.maxwidth 80\n{wide};\n.maxwidth")
    out = outputs(shell)[0].splitlines()
    assert all(len(line) <= 80 for line in out[:-1]) and "20 columns (6 shown)" in out[-2] and out[-1] == "80"
    shell.run_script(".echo on\n.print hello   world\nSELECT 1 AS one;\n.echo off\n.print  'two  spaces'")
    assert outputs(shell)[0] == ".print hello   world\nhello world\nSELECT 1 AS one;\n┌───────┐\n" \
        "│  one  │\n│ int32 │\n├───────┤\n│     1 │\n└───────┘\n.echo off\ntwo  spaces\n"
    shell.run_script(".mode table\nSELECT 1 AS a;\n.mode line\nSELECT 1 AS a;")
    assert outputs(shell)[0] == "+---+\n| a |\n+---+\n| 1 |\n+---+\n    a = 1\n"


def test_shell_runs_system_commands(shell):
    assert shell.run_script(".shell echo hi there\n.system 'printf %s x y'\n.shell \"exit 3\"") == 0
    assert outputs(shell) == ("hi there\nxy", "System command returns 3\n")
    assert shell.run_dot(".shell") is False and outputs(shell)[1].startswith("Error: usage: .shell")


def test_help_lists_every_dot_command_and_unknown_ones_are_errors(shell):
    shell.run_dot(".help")
    out = outputs(shell)[0]
    assert all(f"\n{name} " in "\n" + out for name in DOT_COMMANDS)
    assert all(name in out for name in (".output", ".once", ".schema", ".headers", ".nullvalue", ".maxwidth",
                                        ".echo", ".print", ".shell"))
    assert shell.run_dot(".outptu x") is False
    assert outputs(shell)[1] == "Error: unknown command .outptu (did you mean .output?); .help lists the commands\n"


# ---- warnings and Ctrl-C ----------------------------------------------------------------------------------
def test_warnings_print_as_one_clean_line(shell):
    def warns(ctx):
        warnings.warn("the scores use 2 of 3 checkpoints", UserWarning)
        warnings.warn("the scores use 2 of 3 checkpoints", UserWarning)    # said once
        return {"x": [1]}
    shell.con.register_function(warns)
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        for _ in range(2):      # each statement says it again
            assert shell.run_script(".mode csv\nSELECT * FROM warns();") == 0
            assert outputs(shell) == ("x\n1\n", "Warning: the scores use 2 of 3 checkpoints\n")
    assert escaped == []


def stubborn(ctx, steps: int = 400):
    """A table function that never checks for a cancel: 20 s of sleeps."""
    for _ in range(steps):
        time.sleep(0.05)
    return {"steps": [steps]}


def press_ctrl_c_after(seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    return timer


def test_one_ctrl_c_stops_a_table_function_that_never_checks(shell):
    shell.con.register_function(stubborn)
    start = time.perf_counter()
    press_ctrl_c_after(0.3)
    with pytest.raises(metaql.InterruptException):
        shell.run_script("SELECT * FROM stubborn() JOIN samples ON true;")
    assert time.perf_counter() - start < 8     # was 20 s: the first Ctrl-C only set a flag nobody read
    assert shell.run_script(".mode csv\nSELECT 1 AS after;") == 0 and outputs(shell)[0] == "after\n1\n"


def test_completion_knows_the_new_dot_commands(shell, tmp_path):
    from prompt_toolkit.completion import CompleteEvent
    from prompt_toolkit.document import Document

    from metaql.completion import MetaQLCompleter

    def completions(text):
        found = MetaQLCompleter(shell).get_completions(Document(text), CompleteEvent(completion_requested=True))
        return [c.text for c in found]
    assert completions(".mode duck") == ["duckbox"] and completions(".mode j") == ["json", "jsonlines"]
    assert completions(".headers o") == ["on", "off"] and completions(".sch") == [".schema"]
    (tmp_path / "results.csv").write_text("")
    assert completions(f".output {tmp_path}/res") == ["ults.csv"]
