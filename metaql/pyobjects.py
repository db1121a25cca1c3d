"""Python objects as tables: `con.register(name, obj)` and querying a DataFrame by its Python name.

DuckDB's own replacement scan looks for a missing table's name only in the frame that called
DuckDB; in MetaQL that frame is MetaQL's own code, never the user's (checked: `SELECT * FROM my_df`
fails with "Table with name my_df does not exist"). So MetaQL does the lookup itself: when DuckDB
reports a missing table X, the first frame outside the metaql package (the user's code that called
con.execute / con.sql / a relation's fetch) is searched, locals then globals as DuckDB does; a
pandas or polars DataFrame, or a pyarrow Table, RecordBatch, RecordBatchReader or Dataset found
there is registered under X for that one statement, and the statement runs again.

Registered objects live on the connection's DuckDB connection as temporary views (nothing is
written to the store; a read-only connection may register). A read-only connection's catalog is
reopened when the store commits, so registrations are replayed onto it before each statement.
"""
from __future__ import annotations

import re
import sys
from contextlib import contextmanager
from typing import Any, Callable

import duckdb

from metaql.errors import CatalogException, InvalidInputException

_MISSING = re.compile(r"Table with name ([^\s!]+) does not exist")
_MAX_LOOKUPS = 16        # distinct missing names in one statement
_SKIPPED_MODULES = ("metaql", "contextlib", "functools")


def scannable(obj: Any) -> bool:
    """Whether DuckDB can read `obj` as a table (checked by type name: nothing is imported)."""
    kind = type(obj)
    module, name = kind.__module__.split(".")[0], kind.__name__
    return (module, name) in {("pandas", "DataFrame"), ("polars", "DataFrame"), ("polars", "LazyFrame"),
                              ("pyarrow", "Table"), ("pyarrow", "RecordBatch"), ("pyarrow", "RecordBatchReader"),
                              ("pyarrow", "FileSystemDataset"), ("pyarrow", "Dataset"), ("pyarrow", "UnionDataset")}


def registrable(obj: Any):
    """What con.register() hands DuckDB for `obj`; a dict of columns becomes an Arrow table."""
    if scannable(obj):
        return obj
    if isinstance(obj, dict) and obj:
        import pyarrow as pa
        try:
            return pa.table({str(k): v for k, v in obj.items()})
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as e:
            raise InvalidInputException(f"register(): the dict's columns do not make a table ({e})") from None
    raise InvalidInputException(
        f"register() takes a pandas or polars DataFrame, a pyarrow Table, RecordBatch, RecordBatchReader or "
        f"Dataset, or a dict of equal-length columns; got {type(obj).__name__}")


def ensure_registered(con) -> duckdb.DuckDBPyConnection:
    """The connection's current DuckDB connection, holding every object con.register() gave it."""
    db = con.store.db
    registered = con.__dict__.setdefault("_registered", {})
    if registered and con.__dict__.get("_registered_on") is not db:
        for name, obj in registered.values():
            db.register(name, obj)
    con._registered_on = db
    return db


@contextmanager
def capturing(con, captured: dict):
    """While a relation runs: objects it found by name are found again (and those found now are
    kept in `captured`), as DuckDB's relation keeps the objects it read when it was built."""
    previous = con.__dict__.get("_python_objects")
    con._python_objects = captured
    try:
        yield
    finally:
        con._python_objects = previous


def with_python_objects(con, run: Callable[[], Any]):
    """run(), retried with each missing table that names a DataFrame or Arrow table in the user's
    frame registered for the retry (see the module docstring)."""
    from metaql.storage.catalog import register, unregister
    db = ensure_registered(con)
    frame = _user_frame()
    captured = con.__dict__.get("_python_objects")
    captured = {} if captured is None else captured
    added: list[str] = []
    try:
        while True:
            try:
                return run()
            except duckdb.CatalogException as e:
                found = _MISSING.search(str(e))
                name = found.group(1).strip('"') if found else None
                obj = None
                if name and len(added) < _MAX_LOOKUPS and name not in added:
                    obj = captured.get(name)
                    obj = _lookup(frame, name) if obj is None else obj
                if obj is None:
                    raise
                captured[name] = obj
                register(db, name, obj)
                added.append(name)
    finally:
        for name in added:
            try:
                unregister(db, name)
            except duckdb.Error:     # the statement's own error is the one to report
                pass


def _user_frame():
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in _SKIPPED_MODULES:
        frame = frame.f_back
    return frame


def _lookup(frame, name: str):
    if frame is None:
        return None
    for scope in (frame.f_locals, frame.f_globals):
        if name in scope:
            obj = scope[name]
            return obj if scannable(obj) else None
    return None


def check_name(con, name) -> str:
    """A name con.register() may take: not MetaQL's, not a table or view of the store."""
    from metaql.storage.sqlguard import SCRATCH_PREFIX, protected_names
    if not isinstance(name, str) or not name.strip():
        raise InvalidInputException("register() takes a name (a non-empty string) and an object")
    key = name.lower()
    if key in protected_names() or key.startswith(SCRATCH_PREFIX):
        raise InvalidInputException(f"register({name!r}, ...) is refused: '{name}' is MetaQL's own name; "
                                    "choose another")
    if key not in con.__dict__.get("_registered", {}):
        from metaql.storage.catalog import query_arrow
        taken = query_arrow(con.store.db, "SELECT count(*) AS n FROM information_schema.tables "
                                          "WHERE lower(table_name) = ?", [key]).column(0)[0].as_py()
        if taken:
            raise CatalogException(f"register({name!r}, ...) is refused: the store already has a table or view "
                                   f"named '{name}'; choose another name")
    return name
