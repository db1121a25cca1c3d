"""Plain SQL cannot reach around the store (issue #16): writes are judged on the parsed statement,
user identifiers are validated and quoted, labels change only under the labels API's rules."""
from __future__ import annotations

import numpy as np
import pytest

import metaql
import metaql.cleaning.elite_function  # noqa: F401  registers ELITE
from metaql.engine.errors import BinderException, InvalidInputException, ProgrammingError
from metaql.storage.sqlguard import checked_statements

INJECTION = 'label" FROM samples; DELETE FROM shards; SELECT "label'


@pytest.fixture
def con():
    c = metaql.connect(":memory:", config={"progress": False})
    g = np.random.default_rng(0)
    c.add_samples(np.arange(20), "train", labels=np.arange(20) % 2,
                  inputs=g.normal(size=(20, 3)).astype(np.float32), columns={"w": np.arange(20.0)})
    c.add_samples(100 + np.arange(6), "val", labels=np.arange(6) % 2,
                  inputs=g.normal(size=(6, 3)).astype(np.float32), columns={"w": np.zeros(6)})
    c.execute("CREATE SET light AS SELECT sample_id FROM samples WHERE w < 5")
    c.label([0, 1], [0, 1], by="ana")
    yield c
    c.close()


def snapshot(con) -> dict:
    """Everything the guarded statements could have changed."""
    tables = [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables "
                                        "ORDER BY table_schema, table_name").fetchall()]
    counts = {t: con.execute(f'SELECT count(*) FROM main."{t}"').fetchone()[0]
              for t in ("shards", "sets", "set_members", "samples", "labels", "meta", "checkpoints")}
    rows = {t: con.execute(f"SELECT * FROM main.{t} ORDER BY ALL").fetchall() for t in ("labels", "samples")}
    return {"tables": tables, "counts": counts, "rows": rows,
            "seq": con.execute("SELECT sequence_name, start_value FROM duckdb_sequences()").fetchall()}


@pytest.mark.parametrize("sql", [
    "WITH t AS (SELECT 1) DELETE FROM shards",
    "/* x */ UPDATE checkpoints SET lr = 2",
    "/* x */ DELETE FROM sets",
    "DROP TABLE samples",
    "DROP TABLE IF EXISTS catalog.main.\"Shards\"",
    'DELETE FROM main."SHARDS"',
    "delete from Catalog.Main.Set_Members",
    "WITH x AS (DELETE FROM shards RETURNING *) SELECT * FROM x",
    "CREATE TABLE mine AS WITH x AS (DELETE FROM shards RETURNING file) SELECT * FROM x",
    "CREATE TEMP TABLE shards AS SELECT 1 AS x",          # would shadow the real one
    "CREATE OR REPLACE SEQUENCE shard_seq",
    "ALTER TABLE samples DROP COLUMN w",
    "UPDATE samples SET label = 1 - label",
    "TRUNCATE samples",
    "COPY shards FROM '/nonexistent.csv'",
    "DROP SCHEMA main CASCADE",
    "ATTACH ':memory:' AS other",
    "SET search_path = 'other'",
    "USE memory",
    "PREPARE p AS DELETE FROM shards",
    "PRAGMA import_database('/nonexistent')",
    "SELECT setval('shard_seq', 1)",                      # the next capture's shard ids would collide
    "CREATE MACRO nextval(x) AS 1",                       # MetaQL's own SQL calls these
    "CREATE TEMP MACRO current_database() AS 'temp'",
])
def test_writes_around_the_store_are_refused_whatever_their_form(con, sql):
    before = snapshot(con)
    with pytest.raises(ProgrammingError, match="refused|cannot tell"):
        con.execute(sql)
    assert snapshot(con) == before


def test_users_tables_and_plain_reads_keep_working(con):
    con.execute("CREATE TABLE mine AS SELECT sample_id, w FROM samples WHERE split = 'train'")
    con.execute("INSERT INTO mine SELECT sample_id, w FROM samples WHERE split = 'val'")
    con.execute("WITH t AS (SELECT 3 AS id) DELETE FROM mine WHERE sample_id IN (SELECT id FROM t)")
    con.execute("UPDATE mine SET w = 0 FROM shards WHERE mine.sample_id = 1")
    assert con.execute("SELECT count(*) FROM mine").fetchone() == (25,)
    con.execute("UPDATE samples SET w = -1 WHERE sample_id = 2")     # a column the user added
    assert con.execute("SELECT w FROM samples WHERE sample_id = 2").fetchone() == (-1.0,)
    for sql in ("SELECT count(*) FROM shards", "FROM samples LIMIT 1", "SUMMARIZE samples", "SHOW TABLES",
                "WITH t AS (SELECT 1 AS a) SELECT * FROM t", "PRAGMA table_info('samples')",
                "SELECT replace('update', 'u', 'U')", "SET threads = 1", "PIVOT samples ON split USING count(*)"):
        con.execute(sql).fetchall()
    con.execute("DROP TABLE mine")


@pytest.mark.parametrize("sql", [
    "INSERT OR REPLACE INTO labels VALUES (1, 0, 'bob', now())",
    "INSERT INTO labels (sample_id, label) VALUES (1, 0) ON CONFLICT DO UPDATE SET label = excluded.label",
    "UPDATE labels SET label = 1 - label",
    "DELETE FROM labels WHERE sample_id = 1",
    "TRUNCATE labels",
    "MERGE INTO labels USING (SELECT 1 AS sample_id) s ON s.sample_id = labels.sample_id "
    "WHEN MATCHED THEN UPDATE SET label = 0",
    "DROP TABLE labels",
    "ALTER TABLE labels ALTER label TYPE VARCHAR",
])
def test_labels_change_only_through_the_labels_api(con, sql):
    before = snapshot(con)
    with pytest.raises(ProgrammingError, match=r"con.label\(ids, labels, overwrite=True\)"):
        con.execute(sql)
    assert snapshot(con) == before


