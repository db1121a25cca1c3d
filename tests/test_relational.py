"""Issue #18: DuckDB's relational API on con.sql() results, con.register / con.table / executemany,
and a pandas or Arrow object queried by its Python name.

Each relational method is compared with DuckDB's own relational API run on the same data
materialised by hand (the table function's Arrow result registered on a plain DuckDB connection)."""
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import duckdb

import metaql
from tests.fuzzing import small_store

SELF = "SELF_INFLUENCE(checkpoints=[c1])"


@pytest.fixture(scope="module")
def con(tmp_path_factory):
    c = small_store(str(tmp_path_factory.mktemp("relational") / "store.mq"))
    c.self_scores = c.execute(f"SELECT * FROM {SELF}").arrow()
    c.samples = c.execute("SELECT sample_id, split, label FROM samples").arrow()
    yield c
    c.close()


@pytest.fixture()
def duck(con):
    """A plain DuckDB connection holding the function's result and the samples, by hand."""
    d = duckdb.connect()
    d.register("scores", con.self_scores)
    d.register("samples", con.samples)
    yield d
    d.close()


def scores(con):
    return con.sql(f"SELECT * FROM {SELF}")


# (name, the same steps on a MetaQL relation and on a DuckDB relation; ordered: compare in order)
STEPS = [
    ("filter", lambda r: r.filter("score > 0.05 AND sample_id % 3 <> 1"), False),
    ("project", lambda r: r.project("sample_id, score * 2 AS s2, score > 0.1 AS big"), False),
    ("project_names", lambda r: r.project("score", "sample_id"), False),
    ("order_limit", lambda r: r.order("score DESC").limit(5), True),
    ("limit_offset", lambda r: r.order("sample_id").limit(4, offset=3), True),
    ("filter_order_limit", lambda r: r.filter("score > 0").order("score ASC, sample_id").limit(7), True),
    ("aggregate", lambda r: r.aggregate("count(*) AS n, sum(score) AS total, max(score) AS top"), False),
    ("aggregate_groups", lambda r: r.aggregate("sample_id % 3 AS g, count(*) AS n, avg(score) AS m",
                                               "sample_id % 3"), False),
    ("distinct", lambda r: r.project("sample_id % 4 AS m").distinct(), False),
    ("union", lambda r: r.limit(3).union(r.order("score").limit(2)), False),
    ("except", lambda r: r.except_(r.filter("score > 0.1")), False),
    ("intersect", lambda r: r.intersect(r.filter("sample_id < 10")), False),
    ("count", lambda r: r.count("*"), False),
    ("sort", lambda r: r.sort("sample_id % 2", "score DESC"), True),
    ("chain", lambda r: r.filter("score > 0").project("sample_id, score").aggregate("avg(score) AS a"), False),
]


@pytest.mark.parametrize("name, steps, ordered", STEPS, ids=[s[0] for s in STEPS])
def test_relational_methods_match_duckdb(con, duck, name, steps, ordered):
    got, want = steps(scores(con)), steps(duck.table("scores"))
    assert got.columns == want.columns
    assert [str(t) for t in got.types] == [str(t) for t in want.types]
    rows, expected = got.fetchall(), want.fetchall()
    if not ordered:
        rows, expected = sorted(rows), sorted(expected)
    # row by row: pytest.approx takes no nested structures from pytest 9.2 on
    assert len(rows) == len(expected)
    for row, want_row in zip(rows, expected):
        assert list(row) == pytest.approx(list(want_row)), (row, want_row)


def test_self_influence_filtered_ordered_limited_matches_duckdb_and_the_language(con, duck):
    rel = scores(con).filter("score > 0").order("score DESC").limit(5)
    want = duck.table("scores").filter("score > 0").order("score DESC").limit(5).fetchall()
    assert rel.fetchall() == want
    assert rel.fetchall() == con.execute(f"SELECT * FROM {SELF} WHERE score > 0 ORDER BY score DESC "
                                         "LIMIT 5").fetchall()
    assert rel.shape == (5, 2) and len(rel) == 5 and rel.columns == ["sample_id", "score"]
    assert [d[0] for d in rel.description] == ["sample_id", "score"]
    assert list(rel) == want                        # iteration
    assert rel.df()["sample_id"].tolist() == [r[0] for r in want]
    assert rel.arrow().column("score").to_pylist() == [r[1] for r in want]
    assert rel.fetchnumpy()["sample_id"].tolist() == [r[0] for r in want]
    assert "score" in repr(rel) and "5 rows" in repr(rel)


