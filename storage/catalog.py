"""The DuckDB catalog: samples, models, checkpoints, layers, shards and named sets.

Every table is plain DuckDB, so a user joins `samples` with a table function's result in SQL.
Writes that must go together (a shard's file and its row; a set and its members) go through
`transaction()`: on any error the catalog is rolled back and nothing half-done stays behind.
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path

import duckdb

from metaql.errors import CatalogException, IOException

FORMAT_VERSION = "1"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS samples (
    sample_id BIGINT PRIMARY KEY, split VARCHAR NOT NULL, label INTEGER, pred INTEGER, loss DOUBLE);
CREATE TABLE IF NOT EXISTS models (
    model_id INTEGER PRIMARY KEY, factory VARCHAR, kwargs VARCHAR, loss VARCHAR,
    created_at TIMESTAMP DEFAULT current_timestamp);
CREATE TABLE IF NOT EXISTS checkpoints (
    name VARCHAR PRIMARY KEY, ordinal INTEGER NOT NULL, model_id INTEGER, epoch INTEGER, step BIGINT,
    lr DOUBLE NOT NULL, weights_file VARCHAR NOT NULL, status VARCHAR NOT NULL,
    created_at TIMESTAMP DEFAULT current_timestamp);
CREATE TABLE IF NOT EXISTS layers (
    name VARCHAR PRIMARY KEY, kind VARCHAR NOT NULL, din INTEGER, dout INTEGER, bias BOOLEAN,
    positions INTEGER, storage VARCHAR NOT NULL, factored_numbers BIGINT, full_numbers BIGINT,
    meta VARCHAR NOT NULL);
CREATE SEQUENCE IF NOT EXISTS shard_seq;
CREATE TABLE IF NOT EXISTS shards (
    shard_id BIGINT PRIMARY KEY DEFAULT nextval('shard_seq'), kind VARCHAR NOT NULL,
    checkpoint VARCHAR, layer VARCHAR, file VARCHAR NOT NULL, rows BIGINT NOT NULL,
    min_id BIGINT, max_id BIGINT, bytes BIGINT NOT NULL, checksum VARCHAR NOT NULL,
    storage VARCHAR, suffix_file VARCHAR, created_at TIMESTAMP DEFAULT current_timestamp);
CREATE TABLE IF NOT EXISTS sets (
    name VARCHAR PRIMARY KEY, definition VARCHAR, size BIGINT,
    created_at TIMESTAMP DEFAULT current_timestamp);
CREATE TABLE IF NOT EXISTS set_members (set_name VARCHAR NOT NULL, sample_id BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS labels (
    sample_id BIGINT PRIMARY KEY, label INTEGER NOT NULL, labeled_by VARCHAR DEFAULT current_user,
    labeled_at TIMESTAMP DEFAULT current_timestamp);
-- every annotation of a sample, appended and never replaced (active label cleaning collects several
-- per sample); `labels` keeps at most one human label per sample
CREATE TABLE IF NOT EXISTS annotations (
    sample_id BIGINT NOT NULL, label INTEGER NOT NULL, annotated_by VARCHAR DEFAULT current_user,
    annotated_at TIMESTAMP DEFAULT current_timestamp);
-- files a writer is about to create: committed before the files are written, deleted in the
-- transaction that names them in `shards`; a writable open deletes the listed files no row names
CREATE TABLE IF NOT EXISTS pending_files (file VARCHAR PRIMARY KEY, created_at TIMESTAMP DEFAULT current_timestamp);
ALTER TABLE checkpoints ADD COLUMN IF NOT EXISTS weights_checksum VARCHAR;
-- the training batches (counted from the checkpoint's weights) whose weights computed a shard's
-- factors, first and last; NULL: the checkpoint's own weights (replay, or a shard of inputs)
ALTER TABLE shards ADD COLUMN IF NOT EXISTS seen_from_batch BIGINT;
ALTER TABLE shards ADD COLUMN IF NOT EXISTS seen_to_batch BIGINT;
-- a checkpoint made from another (REWEIGHT's re-weighted model): not a point of the training run,
-- so `all`, `first` and `last` leave it out; a query names it to use it
ALTER TABLE checkpoints ADD COLUMN IF NOT EXISTS derived_from VARCHAR;
-- per-sample weights learned by meta re-weighting (REWEIGHT), under the checkpoint it saved
CREATE TABLE IF NOT EXISTS sample_weights (
    sample_id BIGINT NOT NULL, checkpoint VARCHAR NOT NULL, weight DOUBLE NOT NULL,
    PRIMARY KEY (sample_id, checkpoint));
-- each stored sample's squared gradient norm per factor shard (storage/norms.py), written with the
-- shard's row; TOPK over INFLUENCE bounds scores with them (engine/pruning.py). nuc_bound: for a
-- layer of dense rows, sum_s ||d_s|| ||x_s|| >= the gradient's nuclear norm (NULL for other kinds)
CREATE TABLE IF NOT EXISTS sample_norms (
    checkpoint VARCHAR NOT NULL, layer VARCHAR NOT NULL, file VARCHAR NOT NULL, sample_id BIGINT NOT NULL,
    sq_norm DOUBLE NOT NULL, nuc_bound DOUBLE);
"""

