"""Issue #18: a MetaQL table function stands wherever a table may in DuckDB's SQL, parameters are
bound everywhere, and DuckDB's own statements stay DuckDB's.

Each statement shape is compared with the same SQL run by DuckDB itself (on the store's catalog
connection) over the function's result materialised by hand."""
import json

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

import metaql
from tests.fuzzing import small_store

CALLS = {"A": "INFLUENCE(query=batch(test))", "B": "SELF_INFLUENCE(checkpoints=[c1])",
         "C0": "INFLUENCE(query=batch(test), checkpoints=[c0])",
         "C1": "INFLUENCE(query=batch(test), checkpoints=[c1])", "B0": "SELF_INFLUENCE(checkpoints=[c0])"}


@pytest.fixture(scope="module")
def con(tmp_path_factory):
    c = small_store(str(tmp_path_factory.mktemp("anywhere") / "store.mq"))
    c.materialised = {k: c.execute(f"SELECT * FROM {call}").arrow() for k, call in CALLS.items()}
    yield c
    c.close()


def rows(table) -> list:
    return sorted(tuple(r.values()) for r in table.to_pylist())


def by_duckdb(con, template: str, params=None) -> list:
    """The statement run by DuckDB over each call's result, registered by hand."""
    db = con.store.db
    for key, table in con.materialised.items():
        db.register(f"ref_{key.lower()}", table)
    try:
        sql = template.format(**{k: f"ref_{k.lower()}" for k in CALLS})
        rel = db.sql(sql, params=params) if params is not None else db.sql(sql)
        return rows(rel.to_arrow_table())
    finally:
        for key in CALLS:
            db.unregister(f"ref_{key.lower()}")


SHAPES = [
    ("SELECT r.sample_id, s.label FROM {A} r JOIN samples s USING (sample_id) WHERE s.label = ?", [1]),
    ("SELECT s.split, count(*) FROM samples s JOIN {A} r ON r.sample_id = s.sample_id GROUP BY 1", None),
    ("SELECT s.sample_id FROM samples s, {B} b WHERE s.sample_id = b.sample_id AND b.score > ?", [0.0]),
    ("WITH top AS (SELECT * FROM {A} t ORDER BY score DESC LIMIT ?) SELECT count(*), min(score) FROM top", [5]),
    ("SELECT count(*) FROM samples WHERE sample_id IN (SELECT sample_id FROM {B} b WHERE score > $1)", [0.0]),
    ("SELECT sample_id FROM {A} a UNION SELECT sample_id FROM {B} b", None),
    ("SELECT a.sample_id, a.score - b.score AS d FROM {A} a JOIN {B} b USING (sample_id)", None),
    ("SELECT x.sample_id, x.score - y.score FROM {C0} x JOIN {C1} y ON x.sample_id = y.sample_id", None),
    ("SELECT * FROM (SELECT sample_id, score * 2 AS s2 FROM {A} a) q WHERE s2 < $lim", {"lim": 0.0}),
]


@pytest.mark.parametrize("template, params", SHAPES)
def test_statement_shapes_match_duckdb_over_the_materialised_result(con, template, params):
    sql = template.format(**CALLS)
    assert rows(con.execute(sql, params).arrow()) == by_duckdb(con, template, params)


def test_a_call_without_alias_is_named_after_its_function(con):
    got = con.execute("SELECT influence.sample_id, s.label FROM samples s JOIN INFLUENCE(query=batch(test)) "
                      "ON influence.sample_id = s.sample_id ORDER BY influence.score DESC LIMIT 3").fetchall()
    assert sorted(got) == by_duckdb(con, "SELECT a.sample_id, s.label FROM samples s JOIN {A} a "
                                         "ON a.sample_id = s.sample_id ORDER BY a.score DESC LIMIT 3")


def test_first_and_last_checkpoints_compare_in_one_join(con):
    got = con.execute("SELECT f.sample_id, f.score, l.score FROM SELF_INFLUENCE(checkpoints=first) f "
                      "JOIN SELF_INFLUENCE(checkpoints=last) l USING (sample_id)").arrow()
    assert rows(got) == by_duckdb(con, "SELECT f.sample_id, f.score, l.score FROM {B0} f JOIN {B} l USING (sample_id)")


def test_create_set_from_self_influence(con):
    """The central workflow of issue #18: a set of the suspects, made in one statement."""
    out = con.execute("CREATE OR REPLACE SET suspects AS SELECT sample_id FROM SELF_INFLUENCE(checkpoints=[c1]) "
                      "ORDER BY score DESC LIMIT 5").fetchall()
    assert out == [("set suspects: 5 samples",)]
    want = by_duckdb(con, "SELECT sample_id FROM {B} b ORDER BY score DESC LIMIT 5")
    assert sorted((i,) for i in con.store.set_ids("suspects")) == want
    definition = con.execute("SELECT definition FROM sets WHERE name = 'suspects'").fetchone()[0]
    assert definition.startswith("SELECT sample_id FROM SELF_INFLUENCE(") and "_metaql" not in definition
    # the set is usable by the next query at once
    assert len(con.execute("SELECT * FROM INFLUENCE(query=batch(test), train=batch(suspects))").fetchall()) == 5