def test_join_of_a_relation_with_a_registered_pandas_frame(con, duck):
    frame = pd.DataFrame({"sample_id": np.arange(0, 40, 3), "w": np.linspace(0, 1, 14)})
    con.register("weights", frame)
    duck.register("weights", frame)
    try:
        for how in ("inner", "left", "semi", "anti"):
            got = scores(con).join(con.table("weights"), "sample_id", how=how)
            want = duck.table("scores").join(duck.table("weights"), "sample_id", how=how)
            assert got.columns == want.columns, how
            assert sorted(got.fetchall(), key=str) == sorted(want.fetchall(), key=str), how
        on = scores(con).set_alias("s").join(con.table("weights").set_alias("w"), "s.sample_id = w.sample_id")
        want = duck.table("scores").set_alias("s").join(duck.table("weights").set_alias("w"),
                                                         "s.sample_id = w.sample_id")
        assert on.columns == want.columns and sorted(on.fetchall()) == sorted(want.fetchall())
        assert con.execute("SELECT count(*) FROM weights").fetchone() == (14,)
    finally:
        con.unregister("weights")
    with pytest.raises(metaql.CatalogException):
        con.execute("SELECT * FROM weights")


def test_a_relation_over_a_topk_statement(con, duck):
    topk = con.sql("SELECT TOPK(6) train FROM INFLUENCE(query=batch(test)) ORDER BY DESC")
    ref = con.execute("SELECT TOPK(6) train FROM INFLUENCE(query=batch(test)) ORDER BY DESC").arrow()
    duck.register("ref", ref)
    assert topk.filter("score > 0").order("sample_id").fetchall() == \
        duck.table("ref").filter("score > 0").order("sample_id").fetchall()
    joined = topk.join(con.table("samples").set_alias("s"), "sample_id").project("sample_id, label")
    assert sorted(joined.fetchall()) == sorted(duck.table("ref").join(duck.table("samples").set_alias("s"),
                                                                      "sample_id").project("sample_id, label")
                                               .fetchall())


def test_parameters_travel_with_relations(con, duck):
    a = con.sql("SELECT * FROM samples WHERE label = ? AND split = ?", [1, "train"])
    b = con.sql("SELECT sample_id, score FROM SELF_INFLUENCE(checkpoints=[c1]) WHERE score > ?", [0.05])
    got = a.project("sample_id").join(b, "sample_id").order("sample_id").fetchall()
    want = duck.sql("SELECT sample_id, score FROM samples JOIN scores USING (sample_id) WHERE label = 1 "
                    "AND split = 'train' AND score > 0.05 ORDER BY sample_id").fetchall()
    assert got == want and got
    named = con.sql("SELECT * FROM samples WHERE sample_id < $n", {"n": 5}).union(
        con.sql("SELECT * FROM samples WHERE sample_id > $m", {"m": 40}))
    assert len(named) == 5 + 7


def test_write_parquet_and_csv_read_back(con, tmp_path):
    rel = scores(con).filter("score > 0").order("sample_id")
    rel.write_parquet(str(tmp_path / "s.parquet"))
    assert pq.read_table(tmp_path / "s.parquet").equals(rel.arrow())
    rel.write_csv(str(tmp_path / "s.csv"), sep=";")
    back = pacsv.read_csv(tmp_path / "s.csv", parse_options=pacsv.ParseOptions(delimiter=";"))
    assert back.column("sample_id").to_pylist() == rel.arrow().column("sample_id").to_pylist()
    assert back.column("score").to_pylist() == pytest.approx(rel.arrow().column("score").to_pylist())
    for write in ("write_parquet", "write_csv"):
        with pytest.raises(metaql.ProgrammingError, match="inside the store"):
            getattr(rel, write)(str(con.store.root / "shards" / "x.bin"))


def test_each_fetch_runs_the_relation_again(tmp_path):
    calls = []

    def counted(ctx) -> pa.Table:
        calls.append(1)
        ids = ctx.store.set_ids("train")
        return pa.table({"sample_id": ids, "n": np.full(len(ids), len(calls))})

    with metaql.connect(str(tmp_path / "s.mq"), config={"progress": False}) as c:
        c.add_samples([1, 2, 3], "train", [0, 1, 0])
        rel = c.sql("SELECT * FROM samples").filter("label = 0")
        assert len(rel) == 2
        c.add_samples([4, 5], "train", [0, 0])
        assert len(rel) == 4 and sorted(r[0] for r in rel.fetchall()) == [1, 3, 4, 5]
        c.register_function(counted)
        fn = c.sql("SELECT * FROM counted()").filter("sample_id > 1")
        first, second = fn.fetchall(), fn.fetchall()
        assert len(calls) == 2 and {r[2] if len(r) > 2 else r[1] for r in first} == {1}
        assert {r[1] for r in second} == {2}     # recomputed, not a cached result
        c.add_samples([6], "train", [1])
        assert len(fn.fetchall()) == 5