# Tables MetaQL keeps consistent with files on disk: plain SQL may read them, not write them.
INTERNAL_TABLES = ("meta", "models", "checkpoints", "layers", "shards", "sets", "set_members", "pending_files",
                   "sample_norms")

# SHOW LAYERS / CHECKPOINTS / SETS: the catalog's listing of each (Store.listing)
SHOWN = {
    "layers": "SELECT name, kind, din, dout, bias, positions, storage, factored_numbers, full_numbers FROM layers "
              "ORDER BY name",
    # factors_from: which weights computed the checkpoint's factors (its own, or training batches'
    # weights as they moved during a capture: TracIn's approximation of the checkpoint)
    "checkpoints": "SELECT c.name, c.ordinal, c.epoch, c.step, c.lr, c.status, CASE "
                   "WHEN f.n IS NULL THEN NULL WHEN f.trained = 0 THEN 'these weights (replay)' "
                   "WHEN f.trained = f.n THEN 'training batches ' || f.lo || '-' || f.hi || ' after these weights' "
                   "ELSE 'these weights and training batches ' || f.lo || '-' || f.hi END AS factors_from, "
                   "c.created_at FROM checkpoints c LEFT JOIN (SELECT checkpoint, count(*) AS n, "
                   "count(seen_from_batch) AS trained, min(seen_from_batch) AS lo, max(seen_to_batch) AS hi "
                   "FROM shards WHERE kind = 'factors' GROUP BY checkpoint) f ON f.checkpoint = c.name "
                   "ORDER BY c.ordinal",
    "sets": "SELECT name, size, definition, created_at FROM sets ORDER BY name",
    "tables": "SELECT table_name AS name FROM information_schema.tables ORDER BY 1",
}

# SHOW CHECKPOINTS of a store written before shards.seen_*_batch, opened read-only
CHECKPOINTS_BEFORE_SEEN = "SELECT name, ordinal, epoch, step, lr, status, created_at FROM checkpoints ORDER BY ordinal"

_LOCK_RE = re.compile(r"\(PID (\d+)\)")


def open_catalog(path: Path | str, read_only: bool, shown: Path | str | None = None) -> duckdb.DuckDBPyConnection:
    """The catalog at `path` (`shown` names it in errors: a reader opens a private copy)."""
    shown = str(shown or path)
    try:
        con = duckdb.connect(str(path), read_only=read_only, config=dict(SAFE_CONFIG))
    except duckdb.IOException as e:
        raise IOException(_lock_message(shown, str(e).replace(str(path), shown))) from None
    except duckdb.Error as e:   # a damaged file: DuckDB's block checksums caught it
        raise IOException(f"the catalog {shown} is damaged ({str(e).splitlines()[0]}); restore it from a "
                          "backup: MetaQL will not open or rebuild a damaged catalog") from None
    try:
        _refuse_shadows(con, shown)
        if not read_only:
            con.execute(SCHEMA)
            con.execute("INSERT OR IGNORE INTO meta VALUES ('format_version', ?)", [FORMAT_VERSION])
        _check_version(con, shown)
        _check_tables(con, shown)
    except duckdb.Error as e:
        con.close()
        raise IOException(f"the catalog {shown} is damaged ({str(e).splitlines()[0]}); restore it from a "
                          "backup") from None
    except BaseException:
        con.close()
        raise
    return con


# A received catalog is data: DuckDB must not fetch or load extensions on its behalf (a view that
# reads 'https://...' would otherwise install httpfs and send local data out).
SAFE_CONFIG = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}

