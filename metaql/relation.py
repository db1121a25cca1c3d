"""Relations, after DuckDB's DuckDBPyRelation: what `con.sql()`, `con.table()` and `metaql.sql()` return.

A relation is a statement, not a result: its SQL text (which may call MetaQL's table functions) and
its parameters. Relational methods (`filter`, `project`, `order`, `limit`, `aggregate`, `join`,
`union`, ...) return a new relation whose SQL wraps this one as a subquery; nothing runs until a
fetch (`fetchall`, `df`, `arrow`, iteration, `write_parquet`, ...), and every fetch runs the whole
statement again, as DuckDB does: a relation over `samples` sees samples added since, and a MetaQL
table function inside a relation is recomputed on each fetch (no result is cached; keep one with
`rel.arrow()` or `rel.to_table('mine')`).

What is wrapped and what is not:
- A query (SELECT, WITH, FROM, VALUES, TABLE, with or without table-function calls) is wrapped as
  text, so the composed statement is one statement that MetaQL parses, binds and runs as usual, and
  that the SQL guard (storage/sqlguard.py) judges as a whole, like any statement a user writes.
- Other reads (TOPK, SHOW, DESCRIBE, EXPLAIN, SUMMARIZE, PRAGMA) run on each fetch; a relation
  built on one of them reads its result through a private relation registered for that fetch.
- A statement that writes (CREATE SET, CREATE TABLE, INSERT, COPY, ...) runs once, on first use
  (so `con.sql("CREATE SET ...")` stays lazy, as before), and its status row is kept.

Expressions given to the methods are the user's SQL: each must stay inside its place in the
composed statement (no ';', no bracket it did not open, no unterminated quote or comment), so a
relation is never a way around the SQL guard. The schema (columns, types) is bound when a relation
is built, without running table functions whose output columns are declared; a wrong column in
`filter(...)` fails there, naming the method and the user's text.
"""
from __future__ import annotations

import itertools
import re
from contextlib import contextmanager
from typing import Any, Iterator

import duckdb
import numpy as np
import pyarrow as pa

from metaql import ast
from metaql.errors import BinderException, Error, InvalidInputException, ParserException, ProgrammingError
from metaql.result import Result, rows_of
from metaql.sqlcalls import _skip, parameters_of

_SOURCE_IDS = itertools.count()
_PRIVATE_SOURCE = re.compile(r"_metaql_rel_\d+")
_QUERY_STARTS = re.compile(r"^\s*(select|with|from|values|table|\()", re.I)
_PLAIN_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*){0,2}$")
_JOINS = {"inner": "JOIN", "left": "LEFT JOIN", "right": "RIGHT JOIN", "outer": "FULL OUTER JOIN",
          "full": "FULL OUTER JOIN", "semi": "SEMI JOIN", "anti": "ANTI JOIN", "cross": "CROSS JOIN",
          "positional": "POSITIONAL JOIN"}
_UNNAMED = itertools.count()