def test_create_set_with_parameters_in_the_call_and_around_it(con):
    con.execute("CREATE OR REPLACE SET p AS SELECT sample_id FROM INFLUENCE(query=batch(?)) r "
                "WHERE r.score > ? ORDER BY score DESC LIMIT ?", ["test", -1.0, 3])
    want = by_duckdb(con, "SELECT sample_id FROM {A} a WHERE score > -1.0 ORDER BY score DESC LIMIT 3")
    assert sorted((i,) for i in con.store.set_ids("p")) == want


def test_create_table_insert_select_and_copy(con, tmp_path):
    want = by_duckdb(con, "SELECT * FROM {B} b")
    con.execute("CREATE OR REPLACE TABLE mine AS SELECT * FROM SELF_INFLUENCE(checkpoints=[c1])")
    assert rows(con.execute("SELECT * FROM mine").arrow()) == want
    con.execute("INSERT INTO mine SELECT * FROM SELF_INFLUENCE(checkpoints=[c1]) WHERE score > ?", [0.0])
    assert con.execute("SELECT count(*) FROM mine").fetchone()[0] == \
        len(want) + len(by_duckdb(con, "SELECT * FROM {B} b WHERE score > 0"))
    con.execute(f"COPY (SELECT * FROM SELF_INFLUENCE(checkpoints=[c1])) TO '{tmp_path}/s.parquet'")
    assert rows(pq.read_table(tmp_path / "s.parquet")) == want
    con.execute(f"COPY (SELECT * FROM SELF_INFLUENCE(checkpoints=[c1])) TO '{tmp_path}/s.csv' (FORMAT csv)")
    assert len(pacsv.read_csv(tmp_path / "s.csv")) == len(want)
    con.execute(f"COPY (SELECT * FROM SELF_INFLUENCE(checkpoints=[c1])) TO '{tmp_path}/s.json' (FORMAT json)")
    assert sorted(json.loads(line)["sample_id"] for line in open(tmp_path / "s.json")) == [r[0] for r in want]


@pytest.mark.parametrize("sql, params, template, ref_params", [
    ("SELECT TOPK(?) train FROM INFLUENCE(query=batch(?)) ORDER BY DESC", [3, "test"],
     "SELECT * FROM {A} a ORDER BY score DESC LIMIT 3", None),
    ("SELECT * FROM INFLUENCE(query=batch(?)) LIMIT ?", ["test", 100], "SELECT * FROM {A} a", None),
    ("SELECT * FROM INFLUENCE(query=batch($2)) WHERE score > $1", [0.0, "test"],
     "SELECT * FROM {A} a WHERE score > ?", [0.0]),
    ("SELECT * FROM INFLUENCE(query=batch($q)) WHERE score < $m", {"q": "test", "m": 0.0},
     "SELECT * FROM {A} a WHERE score < ?", [0.0]),
    ("SELECT s.sample_id FROM samples s WHERE s.label = ? AND s.sample_id IN "
     "(SELECT sample_id FROM INFLUENCE(query=batch(?), checkpoints=[?]))", [1, "test", "c1"],
     "SELECT s.sample_id FROM samples s WHERE s.label = 1 AND s.sample_id IN (SELECT sample_id FROM {C1} c)", None),
])
def test_parameters_in_every_position(con, sql, params, template, ref_params):
    assert rows(con.execute(sql, params).arrow()) == by_duckdb(con, template, ref_params)


def test_duckdb_statements_stay_duckdb(con):
    db = con.store.db
    for sql in ("DESCRIBE samples", "SUMMARIZE samples", "EXPLAIN SELECT * FROM samples"):
        assert con.execute(sql).fetchall() == db.sql(sql).fetchall(), sql
    assert "query" in [r[0] for r in con.execute("DESCRIBE INFLUENCE").fetchall()]
    plan = [r[0] for r in con.execute("EXPLAIN SELECT a.sample_id FROM INFLUENCE(query=batch(test)) a "
                                      "JOIN samples USING (sample_id)").fetchall()]
    assert plan[0].startswith("INFLUENCE")
    plan = [r[0] for r in con.execute("EXPLAIN ANALYZE SELECT * FROM INFLUENCE(query=batch(test)) a "
                                      "JOIN SELF_INFLUENCE(checkpoints=[c1]) b USING (sample_id)").fetchall()]
    assert plan[0] == "INFLUENCE(query=batch(test))" and plan[-1].startswith("total:")


