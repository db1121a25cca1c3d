"""Text -> AST, routing to DuckDB, and errors with line, column and caret."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

import metaql
from metaql import ast
from metaql.parser import parse, split_statements

FNS = ["INFLUENCE", "SELF_INFLUENCE"]


def one(text):
    [stmt] = parse(text, FNS)
    return stmt


def test_statements_parse_to_ast():
    s = one("select topk(500) train from influence(layers=[fc, conv13], query=batch(test_wrong)) order by asc;")
    assert isinstance(s, ast.TopKSelect) and s.k == 500 and s.train_set == "train" and s.ascending
    assert s.call.args["layers"] == ast.ListValue([ast.Name("fc"), ast.Name("conv13")])
    assert s.call.args["query"] == ast.Call("batch", [ast.Name("test_wrong")])
    s = one("SELECT sample_id, score FROM INFLUENCE(layers=*, query=point(4711)) AS r "
            "JOIN samples USING (sample_id) WHERE score < 0 ORDER BY score LIMIT 5")
    # issue #18: SQL around a call is DuckDB's; the parser cuts out the call and keeps the rest
    assert isinstance(s, ast.SQLWithCalls) and len(s.calls) == 1
    span, call = s.calls[0]
    assert s.text[span.start:span.end] == "INFLUENCE(layers=*, query=point(4711))" and span.has_alias
    assert call.args["query"] == ast.Call("point", [ast.Literal(4711)])
    assert one("CREATE OR REPLACE SET x AS SELECT 1 AS sample_id") == ast.CreateSet("x", "SELECT 1 AS sample_id", True)
    assert one("drop set if exists x") == ast.DropSet("x", True)
    assert one("SHOW layers") == ast.Show("layers")
    assert isinstance(one("EXPLAIN ANALYZE SELECT TOPK(3) train FROM INFLUENCE(query=batch(t))"), ast.Explain)
    assert one("SELECT split, count(*) FROM samples GROUP BY split") == \
        ast.PlainSQL("SELECT split, count(*) FROM samples GROUP BY split")


def test_query_words_stay_usable_as_names():
    s = one("SELECT TOPK(3) batch FROM INFLUENCE(layers=[train, query], query=batch(layers)) ORDER BY DESC")
    assert s.train_set == "batch" and s.call.args["query"] == ast.Call("batch", [ast.Name("layers")])


def test_topk_orders_by_score_as_sql_writes_it():
    """ORDER BY score [ASC|DESC] was a syntax error; ORDER BY score alone is ascending, as in SQL,
    and TOPK without ORDER BY keeps its documented DESC."""
    head = "SELECT TOPK(3) train FROM INFLUENCE(query=batch(t))"
    cases = {"ORDER BY score": True, "order by Score desc": False, "ORDER BY score ASC": True,
             "ORDER BY ASC": True, "ORDER BY DESC": False, "": False}
    for tail, ascending in cases.items():
        assert one(f"{head} {tail}").ascending is ascending, tail
    with pytest.raises(metaql.ParserException, match="ranks by the function's score") as e:
        one(f"{head} ORDER BY sample_id DESC")
    assert e.value.line == 1 and e.value.column == len(head) + 11


def test_parameters_and_literals():
    [(_, call)] = one("SELECT * FROM INFLUENCE(query=batch(?), similarity='cosine', k=$2, x=$name, y=-1.5e2)").calls
    assert call.args["query"] == ast.Call("batch", [ast.Parameter("1")])
    assert call.args["similarity"] == ast.Literal("cosine")
    assert call.args["k"] == ast.Parameter("2") and call.args["x"] == ast.Parameter("name")
    assert call.args["y"] == ast.Literal(-150.0)


def test_split_statements_respects_quotes_and_comments():
    text = "SELECT 'a;b' AS x; -- a comment; with semicolon\nSHOW SETS;\n\n;"
    assert split_statements(text) == ["SELECT 'a;b' AS x", " -- a comment; with semicolon\nSHOW SETS"]


@pytest.mark.parametrize("text, where, message", [
    ("SELECT TOPK 5 train FROM INFLUENCE(query=batch(t))", (1, 13), "TOPK\\(n\\) with the count"),
    ("SELECT TOPK(5) train FROM INFLUENCE(query=batch(t)) ORDER BY up", (1, 62), "write ORDER BY score ASC\\|DESC"),
    ("SELECT TOPK(5) train\nFROM INFLUENCE(layers=[fc1 query=batch(t))", (2, 28), "expected '\\(', ',' or '\\]'"),
    ("SELECT TOPK(5) train FROM INFLUENCE(layers=fc1, fc2, query=batch(t)) ORDER BY ASC", None, "layers=\\[fc1, fc2\\]"),
])
def test_parse_errors_point_at_the_spot(text, where, message):
    with metaql.connect(":memory:") as con:
        with pytest.raises(metaql.ProgrammingError, match=message) as err:
            con.execute(text)
    if where:
        assert (err.value.line, err.value.column) == where
        caret_line = str(err.value).splitlines()[-1]
        assert caret_line.index("^") - 2 == where[1] - 1
    assert "__ANON" not in str(err.value)


def test_missing_topk_is_explained():
    with metaql.connect(":memory:") as con, pytest.raises(metaql.ParserException, match="needs a count.*TOPK\\(n\\) train"):
        con.execute("SELECT train FROM INFLUENCE(query=batch(test)) ORDER BY ASC")


@given(st.text(max_size=80))
def test_front_end_raises_only_metaql_errors(text):
    with metaql.connect(":memory:") as con:
        try:
            con.execute(text)
        except metaql.Error:
            pass


@given(st.lists(st.sampled_from(["SELECT", "TOPK", "(", ")", "3", "train", "FROM", "INFLUENCE", "layers", "=",
                                 "[", "]", ",", "*", "query", "batch", "point", "ORDER", "BY", "ASC", "CREATE",
                                 "SET", "AS", "DROP", "EXPLAIN", "SHOW", "'x'", "?", ";"]), max_size=14))
def test_token_soup_raises_only_metaql_errors(tokens):
    with metaql.connect(":memory:") as con:
        try:
            con.execute(" ".join(tokens), [1])
        except metaql.Error:
            pass