class Relation:
    """A lazy statement with DuckDB's relational methods; see the module docstring."""

    def __init__(self, con, *, text: str | None = None, params=None, statement=None, sources=None,
                 alias: str | None = None):
        self._con = con
        self._text = text                   # a query, for a composable relation
        self._params = params               # list ($1..), dict ($name) or None
        self._statement = statement         # (ast node, original text, params) of a non-query relation
        self._sources: dict[str, Relation] = dict(sources or {})
        self._alias = alias
        self._schema: pa.Schema | None = None
        self._memo: list = [None]           # a write's result, kept (it runs once); shared by aliases
        self._pending: Result | None = None # what fetchone/fetchmany have not read yet
        self._captured: dict = {}            # Python objects read by name (metaql/pyobjects.py)

    # ---- construction ----------------------------------------------------------------------------------
    @classmethod
    def of_statement(cls, con, stmt, text: str, params) -> "Relation":
        """The relation of one parsed statement as the user wrote it."""
        kind = _kind(stmt, text)
        if kind == "query":
            rel = cls(con, text=_numbered(text, params), params=_param_list(params))
            rel._bind("")
            return rel
        return cls(con, statement=(stmt, text, params, kind == "write"))

    def _derive(self, text_of, *others: "Relation", alias: str | None = None, what: str = "") -> "Relation":
        """A relation whose SQL is text_of(subquery of self, subqueries of others...)."""
        parts, params, sources, captured = [], self._params, {}, {}
        for rel in (self, *others):
            captured.update(rel._captured)
            if rel is not self and rel._con is not self._con:
                raise InvalidInputException("cannot combine relations of different connections")
            body, rel_params, rel_sources = rel._as_query()
            if rel is not self:
                body, params = _merged(body, params, rel_params)
            sources.update(rel_sources)
            parts.append(body)
        rel = Relation(self._con, text=text_of(*parts), params=params, sources=sources,
                       alias=alias if alias is not None else self._alias)
        rel._captured = captured
        rel._bind(what)
        return rel

    def _as_query(self) -> tuple[str, Any, dict]:
        """(SQL text, parameters, private sources) that read this relation as a subquery."""
        if self._text is not None:
            return self._text, self._params, self._sources
        name = f"_metaql_rel_{next(_SOURCE_IDS)}"
        return f"SELECT * FROM {name}", None, {name: self}

    def _subquery(self, body: str) -> str:
        return f"(\n{body}\n) AS {_quoted(self.alias)}"

    # ---- relational methods --------------------------------------------------------------------------
    def filter(self, filter_expr: str) -> "Relation":
        expr = _fragment(filter_expr, "filter")
        return self._derive(lambda q: f"SELECT * FROM {self._subquery(q)} WHERE (\n{expr}\n)",
                            what=f"filter({filter_expr!r})")

    def project(self, *exprs: str, groups: str = "") -> "Relation":
        """As DuckDB's: one string is a select list ("a, b * 2 AS c"); several are column names."""
        if not exprs:
            raise InvalidInputException("project() needs at least one expression or column name")
        items = _fragment(exprs[0], "project") if len(exprs) == 1 else ", ".join(_column(e) for e in exprs)
        if groups:
            return self.aggregate(items, groups)
        return self._derive(lambda q: f"SELECT {items}\n FROM {self._subquery(q)}",
                            what=f"project({', '.join(map(repr, exprs))})")

    select = project

    def order(self, order_expr: str) -> "Relation":
        expr = _fragment(order_expr, "order")
        return self._derive(lambda q: f"SELECT * FROM {self._subquery(q)} ORDER BY {expr}\n",
                            what=f"order({order_expr!r})")

    def sort(self, *exprs: str) -> "Relation":
        if not exprs:
            raise InvalidInputException("sort() needs at least one expression to sort on")
        return self.order(", ".join(_fragment(e, "sort") for e in exprs))

    def limit(self, n: int, offset: int = 0) -> "Relation":
        n, offset = _count("limit n", n), _count("limit offset", offset)
        return self._derive(lambda q: f"SELECT * FROM {self._subquery(q)} LIMIT {n} OFFSET {offset}")

    def head(self, n: int = 5) -> "Relation":
        return self.limit(n)

    def distinct(self) -> "Relation":
        return self._derive(lambda q: f"SELECT DISTINCT * FROM {self._subquery(q)}")

    def aggregate(self, aggr_expr: str, group_expr: str = "") -> "Relation":
        items = _fragment(aggr_expr, "aggregate")
        groups = f" GROUP BY {_fragment(group_expr, 'aggregate')}\n" if str(group_expr).strip() else ""
        return self._derive(lambda q: f"SELECT {items}\n FROM {self._subquery(q)}{groups}",
                            what=f"aggregate({aggr_expr!r}" + (f", {group_expr!r})" if groups else ")"))

    def count(self, expression: str = "*", groups: str = "") -> "Relation":
        return self._shortcut("count", expression, groups)

    def sum(self, expression: str, groups: str = "") -> "Relation":
        return self._shortcut("sum", expression, groups)

    def min(self, expression: str, groups: str = "") -> "Relation":
        return self._shortcut("min", expression, groups)

    def max(self, expression: str, groups: str = "") -> "Relation":
        return self._shortcut("max", expression, groups)

    def avg(self, expression: str, groups: str = "") -> "Relation":
        return self._shortcut("avg", expression, groups)

    mean = avg

    def _shortcut(self, fn: str, expression: str, groups: str) -> "Relation":
        expr = _fragment(expression, fn)
        head = f"{groups}, " if str(groups).strip() else ""
        return self.aggregate(f"{head}{fn}({expr}\n)", groups)

    def union(self, union_rel: "Relation") -> "Relation":
        """All rows of both (UNION ALL, as DuckDB's relational union)."""
        return self._set_op("UNION ALL", union_rel)

    def except_(self, other_rel: "Relation") -> "Relation":
        return self._set_op("EXCEPT ALL", other_rel)

    def intersect(self, other_rel: "Relation") -> "Relation":
        return self._set_op("INTERSECT ALL", other_rel)

    def query(self, virtual_table_name: str, sql_query: str) -> "Relation":
        """As DuckDB's: a relation for `sql_query` (one query) that reads this relation under the
        name `virtual_table_name`."""
        body = _fragment(sql_query, "query")
        first = body.lstrip().split(None, 1)[0].upper() if body.strip() else ""
        if first not in ("SELECT", "WITH", "FROM", "VALUES", "TABLE", "("):
            raise InvalidInputException(f"query() takes one query (SELECT, WITH, FROM, ...), not {first or 'nothing'}; "
                                        "run other statements with con.execute")
        name = _quoted(str(virtual_table_name))
        return self._derive(lambda q: f"WITH {name} AS (\n{q}\n)\n{body}", alias=str(virtual_table_name),
                            what=f"query({virtual_table_name!r}, {_clip(sql_query)!r})")

    def _set_op(self, keyword: str, other: "Relation") -> "Relation":
        other = _relation(other)
        return self._derive(lambda a, b: f"SELECT * FROM (\n{a}\n) {keyword} SELECT * FROM (\n{b}\n)", other,
                            what=keyword.split()[0].lower())

    def join(self, other_rel: "Relation", condition: str | list | None = None, how: str = "inner") -> "Relation":
        """DuckDB's join: `condition` is SQL (ON) or a column name or list of names (USING);
        `how` inner, left, right, outer/full, semi, anti, cross or positional."""
        other = _relation(other_rel)
        kind = str(how).strip().lower()
        if kind not in _JOINS:
            raise InvalidInputException(f"unsupported join type {how!r}; use one of {', '.join(_JOINS)}")
        if self.alias.lower() == other.alias.lower():
            raise InvalidInputException("both relations have the same alias; rename one with "
                                        "rel.set_alias('other_name')")
        on = _join_condition(condition, kind)
        left, right = self, other
        return self._derive(lambda a, b: f"SELECT * FROM {left._subquery(a)} {_JOINS[kind]} {right._subquery(b)}"
                            f"{on}", other, alias=f"{kind}_join_{next(_UNNAMED)}",
                            what=f"join(..., {condition!r}, how={how!r})")

    def cross(self, other_rel: "Relation") -> "Relation":
        return self.join(other_rel, how="cross")

    def set_alias(self, alias: str) -> "Relation":
        if not isinstance(alias, str) or not alias.strip():
            raise InvalidInputException("an alias is a non-empty string")
        rel = self._copy()
        rel._alias = alias
        return rel

    def _copy(self) -> "Relation":
        rel = Relation(self._con, text=self._text, params=self._params, statement=self._statement,
                       sources=self._sources, alias=self._alias)
        rel._schema, rel._memo, rel._captured = self._schema, self._memo, self._captured
        return rel

    # ---- properties ----------------------------------------------------------------------------------
    @property
    def alias(self) -> str:
        if self._alias is None:
            self._alias = f"unnamed_relation_{next(_UNNAMED)}"
        return self._alias

    @property
    def columns(self) -> list[str]:
        return self._bound().names

    @property
    def types(self) -> list:
        return _duck_types(self._con, self._bound())

    dtypes = types

    @property
    def description(self) -> list[tuple]:
        return [(n, t, None, None, None, None, None) for n, t in zip(self.columns, self.types)]

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), len(self.columns)

    def __len__(self) -> int:
        if self._text is None:
            return self._run().arrow().num_rows
        return int(self.count("*").fetchall()[0][0])

    def __contains__(self, name: str) -> bool:
        return str(name).lower() in (c.lower() for c in self.columns)

    def sql_query(self) -> str:
        """The SQL this relation runs (a relation over a MetaQL statement that is not a query reads
        it through a private name, `_metaql_rel_N`)."""
        return self._text if self._text is not None else self._statement[1]

    # ---- output --------------------------------------------------------------------------------------
    def fetchall(self) -> list[tuple]:
        return self._rest().fetchall()

    def fetchone(self):
        """The next row of a result kept between fetchone/fetchmany calls (DuckDB 1.x's cursor
        behaviour); None at the end, and the next fetch runs the relation again."""
        row = self._open().fetchone()
        if row is None:
            self._pending = None
        return row

    def fetchmany(self, size: int = 1) -> list[tuple]:
        rows = self._open().fetchmany(size)
        if not rows:
            self._pending = None
        return rows

    def arrow(self, batch_size: int | None = None) -> pa.Table:
        return self._rest().arrow()

    fetch_arrow_table = to_arrow_table = arrow

    def df(self, *, date_as_object: bool = False):
        return self._rest().df()

    fetchdf = to_df = df

    def fetchnumpy(self) -> dict[str, np.ndarray]:
        return self._rest().fetchnumpy()

    def pl(self):
        return self._rest().pl()

    def torch(self) -> dict:
        return self._rest().torch()

    def to_dicts(self) -> list[dict]:
        return self._rest().arrow().to_pylist()

    def plot(self, column: str = "score", **kwargs):
        """A histogram of one numeric column (default `score`) as a matplotlib Figure, for
        notebooks: metaql.plot.score_histogram over this relation's rows (extra `plot`)."""
        from metaql import plot
        table = self.arrow()
        if column not in table.column_names:
            raise BinderException(f"no column {column!r} to plot; the columns are {table.column_names}")
        return plot.score_histogram(table.column(column), xlabel=column, **kwargs)

    def __iter__(self) -> Iterator[tuple]:
        table = self._rest().arrow()
        for batch in table.to_batches():
            yield from rows_of(batch)

    iter_rows = __iter__

    def show(self, max_rows: int = 20) -> None:
        print(self._preview(max_rows))

    def __repr__(self) -> str:
        return self._preview(20)

    __str__ = __repr__

    def _preview(self, max_rows: int) -> str:
        from metaql.format import render
        return render(self._run().arrow(), "box", max_rows)

    def write_parquet(self, file_name: str, compression: str | None = None) -> None:
        """Writes the relation to a Parquet file (COPY ... TO, so a path inside the store is refused)."""
        options = ["FORMAT parquet"] + ([f"COMPRESSION {_literal(compression)}"] if compression else [])
        self._copy_to(file_name, options)

    to_parquet = write_parquet

    def write_csv(self, file_name: str, sep: str | None = None, na_rep: str | None = None,
                  header: bool | None = None, quotechar: str | None = None, escapechar: str | None = None,
                  compression: str | None = None) -> None:
        """Writes the relation to a CSV file (COPY ... TO, so a path inside the store is refused)."""
        chosen = {"DELIMITER": sep, "NULLSTR": na_rep, "HEADER": header, "QUOTE": quotechar,
                  "ESCAPE": escapechar, "COMPRESSION": compression}
        self._copy_to(file_name, ["FORMAT csv"] + [f"{k} {_literal(v)}" for k, v in chosen.items() if v is not None])

    to_csv = write_csv

    def _copy_to(self, file_name, options: list[str]) -> None:
        if not isinstance(file_name, str) or not file_name:
            raise InvalidInputException("the file name is a non-empty string")
        self._statement_run(lambda q: f"COPY (\n{q}\n) TO {_literal(file_name)} ({', '.join(options)})")

    def to_table(self, table_name: str) -> None:
        """Creates a table holding the relation's rows (CREATE TABLE ... AS; the guard refuses
        MetaQL's own names)."""
        self._statement_run(lambda q: f"CREATE TABLE {_name(table_name)} AS\n{q}\n")

    create = to_table

    def insert_into(self, table_name: str) -> None:
        """Appends the relation's rows to a table (INSERT INTO labels goes through the labels API)."""
        self._statement_run(lambda q: f"INSERT INTO {_name(table_name)}\n{q}\n")

    def create_view(self, view_name: str, replace: bool = True) -> "Relation":
        """A DuckDB view of this relation's SQL. Refused when it calls a MetaQL table function or
        takes parameters: DuckDB alone re-runs a view, and can do neither; use to_table()."""
        body, params, sources = self._as_query()
        if sources or params or self._calls(body):
            raise ProgrammingError("create_view() needs plain DuckDB SQL: this relation calls a MetaQL table "
                                   "function, reads a MetaQL statement or takes parameters, which a DuckDB view "
                                   "cannot re-run; keep its rows with rel.to_table('name') instead")
        self._statement_run(lambda q: f"CREATE {'OR REPLACE ' if replace else ''}VIEW {_name(view_name)} AS\n{q}\n")
        return self._con.table(view_name)

    to_view = create_view

    # ---- running -------------------------------------------------------------------------------------
    def _open(self) -> Result:
        if self._pending is None:
            self._pending = self._run()
        return self._pending

    def _rest(self) -> Result:
        """The rows fetchone/fetchmany have left, or a fresh run."""
        if self._pending is None:
            return self._run()
        pending, self._pending = self._pending, None
        return Result(pending.arrow().slice(pending._pos))

    def _run(self) -> Result:
        self._con._check_open()
        if self._text is None:
            return self._run_statement()
        result = self._execute(self._text, self._params)
        self._schema = result.arrow().schema
        return result

    def _run_statement(self) -> Result:
        stmt, text, params, once = self._statement
        if once and self._memo[0] is not None:
            return Result(self._memo[0])
        result = self._con._run(stmt, params)
        if once:
            self._memo[0] = result.arrow()
        self._schema = result.arrow().schema
        return Result(result.arrow())

    def _statement_run(self, text_of) -> None:
        body, params, sources = self._as_query()
        self._execute(text_of(body), params, sources)

    def _execute(self, text: str, params, sources=None) -> Result:
        """Runs `text` (one statement) through the connection, each private source registered as
        its relation's result for this run; errors name the user's statements, never a private name."""
        from metaql.connection import _parsed
        sources = self._sources if sources is None else sources
        statements = _parsed(text, self._con.registry.names())
        if len(statements) != 1:
            raise ProgrammingError("a relation is one statement")
        from metaql.pyobjects import capturing
        with self._registered(sources), capturing(self._con, self._captured):
            return self._con._run(statements[0], params)

    @contextmanager
    def _registered(self, sources: dict):
        from metaql.storage.catalog import register, unregister
        db, done = self._con.store.db, []
        shown = {name: _clip(rel._statement[1]) for name, rel in sources.items()}
        try:
            for name, rel in sources.items():
                register(db, name, rel._run_statement().arrow())
                done.append(name)
            yield
        except Error as e:
            raise _renamed(e, shown) from None
        finally:
            for name in done:
                try:
                    unregister(db, name)
                except duckdb.Error:     # the statement's own error is the one to report
                    pass

    # ---- binding -------------------------------------------------------------------------------------
    def _bound(self) -> pa.Schema:
        if self._schema is None:
            if self._text is None:
                self._run()
            else:
                self._schema = self._dry_schema() or self._execute(f"(\n{self._text}\n) LIMIT 0",
                                                                   self._params).arrow().schema
        return self._schema

    def _bind(self, what: str) -> None:
        """Binds the new relation's schema now when that runs no table function (DuckDB binds a
        relation when it is built); a wrong expression fails here, naming the method."""
        try:
            self._schema = self._dry_schema()
        except Error as e:
            raise type(e)(f"{what}: {e}" if what else str(e)) from None

    def _calls(self, text: str) -> list:
        from metaql.sqlcalls import find_calls
        return find_calls(text, {n.upper() for n in self._con.registry.names()})

    def _dry_schema(self) -> pa.Schema | None:
        """The schema, from DuckDB's binder over empty stand-ins for every table function whose
        columns are declared; None when a call (or a non-query source) would have to run."""
        from metaql.connection import _parsed
        if any(rel._memo[0] is None for rel in self._sources.values()):
            return None
        stmt = _parsed(f"(\n{self._text}\n) LIMIT 0", self._con.registry.names())[0]
        stand_ins = {}
        if isinstance(stmt, ast.SQLWithCalls):
            for _, call in stmt.calls:
                empty = _empty_result(self._con.registry.get(call.name))
                if empty is None:
                    return None
                stand_ins[f"_metaql_dry_{len(stand_ins)}"] = empty
            from metaql.sqlcalls import rewritten
            text = rewritten(stmt.text, stmt.lo, stmt.hi, [s for s, _ in stmt.calls], list(stand_ins))
        elif isinstance(stmt, ast.PlainSQL):
            text = stmt.text
        else:
            return None
        return self._dry_run(text, stand_ins, stmt)

    def _dry_run(self, text: str, stand_ins: dict, stmt) -> pa.Schema:
        from metaql.connection import as_metaql_error, _refuse_internal_writes
        from metaql.sqlcalls import bound_parameters
        from metaql.pyobjects import capturing, ensure_registered, with_python_objects
        from metaql.storage.catalog import query_arrow, register, unregister
        self._con.store.refresh()
        db = ensure_registered(self._con)
        shown = {name: _clip(rel._statement[1]) for name, rel in self._sources.items()}
        done = []
        try:
            _refuse_internal_writes(text, self._con.store.root)
            for name, table in stand_ins.items():
                register(db, name, table)
                done.append(name)
            for name, rel in self._sources.items():
                register(db, name, rel._memo[0])
                done.append(name)
            sql, params = bound_parameters(text, self._params)
            with capturing(self._con, self._captured):
                return with_python_objects(self._con, lambda: query_arrow(db, sql, params)).schema
        except Exception as e:
            error = as_metaql_error(e)
            if error is e and not isinstance(e, Error):
                raise
            calls = {name: _clip(stmt.text[span.start:span.end]) for name, (span, _) in
                     zip(stand_ins, getattr(stmt, "calls", []))}
            raise _renamed(error, {**shown, **calls}) from None
        finally:
            for name in done:
                try:
                    unregister(db, name)
                except duckdb.Error:
                    pass