_EXPECTED: dict[tuple[str, str], str] | None = None


def _expected_columns() -> dict[tuple[str, str], str]:
    """(table, column) -> type of every column SCHEMA creates, from a throwaway in-memory catalog."""
    global _EXPECTED
    if _EXPECTED is None:
        con = duckdb.connect(":memory:")
        try:
            con.execute(SCHEMA)
            _EXPECTED = {(t, c): d for t, c, d in con.execute(
                "SELECT table_name, column_name, data_type FROM information_schema.columns").fetchall()}
        finally:
            con.close()
    return _EXPECTED


def _refuse_shadows(con: duckdb.DuckDBPyConnection, shown: str) -> None:
    """A catalog whose MetaQL tables are views, or whose macros shadow DuckDB's functions, would run
    its author's SQL inside MetaQL's own queries: refused before any of them runs."""
    tables = {t for t, _ in _expected_columns()}
    views = [r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()
             if r[0].lower() in tables]
    from metaql.storage.sqlguard import builtin_functions
    macros = [r[0] for r in con.execute("SELECT DISTINCT function_name FROM duckdb_functions() WHERE NOT internal "
                                        "AND function_type IN ('macro', 'table_macro')").fetchall()
              if r[0].lower() in builtin_functions()]
    if views or macros:
        what = ", ".join([f"view {v}" for v in views] + [f"macro {m}()" for m in macros])
        raise IOException(f"the catalog {shown} was tampered with: {what} stand(s) in for MetaQL's tables or "
                          "DuckDB's functions; MetaQL will not open it (restore the catalog from a backup)")


def _check_tables(con: duckdb.DuckDBPyConnection, shown: str) -> None:
    """Every table and column MetaQL relies on is there, as a table, with its type."""
    found = {(t, c): d for t, c, d in con.execute(
        "SELECT c.table_name, c.column_name, c.data_type FROM information_schema.columns c JOIN "
        "information_schema.tables t USING (table_catalog, table_schema, table_name) "
        "WHERE t.table_type = 'BASE TABLE' AND c.table_schema = 'main'").fetchall()}
    wrong = [f"{t}.{c} ({d})" for (t, c), d in _expected_columns().items()
             if found.get((t, c), d if _added_later(t, c) else None) != d]
    if wrong:
        raise IOException(f"the catalog {shown} is not a MetaQL catalog of this version or was tampered with: "
                          f"{', '.join(wrong[:5])} missing or of another type; restore it from a backup")


def _added_later(table: str, column: str) -> bool:
    """Columns added after format 1 shipped: a store written before them (opened read-only, so
    SCHEMA has not added them) may lack them."""
    return table in ("pending_files", "annotations", "sample_weights", "sample_norms") or (table, column) in LATER_COLUMNS


LATER_COLUMNS = {("checkpoints", "weights_checksum"), ("shards", "seen_from_batch"), ("shards", "seen_to_batch"),
                 ("checkpoints", "derived_from")}


def is_metaql_catalog(path: Path) -> bool | None:
    """Whether the DuckDB file at `path` is a catalog MetaQL wrote (it has the format_version);
    None when it cannot be read now (a writer holds it)."""
    try:
        with duckdb.connect(str(path), read_only=True) as db:
            return db.execute("SELECT count(*) FROM meta WHERE key = 'format_version'").fetchone()[0] == 1
    except duckdb.CatalogException:      # a DuckDB file without MetaQL's meta table
        return False
    except duckdb.IOException as e:
        return None if "lock" in str(e).lower() else False
    except duckdb.ConnectionException:   # this process holds it open as a writer
        return None
    except duckdb.Error:
        return False


def _lock_message(path: str, err: str) -> str:
    if "lock" not in err.lower():
        if "could not read" in err.lower() or "not a valid" in err.lower():   # truncated or overwritten
            return (f"the catalog {path} is damaged ({err.splitlines()[0]}); restore it from a backup: MetaQL "
                    "will not open or rebuild a damaged catalog")
        return f"cannot open catalog {path}: {err}"
    pid = _LOCK_RE.search(err)
    who = f"process {pid.group(1)}" if pid else "another process"
    return (f"the store's catalog {path} is open for writing by {who}; "
            "open it with read_only=True (shell: metaql --readonly STORE), or close the other process")