def test_fetchone_and_fetchmany_continue_a_pending_result(con):
    rel = con.sql("SELECT sample_id FROM samples ORDER BY sample_id").limit(5)
    assert rel.fetchone() == (0,) and rel.fetchmany(2) == [(1,), (2,)]
    assert rel.fetchall() == [(3,), (4,)]
    assert rel.fetchone() == (0,)               # fetchall ended it: a new run


GUARD_BYPASSES = [
    lambda r: r.filter("1=1); DROP TABLE samples; --"),
    lambda r: r.filter("1=1; DROP TABLE mine"),
    lambda r: r.project("1) AS x; DELETE FROM mine; SELECT (1"),
    lambda r: r.order("sample_id; DROP TABLE mine"),
    lambda r: r.aggregate("count(*)", "sample_id) ; DROP TABLE mine; --"),
    lambda r: r.filter("sample_id = 1 /* unterminated"),
    lambda r: r.filter("sample_id = '1"),
    lambda r: r.join(r.set_alias("o"), "1=1) JOIN (SELECT 1"),
    lambda r: r.filter("label = ?"),
    lambda r: r.to_table("samples"),
    lambda r: r.to_table("shards"),
    lambda r: r.insert_into("layers"),
    lambda r: r.create_view("checkpoints"),
]


@pytest.mark.parametrize("attempt", range(len(GUARD_BYPASSES)))
def test_a_relation_is_no_way_around_the_sql_guard(con, attempt):
    con.execute("CREATE TABLE IF NOT EXISTS mine AS SELECT 1 AS x")
    before = con.execute("SELECT count(*) FROM samples").fetchone()
    with pytest.raises(metaql.Error) as e:
        GUARD_BYPASSES[attempt](con.sql("SELECT * FROM samples"))
    assert "_metaql" not in str(e.value)
    assert con.execute("SELECT count(*) FROM samples").fetchone() == before
    assert con.execute("SELECT x FROM mine").fetchall() == [(1,)]
    assert con.verify() == []


def test_bad_expressions_name_the_users_text_never_internal_names(con):
    with pytest.raises(metaql.BinderException, match=r"filter\('nope > 1'\).*nope") as e:
        scores(con).filter("nope > 1")
    assert "_metaql" not in str(e.value)
    with pytest.raises(metaql.ParserException, match=r"project\('score \+'\)"):
        scores(con).project("score +")
    topk = con.sql("SELECT TOPK(3) train FROM INFLUENCE(query=batch(test)) ORDER BY DESC")
    with pytest.raises(metaql.BinderException) as e:   # bound on the fetch: TOPK must run first
        topk.filter("nope > 1").fetchall()
    assert "nope" in str(e.value) and "_metaql" not in str(e.value)
    with pytest.raises(metaql.InvalidInputException, match="same alias"):
        con.table("samples").join(con.table("samples"), "sample_id")


def test_a_dataframe_is_queried_by_its_python_name(con):
    local_frame = pd.DataFrame({"sample_id": [2, 3, 5], "tag": ["a", "b", "c"]})
    arrow_rows = pa.table({"k": [1, 2]})
    got = con.execute("SELECT s.sample_id, tag FROM samples s JOIN local_frame USING (sample_id) "
                      "ORDER BY 1").fetchall()
    assert got == [(2, "a"), (3, "b"), (5, "c")]
    assert con.sql("SELECT * FROM arrow_rows").filter("k > 1").fetchall() == [(2,)]
    assert scores(con).join(con.sql("SELECT * FROM local_frame"), "sample_id").project("tag").order(
        "tag").fetchall() == [("a",), ("b",), ("c",)]
    not_a_frame = [1, 2]   # noqa: F841  a name that is no table stays unknown
    with pytest.raises(metaql.CatalogException, match="not_a_frame"):
        con.execute("SELECT * FROM not_a_frame")
    with pytest.raises(metaql.CatalogException):
        con.execute("SELECT * FROM local_frame_missing")
    # nothing stays registered after the statement
    assert "local_frame" not in {r[0] for r in con.execute("SHOW TABLES").fetchall()}


def test_register_refuses_names_it_must_not_take(con):
    frame = pd.DataFrame({"a": [1]})
    for name in ("samples", "labels", "shards", "_metaql_call_1", "mine2"):
        if name == "mine2":
            con.execute("CREATE TABLE IF NOT EXISTS mine2 (a INT)")
        with pytest.raises(metaql.Error, match="refused"):
            con.register(name, frame)
    with pytest.raises(metaql.InvalidInputException, match="DataFrame"):
        con.register("x", [1, 2, 3])
    con.register("cols", {"a": np.arange(3), "b": ["x", "y", "z"]})
    con.register("cols", pa.table({"a": [7]}))            # a registered name is replaced
    assert con.table("cols").fetchall() == [(7,)]
    con.unregister("cols")