# ---- helpers -------------------------------------------------------------------------------------------
def _kind(stmt, text: str) -> str:
    """'query' (wrappable as a subquery), 'read' (re-run on each fetch) or 'write' (run once)."""
    if isinstance(stmt, (ast.TopKSelect, ast.Show, ast.Describe, ast.Explain)):
        return "read"
    if isinstance(stmt, (ast.CreateSet, ast.DropSet, ast.DropCheckpoint)):
        return "write"
    from metaql.parser import _strip_comments
    head = re.sub(r"/\*.*?\*/", " ", _strip_comments(text), flags=re.S)
    if isinstance(stmt, ast.SQLWithCalls):
        if stmt.lo > 0:      # EXPLAIN [ANALYZE] of SQL with calls
            return "read"
        return "query" if _QUERY_STARTS.match(head) else "write"
    try:
        kinds = [s.type.name for s in duckdb.extract_statements(text)]
    except duckdb.Error:
        return "write"       # run once; the statement's own error surfaces then
    if kinds == ["SELECT"]:
        return "query" if _QUERY_STARTS.match(head) else "read"
    return "read" if kinds in (["EXPLAIN"], ["PRAGMA"]) else "write"


def _numbered(text: str, params) -> str:
    """The query with each positional '?' written as '$n', so that relations combine by number."""
    from metaql.sqlcalls import number_parameters
    return number_parameters(text) if isinstance(params, (list, tuple)) else text