def test_insert_into_labels_goes_through_add_labels(con):
    before = snapshot(con)
    with pytest.raises(InvalidInputException, match="contradict"):
        con.execute("INSERT INTO labels (sample_id, label) VALUES (5, 1), (1, 0)")   # 1 is labeled 1
    assert snapshot(con) == before                                                  # all or nothing
    con.execute("INSERT INTO main.labels (sample_id, label, labeled_by) VALUES (5, 1, 'bob'), (1, 1, 'bob')")
    con.execute("INSERT INTO labels SELECT sample_id, label, 'carl', now() FROM samples WHERE sample_id = ?", [6])
    assert con.execute("SELECT sample_id, label, labeled_by FROM labels ORDER BY 1").fetchall() == [
        (0, 0, "ana"), (1, 1, "ana"), (5, 1, "bob"), (6, 0, "carl")]                # the same label kept its author


@pytest.mark.parametrize("argument", ["label_column", "features"])
def test_an_injected_elite_column_is_a_binder_error_and_changes_nothing(con, argument):
    before = snapshot(con)
    with pytest.raises(BinderException, match="unknown samples column"):
        con.execute(f"SELECT * FROM ELITE(data=train, labeled=val, {argument}=?, epochs=1)", [INJECTION])
    assert snapshot(con) == before and before["counts"]["shards"] == 2


def test_an_injected_lancet_oracle_is_a_binder_error_and_changes_nothing(con):
    before = snapshot(con)
    with pytest.raises(BinderException, match="unknown samples column"):
        con.execute("SELECT * FROM LANCET_CANDIDATES(pool=light, budget=2, oracle=?)", [INJECTION])
    assert snapshot(con) == before


def test_sample_columns_are_checked_case_blind_with_a_hint(con):
    assert con.store.sample_columns([3, 1], ["W", "label"])["W"].tolist() == [3.0, 1.0]
    with pytest.raises(BinderException, match="Did you mean 'label'"):
        con.store.sample_columns([1], ["lable"])


def test_a_keyword_column_name_works_and_a_quote_is_refused(con):
    con.add_samples([500, 501], "extra", labels=[0, 1], columns={"semi": [1.5, 2.5], "w": [0.0, 0.0]})
    assert con.store.sample_columns([501], ["semi"])["semi"].tolist() == [2.5]
    assert con.execute('SELECT "semi" FROM samples WHERE sample_id = 500').fetchone() == (1.5,)
    before = snapshot(con)
    with pytest.raises(InvalidInputException, match="plain identifier"):
        con.add_samples([502], "extra", columns={'x" INT; DROP TABLE shards; --': [1]})
    assert snapshot(con) == before


@pytest.mark.parametrize("query", [
    "WITH x AS (DELETE FROM shards RETURNING 1) SELECT sample_id FROM samples",
    "WITH x AS (DELETE FROM labels RETURNING sample_id) SELECT sample_id FROM x",
    "SELECT sample_id FROM samples) AS _q; DELETE FROM shards; SELECT * FROM (SELECT 1 AS sample_id",
    "INSERT INTO labels VALUES (9, 1, 'x', now()) RETURNING sample_id",
])
def test_a_set_query_must_be_one_read_only_select(con, query):
    before = snapshot(con)
    with pytest.raises(BinderException, match="read-only SELECT|refused|Parser"):
        con.store.create_set("bad", query)
    assert snapshot(con) == before


def test_every_statement_of_a_text_is_judged():
    with pytest.raises(ProgrammingError, match="shards"):
        checked_statements("SELECT 1; DELETE FROM shards")
    assert [s.kind for s in checked_statements("SELECT 1; /* c */ EXPLAIN SELECT 2")] == ["SELECT", "EXPLAIN"]
    with pytest.raises(ProgrammingError, match="shards"):
        checked_statements("EXPLAIN ANALYZE DELETE FROM shards")


def test_copy_to_a_file_inside_the_store_is_refused(con, tmp_path, monkeypatch):
    root = con.store.root
    before = sorted(p.name for p in root.iterdir())
    for target in (root / "catalog.duckdb", root / "writer.lock", root / "tensors" / "x.parquet"):
        with pytest.raises(ProgrammingError, match="inside the store"):
            con.execute(f"COPY (SELECT 1 AS a) TO '{target}'")
    monkeypatch.chdir(root)
    with pytest.raises(ProgrammingError, match="inside the store"):
        con.execute("COPY (SELECT 1 AS a) TO 'catalog.snapshot.duckdb'")
    assert sorted(p.name for p in root.iterdir()) == before
    con.execute(f"COPY (SELECT 1 AS a) TO '{tmp_path / 'out.parquet'}'")       # outside: the user's business
    assert (tmp_path / "out.parquet").exists()


def test_updating_a_samples_label_points_at_con_label(con):
    """The refusal said what not to do but not how to record a corrected label."""
    with pytest.raises(ProgrammingError, match=r"samples\.label is what training used.*con\.label\(ids, labels"):
        con.execute("UPDATE samples SET label = 3 WHERE sample_id = 1")
