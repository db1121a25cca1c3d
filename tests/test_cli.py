"""The `metaql` command: the demo end to end, -c, scripts on stdin, exit codes."""
import subprocess
import sys

import pytest

import metaql


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "metaql.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.e2e
def test_demo_builds_a_store_that_reopens_and_answers(tmp_path):
    store = str(tmp_path / "demo.mq")
    out = run("demo", store, "--epochs", "3")
    assert out.returncode == 0, out.stderr
    assert "precision@" in out.stdout and "time per stage" in out.stdout
    assert "it/s" not in out.stderr and "train:" not in out.stderr    # no bars into a file or a pipe
    with metaql.connect(store, read_only=True) as con:
        assert [r[0] for r in con.execute("SHOW CHECKPOINTS").fetchall()] == ["epoch1", "epoch2", "epoch3"]
        rows = con.execute("SELECT TOPK(5) train FROM INFLUENCE(layers=[fc2], query=batch(test_wrong)) "
                           "ORDER BY ASC").fetchall()
        assert len(rows) == 5 and rows == sorted(rows, key=lambda r: r[1])
    again = run(store, "-c", "SELECT count(*) AS n FROM samples WHERE split = 'train';")
    assert again.returncode == 0 and "1437" in again.stdout and "┌" in again.stdout
    refused = run("demo", store)
    assert refused.returncode == 1 and "--force" in refused.stderr


@pytest.mark.e2e       # fresh processes: CI's e2e step (the fast suite is near its 5-minute bound)
def test_command_errors_exit_nonzero(tmp_path):
    store = str(tmp_path / "s.mq")
    bad = run(store, "-c", "SELECT TOPK(3) train FROM INFLUENCE(query=batch(x)) ORDER BY up;")
    assert bad.returncode == 1 and "line 1, column" in bad.stderr and "^" in bad.stderr
    script = "CREATE SET a AS SELECT 1 AS sample_id;\nSELECT 42 AS answer;\n"
    out = run(store, "--mode", "csv", stdin=script)
    assert out.returncode == 1 and "not registered" in out.stderr and "42" not in out.stdout
    ok = run(store, "--mode", "csv", stdin="SELECT 42 AS answer;\n.mode json\nSELECT 1 AS one;\n")
    assert ok.returncode == 0 and ok.stdout.splitlines()[:2] == ["answer", "42"] and '[{"one": 1}]' in ok.stdout


def test_demo_force_replaces_only_a_store_no_one_writes(tmp_path, capsys):
    """`metaql demo DIR --force` removed any folder (a user's `metaql demo . --force` would have
    emptied it); now it replaces a MetaQL store and nothing else."""
    from metaql import demo
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "notes.txt").write_text("important")
    assert demo.main([str(folder), "--force"]) == 1
    assert (folder / "notes.txt").read_text() == "important"
    assert "not a MetaQL store" in capsys.readouterr().err
    plain = tmp_path / "file.txt"
    plain.write_text("x")
    assert demo.main([str(plain), "--force"]) == 1 and plain.read_text() == "x"
    assert "name a directory" in capsys.readouterr().err
    duck = tmp_path / "other"           # a plain DuckDB file named like the catalog, beside a user's file
    duck.mkdir()
    import duckdb
    duckdb.connect(str(duck / "catalog.duckdb")).close()
    (duck / "thesis.tex").write_text("mine")
    assert demo.main([str(duck), "--force"]) == 1 and (duck / "thesis.tex").exists()
    (duck / "thesis.tex").unlink()
    assert "not a MetaQL store" in demo._unusable(duck, force=True)     # its catalog is not MetaQL's
    store = tmp_path / "old.mq"
    writer = metaql.connect(str(store))
    assert "open for writing" in demo._replace(store)
    writer.close()
    assert demo._unusable(store, force=True) is None
    assert "--force" in demo._unusable(store, force=False)
    (store / "notes.txt").write_text("mine")
    assert "files of yours" in demo._unusable(store, force=True)
    (store / "notes.txt").unlink()
    assert demo._replace(store) is None and not store.exists()