def _param_list(params):
    if params is None or isinstance(params, dict):
        return params
    if isinstance(params, (list, tuple)):
        return list(params)
    return params        # the connection explains what it cannot bind


def _merged(text: str, left, right) -> tuple[str, Any]:
    """(the right relation's text renumbered after the left's parameters, both parameters)."""
    if right is None or (isinstance(right, (list, dict)) and not right):
        return text, left
    if left is None or (isinstance(left, (list, dict)) and not left):
        return text, right
    if isinstance(left, dict) and isinstance(right, dict):
        clash = [k for k in left.keys() & right.keys() if left[k] is not right[k] and left[k] != right[k]]
        if clash:
            raise ProgrammingError(f"both relations take the parameter ${clash[0]} with different values; "
                                   "rename it in one of them")
        return text, {**left, **right}
    if isinstance(left, list) and isinstance(right, list):
        shift, out, at = len(left), [], 0
        for start, end, key in parameters_of(text):
            if key.isdigit():
                out.append(text[at:start] + f"${int(key) + shift}")
                at = end
        out.append(text[at:])
        return "".join(out), left + right
    raise ProgrammingError("cannot combine a relation with positional parameters and one with named "
                           "parameters; give both the same style")


def _fragment(text, what: str) -> str:
    """A user's expression, checked to stay inside its place in the composed statement."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidInputException(f"{what}() takes SQL text, e.g. \"score > 0\"; got {text!r:.60}")
    shown = _clip(text)
    if parameters_of(text):
        raise ProgrammingError(f"{what}({shown!r}): an expression takes no parameters; pass values to "
                               "con.sql(query, parameters) and refer to them there")
    depth, i = 0, 0
    while i < len(text):
        j = _skip(text, i)
        if j != i:
            if not _closed(text, i, j):
                raise ParserException(f"{what}({shown!r}): a quote or comment is never closed")
            i = j
            continue
        c = text[i]
        if c == ";":
            raise ParserException(f"{what}({shown!r}): an expression holds no ';' (one statement only)")
        depth += (c in "([") - (c in ")]")
        if depth < 0:
            raise ParserException(f"{what}({shown!r}): a bracket is closed that the expression never opened")
        i += 1
    if depth:
        raise ParserException(f"{what}({shown!r}): a bracket is never closed")
    return text


def _closed(text: str, i: int, j: int) -> bool:
    """Whether the quoted string or comment text[i:j] ends inside the text."""
    if text.startswith("--", i):
        return True       # ends at the line's end; the composed statement puts a newline after it
    if text.startswith("/*", i):
        return j - i >= 4 and text[i:j].endswith("*/")
    if text.startswith("$$", i):
        return j - i >= 4 and text[i:j].endswith("$$")
    return j - i >= 2 and text[j - 1] == text[i]


def _column(name) -> str:
    """One column name of several given to project(): a reference as written, else quoted whole."""
    if not isinstance(name, str) or not name:
        raise InvalidInputException(f"project() takes column names or one select list, got {name!r:.60}")
    if name == "*" or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?", name):
        return name
    return _quoted(name)


def _count(what: str, value) -> int:
    import numbers
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise InvalidInputException(f"{what} must be a whole number >= 0, got {value!r:.60}")
    return int(value)


def _join_condition(condition, kind: str) -> str:
    if kind in ("cross", "positional"):
        if condition is not None:
            raise InvalidInputException(f"a {kind} join takes no condition")
        return ""
    if condition is None:
        raise InvalidInputException(f"a {kind} join needs a condition: SQL text (ON) or column names (USING)")
    if isinstance(condition, (list, tuple)):
        names = [str(c) for c in condition]
    elif isinstance(condition, str) and re.fullmatch(r"\s*[A-Za-z_][A-Za-z0-9_]*\s*", condition):
        names = [condition.strip()]
    else:
        return f" ON (\n{_fragment(condition, 'join')}\n)"
    if not names or not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n) for n in names):
        raise InvalidInputException(f"join columns must be plain column names, got {condition!r:.60}")
    return f" USING ({', '.join(names)})"


def _relation(other) -> Relation:
    if not isinstance(other, Relation):
        raise InvalidInputException(f"expected a metaql relation (con.sql(...), con.table(...)), "
                                    f"not {type(other).__name__}")
    return other


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _name(name) -> str:
    """A table name as the user gave it: plain or dotted names as written, anything else quoted."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidInputException("a table name is a non-empty string")
    return name if _PLAIN_NAME.match(name) else _quoted(name)