def _check_version(con: duckdb.DuckDBPyConnection, path) -> None:
    try:
        row = con.execute("SELECT value FROM meta WHERE key = 'format_version'").fetchone()
    except duckdb.CatalogException:
        raise IOException(f"{path} is not a MetaQL catalog (no meta table)") from None
    if row is None or row[0] != FORMAT_VERSION:
        raise IOException(f"{path} has store format {row and row[0]}; this MetaQL reads {FORMAT_VERSION}")


@contextlib.contextmanager
def transaction(con: duckdb.DuckDBPyConnection):
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def require_name(kind: str, name: str, existing: list[str], keywords: tuple[str, ...] = ()) -> None:
    """Raises a CatalogException with a did-you-mean hint when `name` is not in `existing`;
    `keywords` (checkpoints=last) are hinted at too, and listed apart from the names."""
    if name in existing:
        return
    hint = nearest_name(name, list(existing) + [k for k in keywords if k not in existing])
    extra = f" Did you mean '{hint}'? ({kind} names are case-sensitive)" if hint and hint.lower() == str(
        name).lower() else f" Did you mean '{hint}'?" if hint else ""
    listing = (", ".join(existing) if existing else "(none)") + (f"; or {', '.join(keywords)}" if keywords else "")
    raise CatalogException(f"unknown {kind} '{name}'.{extra} Known {kind}s: {listing}")


def nearest_name(name: str, candidates: list[str]) -> str | None:
    """The candidate `name` most likely meant: the same name in another case (names are
    case-sensitive: a set X10 is not x10), else the closest spelling in any case; None if none is close."""
    import difflib
    name = str(name)
    same = [c for c in candidates if c.lower() == name.lower()]
    if same:
        return same[0]
    lowered = {c.lower(): c for c in reversed(candidates)}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=1)
    return lowered[close[0]] if close else None


def query_arrow(db: duckdb.DuckDBPyConnection, text: str, params=None):
    """Runs a query through DuckDB's relational API (no pending DB-API result is left on the
    connection) and returns the whole result as Arrow, or None for a statement without rows."""
    _complete(db)
    rel = db.sql(text, params=params) if params is not None else db.sql(text)
    return None if rel is None else arrow_of(rel)


def register(db: duckdb.DuckDBPyConnection, name: str, table) -> None:
    """Registers an Arrow table as a view."""
    _complete(db)
    db.register(name, table)


def unregister(db: duckdb.DuckDBPyConnection, name: str) -> None:
    _complete(db)
    db.unregister(name)


def _complete(db: duckdb.DuckDBPyConnection) -> None:
    """DuckDB 2 refuses new work while an execute() result is partly fetched; finish it first."""
    complete = getattr(db, "complete", None)
    if complete is not None:
        complete()


def arrow_of(result) -> "pyarrow.Table":
    """The whole result as an Arrow table, across DuckDB versions (to_arrow_table since 1.4)."""
    for method in ("to_arrow_table", "fetch_arrow_table", "arrow"):
        fn = getattr(result, method, None)
        if fn is not None:
            return fn()
    raise AttributeError("this DuckDB result has no Arrow export")


class RoundTrips:
    """How many statements a store has sent to its DuckDB catalog (EXPLAIN ANALYZE prints the
    count per statement)."""
    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


class CountedConnection:
    """A DuckDB connection that counts every call that runs a statement on it; all else passes
    through unchanged. The store wraps its catalog connection in one, so a round trip made
    anywhere (store, engine, a table function) is counted, not only those of one helper."""
    _RUNS = frozenset({"execute", "executemany", "sql", "query", "register", "unregister", "table",
                       "read_parquet", "from_arrow"})
    __slots__ = ("_con", "trips")

    def __init__(self, con: duckdb.DuckDBPyConnection, trips: RoundTrips) -> None:
        self._con, self.trips = con, trips

    def __getattr__(self, name: str):
        attr = getattr(self._con, name)
        if name not in self._RUNS:
            return attr
        trips = self.trips

        def counted(*args, **kwargs):
            trips.count += 1
            return attr(*args, **kwargs)
        return counted

    @property
    def raw(self) -> duckdb.DuckDBPyConnection:
        return self._con


def counted(con, trips: RoundTrips):
    """`con` counted into `trips` (None stays None; an already counted one is re-pointed)."""
    if con is None:
        return None
    return CountedConnection(con.raw if isinstance(con, CountedConnection) else con, trips)