ERRORS = [
    ("SELECT * FROM INFLUENCE(query=batch(test)) WHERE score = 'abc'", "INFLUENCE(query=batch(test)) AS influence"),
    ("SELECT * FROM INFLUENCE(query=batch(test)) AS r(a, b, c)", 'table "r"'),
    ("SELECT nosuch FROM INFLUENCE(query=batch(test))", "nosuch"),
    ("SELECT * FROM INFLUENCE(query=batch(test)) WHERE WHERE", "WHERE"),
    ("SELECT * FROM INFLUENCE(query=batch(test)) JOIN SELF_INFLUENCE(checkpoints=[c1]) USING (nosuch)", "nosuch"),
    ("SELECT * FROM INFLUENCE(query=batch(nosuch)) a JOIN samples USING (sample_id)", "nosuch"),
    ("SELECT * FROM samples JOIN INFLUENCE(query=batch(test), layers=[fc1 fc2]) USING (sample_id)", "fc2"),
    ("SELECT * FROM INFLUENCE(query=batch(test)), INFLUENCE(query=batch(test))", "influence"),
]


def test_errors_name_the_users_text_never_the_private_relation(con):
    for sql, words in ERRORS:
        with pytest.raises(metaql.Error) as e:
            con.execute(sql).fetchall()
        assert "_metaql" not in str(e.value) and words in str(e.value), (sql, str(e.value))
        leftover = con.store.db.sql("SELECT count(*) FROM duckdb_views() WHERE view_name LIKE '_metaql%'")
        assert leftover.fetchall()[0] == (0,)


@pytest.mark.parametrize("sql", [
    "INSERT INTO layers SELECT * FROM SELF_INFLUENCE(checkpoints=[c1])",
    "DELETE FROM samples WHERE sample_id IN (SELECT sample_id FROM SELF_INFLUENCE(checkpoints=[c1]))",
    "CREATE TABLE _metaql_call_0 AS SELECT * FROM SELF_INFLUENCE(checkpoints=[c1])",
])
def test_the_sql_guard_judges_the_statement_around_a_call(con, sql):
    with pytest.raises(metaql.ProgrammingError, match="refused"):
        con.execute(sql)
    assert con.verify() == []


def _scores(dtype, names=("sample_id", "score"), values=(0.5, 0.25, 1.0)):
    def fn(ctx, n: int = 3):
        return pa.table({names[0]: pa.array(range(n), pa.int64()), names[1]: pa.array(list(values)[:n], dtype)})
    return fn


def test_declared_output_columns_are_what_a_function_returns():
    with metaql.connect(":memory:") as c:
        declared = [("sample_id", "BIGINT"), ("score", "DOUBLE")]
        c.register_function(_scores(pa.float32()), name="F32", columns=declared)
        c.register_function(_scores(pa.float64(), names=("id", "score")), name="RENAMED", columns=declared)
        c.register_function(_scores(pa.string(), values=("a", "b", "c")), name="TEXT", columns=declared)
        got = c.execute("SELECT * FROM F32(n=2) f").arrow()
        assert got.schema.types == [pa.int64(), pa.float64()] and got.column("score").to_pylist() == [0.5, 0.25]
        assert c.execute("SELECT TOPK(1) train FROM F32()").fetchall() == [(2, 1.0)]
        for name in ("RENAMED", "TEXT"):
            with pytest.raises(metaql.InvalidInputException, match=r"declares \(sample_id BIGINT, score DOUBLE\)"):
                c.execute(f"SELECT * FROM {name}() x JOIN (SELECT 1 AS sample_id) USING (sample_id)")


def test_topk_over_a_function_without_a_score_column_is_refused_before_it_runs():
    ran = []

    def weights(ctx):
        ran.append(1)
        return pa.table({"sample_id": pa.array([1], pa.int64()), "weight": pa.array([1.0])})
    with metaql.connect(":memory:") as c:
        c.register_function(weights, name="WEIGHTS", columns=[("sample_id", "BIGINT"), ("weight", "DOUBLE")])
        with pytest.raises(metaql.BinderException, match="ORDER BY <column> DESC LIMIT n"):
            c.execute("SELECT TOPK(1) train FROM WEIGHTS() ORDER BY DESC")
        assert ran == []


def test_metaql_sql_runs_on_a_default_connection():
    assert metaql.sql("SELECT 42 AS x").fetchall() == [(42,)]
    assert metaql.default_connection() is metaql.default_connection()


def test_a_declared_alternative_result_passes_and_is_typed(con):
    """INFLUENCE(total=true) returns its other declared shape (train_samples, score)."""
    got = con.execute("SELECT * FROM INFLUENCE(query=batch(test), total=true) t").arrow()
    assert got.column_names == ["train_samples", "score"] and got.schema.types == [pa.int64(), pa.float64()]


def test_a_missing_parameter_around_a_call_is_named(con):
    with pytest.raises(metaql.BinderException, match=r"named parameter \$m is missing"):
        con.execute("SELECT * FROM INFLUENCE(query=batch($q)) WHERE score < $m", {"q": "test"})
    with pytest.raises(metaql.BinderException, match="parameter 2 is missing: 1 parameters were passed"):
        con.execute("SELECT * FROM INFLUENCE(query=batch(?)) LIMIT ?", ["test"])