def _literal(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"


def _clip(text: str, n: int = 80) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n - 3] + "..."


_SOURCES = re.compile(r"_metaql_(rel|dry)_\d+")


def _renamed(e: Error, shown: dict[str, str]) -> Error:
    """`e` with every private source name replaced by the user's statement."""
    return renamed(e, shown, _SOURCES, "a relation")


def renamed(e: BaseException, shown: dict[str, str], private: re.Pattern, fallback: str) -> BaseException:
    """A metaql.Error `e` with every private name `private` matches replaced by what the user wrote
    (`shown`, else `fallback`); any other exception as it is."""
    msg = str(e)
    if not isinstance(e, Error) or not private.search(msg):
        return e
    text = private.sub(lambda m: shown.get(m.group(0), fallback), msg)
    try:
        return type(e)(text)
    except TypeError:
        return ProgrammingError(text)


ARROW_TYPES = {"BIGINT": pa.int64(), "INTEGER": pa.int32(), "SMALLINT": pa.int16(), "DOUBLE": pa.float64(),
               "FLOAT": pa.float32(), "REAL": pa.float32(), "BOOLEAN": pa.bool_(), "VARCHAR": pa.string()}


def _empty_result(fn) -> pa.Table | None:
    """An empty table of the function's declared columns; None when it declares none, several
    shapes, or a type this does not know (the call must run to know its columns)."""
    if not fn.columns or getattr(fn, "alternatives", None):
        return None
    if any(t.upper() not in ARROW_TYPES for _, t in fn.columns):
        return None
    return pa.table({n: pa.array([], ARROW_TYPES[t.upper()]) for n, t in fn.columns})


def _duck_types(con, schema: pa.Schema) -> list:
    """DuckDB's types of an Arrow schema (as DuckDB reads the result back)."""
    from metaql.storage.catalog import _complete
    _complete(con.store.db)
    return list(con.store.db.from_arrow(schema.empty_table()).types)