def test_register_on_a_read_only_connection_survives_new_commits(tmp_path):
    path = str(tmp_path / "ro.mq")
    with metaql.connect(path, config={"progress": False}) as w:
        w.add_samples([1, 2], "train", [0, 1])
        w.execute("SELECT 1")                             # publishes the commit for readers
        with metaql.connect(path, read_only=True) as r:
            r.register("extra", pd.DataFrame({"sample_id": [2], "note": ["x"]}))
            rel = r.table("samples").join(r.table("extra"), "sample_id").project("sample_id, note")
            assert rel.fetchall() == [(2, "x")]
            w.add_samples([3], "train", [1])
            w.execute("SELECT 1")                         # the reader's catalog is reopened
            assert r.execute("SELECT count(*) FROM samples").fetchone() == (3,)
            assert rel.fetchall() == [(2, "x")]


def test_table_view_and_set(con):
    assert con.table("samples").columns[:3] == ["sample_id", "split", "label"]
    assert con.table("samples").alias == "samples"
    odd = con.table("odd")
    assert odd.columns == ["sample_id"]
    assert odd.fetchall() == con.execute("SELECT sample_id FROM samples WHERE sample_id % 2 = 1 "
                                         "ORDER BY 1").fetchall()
    with pytest.raises(metaql.CatalogException, match="no_such"):
        con.table("no_such")
    con.sql("SELECT sample_id FROM samples WHERE label = 2").create_view("label2")
    assert len(con.table("label2")) == con.execute("SELECT count(*) FROM samples WHERE label = 2").fetchone()[0]
    with pytest.raises(metaql.ProgrammingError, match="to_table"):
        scores(con).create_view("v2")
    scores(con).filter("score > 0").to_table("pos_scores")
    assert con.table("pos_scores").fetchall() == scores(con).filter("score > 0").fetchall()


def test_executemany(con):
    con.execute("CREATE TABLE notes (sample_id BIGINT, note VARCHAR)")
    assert con.executemany("INSERT INTO notes VALUES (?, ?)", [[1, "a"], [2, "b"], (3, "c")]) is con
    assert con.execute("SELECT * FROM notes ORDER BY 1").fetchall() == [(1, "a"), (2, "b"), (3, "c")]
    sizes = [con.executemany("SELECT count(*) FROM samples WHERE sample_id < ?", [[n]]).fetchone()[0]
             for n in (3, 5)]
    assert sizes == [3, 5]
    with pytest.raises(metaql.ProgrammingError, match="one statement"):
        con.executemany("SELECT 1; SELECT 2", [[]])
    with pytest.raises(metaql.InvalidInputException):
        con.executemany("SELECT ?", "ab")


def test_metaql_sql_on_the_default_connection():
    rel = metaql.sql("SELECT range AS i FROM range(10)")
    assert rel.filter("i % 2 = 0").order("i DESC").limit(2).fetchall() == [(8,), (6,)]
    assert metaql.sql("SELECT 42 AS x").columns == ["x"]


def _relation_over_a_local_frame(con):
    inner_frame = pd.DataFrame({"sample_id": [1, 4], "tag": ["x", "y"]})
    return con.sql("SELECT * FROM inner_frame").filter("sample_id > 1")


def test_a_relation_keeps_the_python_object_it_was_built_on(con):
    rel = _relation_over_a_local_frame(con)        # fetched where `inner_frame` is no name, as in DuckDB
    assert rel.fetchall() == [(4, "y")]
    assert rel.join(con.table("samples").set_alias("s"), "sample_id").project("tag, split").fetchall() == \
        [("y", "train")]


def test_rows_with_two_columns_of_one_name_keep_both(con):
    assert con.execute("SELECT 1 AS a, 2 AS a").fetchall() == [(1, 2)]
    assert con.sql("SELECT 1 AS a, 2 AS a").fetchone() == (1, 2)


def test_a_relation_of_a_closed_connection_refuses_to_run(tmp_path):
    c = metaql.connect(str(tmp_path / "c.mq"))
    rel = c.sql("SELECT 1 AS a")
    c.close()
    with pytest.raises(metaql.ProgrammingError, match="closed"):
        rel.fetchall()


def test_query_reads_the_relation_under_a_name_as_duckdb_does(con, duck):
    sql = "SELECT sample_id % 2 AS parity, count(*) AS n, max(score) AS top FROM t GROUP BY ALL ORDER BY parity"
    got = scores(con).filter("score > 0").query("t", sql)
    want = duck.table("scores").filter("score > 0").query("t", sql)
    assert got.columns == want.columns and got.fetchall() == want.fetchall()
    with pytest.raises(metaql.InvalidInputException, match="takes one query"):
        scores(con).query("t", "DELETE FROM samples")
    with pytest.raises(metaql.ParserException, match="no ';'"):
        scores(con).query("t", "SELECT * FROM t; DROP TABLE samples")
    assert con.execute("SELECT count(*) FROM samples").fetchone()[0] > 0
