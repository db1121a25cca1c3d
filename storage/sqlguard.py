"""Which tables a plain SQL statement writes, decided on the parsed statement, not on its first word.

Plain SQL runs on the same DuckDB catalog that MetaQL keeps consistent with its files, so before
it runs, every statement is classified by DuckDB's own splitter (the statement type) and, when it
may write, parsed with sqlglot's DuckDB dialect to find every table it writes, CTE-wrapped DML
and comments before the keyword included. Names are compared without schema, catalog, quotes or
case: `catalog.main."Shards"` is `shards`, and a protected name is protected in every schema (a
TEMP table of that name would shadow the real one for MetaQL's own queries).

- MetaQL's tables (catalog.INTERNAL_TABLES), `samples` and the shard sequence: read-only, except
  UPDATE of the columns a user added to `samples`.
- `labels`: a plain `INSERT INTO labels ... VALUES | SELECT` is marked `labels_insert`; the caller
  evaluates its rows and adds them through the labels API (storage/labels.py), which refuses a
  contradiction. Every other write to it is refused.
- Statements that reach outside the catalog or run stored code (ATTACH, DETACH, EXPORT, IMPORT,
  INSTALL, LOAD, PREPARE, EXECUTE, USE, SET search_path, PRAGMA/CALL outside a read-only list) are
  refused, and so is any statement whose targets cannot be determined (fail closed).
"""
from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import duckdb
import sqlglot
from sqlglot import exp
from sqlglot.dialects.duckdb import DuckDB
from sqlglot.errors import SqlglotError
from sqlglot.tokens import TokenType

from metaql.errors import ParserException, ProgrammingError
from metaql.storage import catalog

SAMPLE_CORE = ("sample_id", "split", "label", "pred", "loss")
SCRATCH_PREFIX = "_metaql"          # MetaQL's own scratch tables and views
_DIALECT = DuckDB()
_MAX_NESTING = 4                    # EXPLAIN EXPLAIN ... is not worth more

_READ_TYPES = {"SELECT", "TRANSACTION", "VARIABLE_SET", "VACUUM"}   # VACUUM covers ANALYZE
_WRITE_TYPES = {"INSERT", "UPDATE", "DELETE", "MERGE_INTO", "CREATE", "CREATE_FUNC", "DROP", "ALTER",
                "COPY"}
_WRITE_WORDS = {"INSERT", "UPDATE", "DELETE", "MERGE", "TRUNCATE", "COPY", "CREATE", "DROP", "ALTER",
                "ATTACH", "DETACH"}
_WRITE_NODES = (exp.Insert, exp.Update, exp.Delete, exp.Merge, exp.TruncateTable, exp.Create, exp.Drop,
                exp.Alter, exp.Copy, exp.Comment)
_READ_ONLY_CALLS = {
    "table_info", "show", "show_tables", "show_tables_expanded", "show_databases", "database_list",
    "database_size", "storage_info", "metadata_info", "version", "platform", "user_agent", "functions",
    "collations", "checkpoint"}
_SAFE_SETTINGS = {
    "threads", "worker_threads", "memory_limit", "max_memory", "timezone", "calendar", "default_order",
    "default_null_order", "null_order", "enable_progress_bar", "enable_progress_bar_print",
    "progress_bar_time", "preserve_insertion_order", "explain_output", "max_expression_depth",
    "pivot_limit", "errors_as_json", "integer_division", "ordered_aggregate_threshold"}


@dataclass(frozen=True)
class Statement:
    text: str
    kind: str                      # DuckDB's statement type, e.g. 'SELECT', 'INSERT'
    labels_insert: bool = False    # INSERT INTO labels: its rows must go through the labels API


def protected_names() -> set[str]:
    """Objects plain SQL must not write, create or shadow; read at call time so that a table added
    to catalog.INTERNAL_TABLES is protected at once."""
    return {t.lower() for t in catalog.INTERNAL_TABLES} | {"samples", "labels", "shard_seq"}


def checked_statements(text: str, _depth: int = 0, store_root: Path | None = None) -> list[Statement]:
    """The statements of `text`, each allowed to run; raises ProgrammingError at the first one that
    would write MetaQL's tables or that cannot be classified (and, given the store's root, at a COPY
    that would write a file inside the store)."""
    if _depth > _MAX_NESTING:
        raise ProgrammingError("statements nested too deeply; run the inner statement on its own")
    try:
        raw = duckdb.extract_statements(text)
    except duckdb.Error as e:
        raise parse_error(e, text) from None
    checked = [_check(s.query, s.type.name, _depth) for s in raw]
    if store_root is not None:
        for s in checked:
            if s.kind == "COPY":
                _refuse_copy_into(s.text, Path(store_root))
    return checked


def check_syntax(text: str, shown: str | None = None) -> None:
    """Raises ParserException, with the line, column and caret, unless DuckDB parses `text`; the
    caret goes under `shown`, a text of the same positions (the user's, where `text` stands in
    for parts DuckDB cannot read)."""
    try:
        duckdb.extract_statements(text)
    except duckdb.Error as e:
        raise parse_error(e, text, shown) from None


_DUCK_SPOT = re.compile(r"^LINE (\d+): (.*)$")


def parse_error(e: Exception, text: str, shown_text: str | None = None) -> ParserException:
    """DuckDB's parse error as MetaQL's: its first line, and the line and column of the spot in
    `text` with the line and a caret under it. DuckDB prints `LINE n: <part of the line>` over a
    caret; the part may be cut ('...') around a long line, so the column is found in `text`."""
    first, *rest = str(e).splitlines()
    for i, row in enumerate(rest[:-1]):
        spot = _DUCK_SPOT.match(row)
        if not spot or "^" not in rest[i + 1]:
            continue
        line, shown = int(spot.group(1)), spot.group(2)
        start = rest[i + 1].index("^") - len(row) + len(shown)
        width = len(rest[i + 1].strip())
        cut = 3 if shown.startswith("...") else 0
        part = shown[cut:-3] if shown.endswith("...") and len(shown) > cut + 3 else shown[cut:]
        lines = text.split("\n")
        src = lines[line - 1] if 0 < line <= len(lines) else ""
        at = src.find(part)
        if at < 0:
            break
        column = at + start - cut + 1
        if shown_text is not None:
            src = shown_text.split("\n")[line - 1]
        return ParserException(first, line, column, _caret(src, column, width))
    return ParserException(first)


def _caret(src: str, column: int, width: int, shown: int = 100) -> str:
    """The line (a window of `shown` characters around the spot when longer) with `width` carets
    under the spot, as metaql.parser prints its own errors."""
    lo = max(0, min(column - 1 - shown // 2, len(src) - shown)) if len(src) > shown else 0
    window = ("..." if lo else "") + src[lo:lo + shown] + ("..." if lo + shown < len(src) else "")
    return f"  {window}\n  {' ' * (column - 1 - lo + (3 if lo else 0))}{'^' * width}"


def _refuse_copy_into(text: str, root: Path) -> None:
    """COPY ... TO a file inside the store would overwrite its shards, catalog or lock."""
    node = _parse(text, "COPY")
    if not isinstance(node, exp.Copy) or node.args.get("kind"):      # kind True: COPY ... FROM
        return
    real = root.resolve()
    for f in node.args.get("files") or []:
        target = Path(f.name if isinstance(f, exp.Literal) else f.sql()).expanduser()
        resolved = (target if target.is_absolute() else Path.cwd() / target).resolve()
        if resolved == real or real in resolved.parents:
            raise ProgrammingError(f"COPY ... TO '{f.name}' would write inside the store ({real}), over the "
                                   "files MetaQL keeps; copy results to a path outside the store")


def require_read_query(text: str, what: str = "this query") -> None:
    """Raises unless `text` is exactly one statement that only reads (SELECT, WITH ... SELECT)."""
    statements = checked_statements(text)
    if len(statements) != 1 or statements[0].kind != "SELECT" or _written(statements[0].text):
        raise ProgrammingError(f"{what} must be one read-only SELECT statement (no ';', no INSERT, "
                               f"UPDATE, DELETE or DDL), e.g. SELECT sample_id FROM samples WHERE ...")


def retarget_insert(text: str, table: str) -> str:
    """`text`, an INSERT INTO <one table> ..., with the table's name replaced by `table`; the rest of
    the user's text (columns, VALUES, SELECT, parameters) is kept character for character."""
    tokens = _tokens(text)
    depth = 0
    for i, t in enumerate(tokens):
        depth += (t.token_type == TokenType.L_PAREN) - (t.token_type == TokenType.R_PAREN)
        if depth == 0 and t.text.upper() == "INTO" and i + 1 < len(tokens):
            first = last = i + 1
            while last + 2 < len(tokens) and tokens[last + 1].token_type == TokenType.DOT:
                last += 2
            return text[:tokens[first].start] + table + text[tokens[last].end + 1:]
    raise ProgrammingError("cannot find the table of this INSERT")


# ---- one statement ---------------------------------------------------------------------------------
def _check(text: str, kind: str, depth: int) -> Statement:
    _refuse_sequence_changes(text)
    if kind in ("SELECT", "MULTI"):     # DuckDB expands a PIVOT statement into a MULTI
        _check_read(text)
    elif kind in _WRITE_TYPES:
        return Statement(text, kind, _check_write(text, kind))
    elif kind == "EXPLAIN":
        if any(s.labels_insert for s in checked_statements(_explained(text), depth + 1)):
            raise _labels_refusal("EXPLAIN of an INSERT INTO labels")
    elif kind in ("PRAGMA", "CALL"):
        _check_call(text)
    elif kind == "SET":
        _check_setting(text)
    elif kind not in _READ_TYPES:
        raise ProgrammingError(_REFUSED.get(kind, f"{kind} statements are not run on a MetaQL store; "
                                                  "plain SQL may read the catalog and write your own tables"))
    return Statement(text, kind)


_REFUSED = {
    "ATTACH": "ATTACH is refused: a store's SQL sees only its own catalog; read other files with "
              "read_parquet()/read_csv() in a SELECT",
    "DETACH": "DETACH is refused: the store's catalog stays attached",
    "EXPORT": "EXPORT DATABASE is refused; copy a query's result with COPY (SELECT ...) TO 'file'",
    "COPY_DATABASE": "COPY FROM DATABASE is refused; copy a query's result with COPY (SELECT ...) TO 'file'",
    "LOAD": "INSTALL/LOAD of DuckDB extensions is refused from a MetaQL connection",
    "EXTENSION": "extension statements are refused from a MetaQL connection",
    "PREPARE": "PREPARE is refused; pass parameters with con.execute(sql, [values])",
    "EXECUTE": "EXECUTE is refused; pass parameters with con.execute(sql, [values])",
}


def _refuse_sequence_changes(text: str) -> None:
    """setval() would rewind the store's shard numbering: the next capture's ids would collide."""
    if "setval" in text.lower() and any(t.text.lower() == "setval" and t.token_type != TokenType.STRING
                                        for t in _tokens(text)):
        raise ProgrammingError("setval() is refused on a MetaQL store: its sequences number the store's "
                               "own files; use your own counters in your own tables")


def _shadows_builtin(node: exp.Create) -> str | None:
    """The name of a CREATE MACRO/FUNCTION that would shadow one of DuckDB's functions, which
    MetaQL's own SQL calls (nextval, current_database, ...)."""
    if str(node.args.get("kind") or "").upper() not in ("MACRO", "FUNCTION", "TABLE MACRO"):
        return None
    this = node.this.this if isinstance(node.this, exp.UserDefinedFunction) else node.this
    name = this.name.lower() if isinstance(this, exp.Expression) else ""
    return name if name in builtin_functions() else None


_BUILTINS: set[str] | None = None


def builtin_functions() -> set[str]:
    """Names of DuckDB's own functions and macros (lower case), read once."""
    global _BUILTINS
    if _BUILTINS is None:
        con = duckdb.connect(":memory:")
        try:
            _BUILTINS = {r[0].lower() for r in con.execute(
                "SELECT DISTINCT function_name FROM duckdb_functions() WHERE internal").fetchall()}
        finally:
            con.close()
    return _BUILTINS


def _check_read(text: str) -> None:
    """A SELECT-type statement may still write through a data-modifying CTE."""
    if _has_write_word(text):
        _check_write(text, "SELECT", allow_labels=False)


def _check_write(text: str, kind: str, allow_labels: bool = True) -> bool:
    """Raises if the statement writes a protected object; True for a plain INSERT INTO labels."""
    root = _parse(text, kind)
    if isinstance(root, exp.Command):
        _check_command(root, kind)
        return False
    writes = [n for n in root.walk() if isinstance(n, _WRITE_NODES)]
    if not writes:
        if kind != "SELECT":
            raise _unknown(kind)
        raise ProgrammingError("this SELECT uses a word MetaQL reads as a write (INSERT, UPDATE, DELETE, "
                               "...); quote identifiers named like SQL keywords, e.g. \"update\"")
    protected, labels_insert = protected_names(), False
    for node in writes:
        shadowed = _shadows_builtin(node) if isinstance(node, exp.Create) else None
        if shadowed:
            raise ProgrammingError(f"CREATE MACRO {shadowed} is refused: it would shadow DuckDB's own "
                                   f"{shadowed}(), which MetaQL's queries use; give your macro another name")
        for verb, name in _targets(node, kind):
            if name not in protected and not name.startswith(SCRATCH_PREFIX):
                continue
            if name == "labels" and allow_labels and _plain_insert(node, root, writes):
                labels_insert = True
            elif not (name == "samples" and _updates_user_columns(node)):
                raise _refusal(verb, name)
    return labels_insert


def _targets(node: exp.Expression, kind: str) -> list[tuple[str, str]]:
    """(verb, lower-case bare name) of every object the write node changes or creates."""
    if isinstance(node, exp.Insert):
        return [("INSERT INTO", _name(node.this, kind))]
    if isinstance(node, (exp.Update, exp.Delete, exp.Merge)):
        verb = {exp.Update: "UPDATE", exp.Delete: "DELETE FROM", exp.Merge: "MERGE INTO"}[type(node)]
        return [(verb, _name(node.this, kind))]
    if isinstance(node, exp.TruncateTable):
        return [("TRUNCATE", _name(t, kind)) for t in node.expressions]
    if isinstance(node, exp.Copy):
        return [] if node.args.get("kind") is False else [("COPY ... FROM", _name(node.this, kind))]
    if isinstance(node, exp.Comment):
        return [("COMMENT ON", i.name.lower()) for i in node.this.find_all(exp.Identifier)]
    if isinstance(node, exp.Alter):
        renamed = [("ALTER ... RENAME TO", _name(a.this, kind)) for a in node.args.get("actions") or []
                   if isinstance(a, exp.AlterRename)]
        return [("ALTER", _name(node.this, kind))] + renamed
    if isinstance(node, exp.Drop):
        return _dropped(node, kind)
    return _created(node, kind)


def _created(node: exp.Create, kind: str) -> list[tuple[str, str]]:
    what = str(node.args.get("kind") or "").upper()
    if what == "SCHEMA":
        return []
    if what == "INDEX":
        return [("CREATE INDEX ON", _name(node.this.args.get("table"), kind))]
    return [(f"CREATE {what}", _name(node.this, kind))]


def _dropped(node: exp.Drop, kind: str) -> list[tuple[str, str]]:
    what = str(node.args.get("kind") or "").upper()
    if what == "SCHEMA":
        for t in node.args.get("tables") or []:
            if (t.args.get("db") and t.args["db"].name.lower() == "main") or t.name.lower() == "main":
                raise ProgrammingError("DROP SCHEMA main is refused: it holds MetaQL's tables and would break "
                                       "the store; drop your own tables one by one")
        return []
    if what == "INDEX":
        return []
    return [(f"DROP {what}", _name(t, kind)) for t in node.args.get("tables") or []]


def _name(node: exp.Expression | None, kind: str) -> str:
    if isinstance(node, exp.Schema):
        node = node.this
    if isinstance(node, exp.UserDefinedFunction):
        node = node.this
    if isinstance(node, exp.Table) and node.name:
        return node.name.lower()
    raise _unknown(kind)


def _plain_insert(node: exp.Expression, root: exp.Expression, writes: list) -> bool:
    """An INSERT INTO labels that only adds rows: no OR REPLACE/IGNORE, ON CONFLICT or RETURNING,
    not inside another statement, and nothing else written beside it."""
    if not isinstance(node, exp.Insert) or node is not root or len(writes) != 1:
        return False
    if node.args.get("alternative") or node.args.get("conflict") or node.args.get("returning"):
        raise _labels_refusal(f"INSERT OR {node.args['alternative']}" if node.args.get("alternative")
                              else "INSERT ... ON CONFLICT/RETURNING")
    return True


def _updates_user_columns(node: exp.Expression) -> bool:
    if not isinstance(node, exp.Update) or node.args.get("from_") or node.args.get("from"):
        return False
    cols = [e.this for e in node.expressions if isinstance(e, exp.EQ)]
    return (len(cols) == len(node.expressions) and all(isinstance(c, exp.Column) for c in cols)
            and not any(c.name.lower() in SAMPLE_CORE for c in cols))


def _check_command(node: exp.Command, kind: str) -> None:
    """sqlglot keeps DuckDB-only statements as text: only CREATE TYPE/SECRET of a free name pass."""
    words = [t.text for t in _tokens(f"{node.this} {node.expression or ''}")]
    upper = [w.upper() for w in words]
    if upper[:1] != ["CREATE"]:
        raise _unknown(kind)
    rest = [w for w, u in zip(words[1:], upper[1:]) if u not in ("OR", "REPLACE", "TEMP", "TEMPORARY",
                                                                 "PERSISTENT", "IF", "NOT", "EXISTS")]
    if len(rest) < 2 or rest[0].upper() not in ("TYPE", "SECRET"):
        raise _unknown(kind)
    if rest[1].lower() in protected_names():
        raise _refusal(f"CREATE {rest[0].upper()}", rest[1].lower())


def _check_call(text: str) -> None:
    first, rest = _head(text)
    name = first.lower() if first.lower() == "checkpoint" else (_words(rest)[:1] or [""])[0]
    bare = name[len("pragma_"):] if name.startswith("pragma_") else name
    if bare not in _READ_ONLY_CALLS and not name.startswith("duckdb_"):
        # MetaQL's own PRAGMA is taken before this guard, written exactly so (engine/calibrate.py)
        own = ("; MetaQL's own is PRAGMA metaql_calibrate, without arguments"
               if difflib.get_close_matches(bare, ["metaql_calibrate"], n=1, cutoff=0.7) else "")
        raise ProgrammingError(f"{first.upper()} {name} is refused: only read-only PRAGMAs and calls run "
                               f"on a MetaQL store ({', '.join(sorted(_READ_ONLY_CALLS))}, duckdb_*); "
                               f"query the duckdb_* table functions in a SELECT instead{own}")


def _check_setting(text: str) -> None:
    first, rest = _head(text)
    words = [first.lower()] + _words(rest)
    if words[:1] == ["use"]:
        raise ProgrammingError("USE is refused: MetaQL's own queries must keep resolving its tables in the "
                               "store's catalog; qualify names instead (other_schema.my_table)")
    names = [w for w in words[1:] if w not in ("session", "global", "local")][:1]
    if names == ["variable"]:
        return
    if not names or names[0] not in _SAFE_SETTINGS:
        raise ProgrammingError(f"SET {names[0] if names else ''} is refused on a MetaQL store (search_path and "
                               "schema would hide its tables); settings allowed: "
                               f"{', '.join(sorted(_SAFE_SETTINGS))}")


def _explained(text: str) -> str:
    """The statement after EXPLAIN [ANALYZE] [(options)]."""
    rest = _head(text)[1]
    tokens = _tokens(rest)
    if tokens and tokens[0].text.upper() == "ANALYZE":
        rest = rest[tokens[0].end + 1:]
        tokens = _tokens(rest)
    if tokens and tokens[0].token_type == TokenType.L_PAREN:
        depth = 0
        for m, t in enumerate(tokens):
            depth += (t.token_type == TokenType.L_PAREN) - (t.token_type == TokenType.R_PAREN)
            if depth == 0:
                break
        if m + 1 < len(tokens):
            rest = rest[tokens[m + 1].start:]
    if not rest.strip():
        raise _unknown("EXPLAIN")
    return rest


# ---- helpers -------------------------------------------------------------------------------------------
def _head(text: str) -> tuple[str, str]:
    """The first word (comments skipped) and the text after it; sqlglot reads some statements
    (EXPLAIN, CALL, RESET) as one command word and one opaque string, so the rest is re-read."""
    tokens = _tokens(text)
    if not tokens:
        return "", ""
    return tokens[0].text, text[tokens[0].end + 1:]


def _words(text: str) -> list[str]:
    return [w.lower() for w in re.findall(r"[A-Za-z_][A-Za-z0-9_$]*", text)]


def _tokens(text: str) -> list:
    try:
        return _DIALECT.tokenize(text)
    except SqlglotError:
        raise ProgrammingError("MetaQL cannot read this statement's words; check its quotes") from None


def _has_write_word(text: str) -> bool:
    for t in _tokens(text):
        if t.token_type == TokenType.COMMAND:       # the rest came back as one opaque string
            return _has_write_word(text[t.end + 1:])
        if t.text.upper() in _WRITE_WORDS and t.token_type != TokenType.IDENTIFIER \
                and not t.token_type.name.endswith("STRING"):
            return True
    return False


def _written(text: str) -> bool:
    if not _has_write_word(text):
        return False
    return any(isinstance(n, _WRITE_NODES) for n in _parse(text, "SELECT").walk())


def _parse(text: str, kind: str) -> exp.Expression:
    log = logging.getLogger("sqlglot")
    level = log.level
    log.setLevel(logging.ERROR)     # its "falling back to a Command" warning is ours to handle
    try:
        parsed = [e for e in sqlglot.parse(text, read="duckdb") if e is not None]
    except SqlglotError:
        raise _unknown(kind) from None
    finally:
        log.setLevel(level)
    if len(parsed) != 1:
        raise _unknown(kind)
    return parsed[0]


def _refusal(verb: str, name: str) -> ProgrammingError:
    if name == "labels":
        return _labels_refusal(verb)
    if name == "samples":
        return ProgrammingError(
            f"{verb} samples is refused: it would break the store (sets, shards and labels refer to its "
            "rows); register samples with con.add_samples(...), keep your own per-sample data in a table "
            "of yours (CREATE TABLE mine AS ...) joined on sample_id; UPDATE samples may set only columns "
            f"you added, never {', '.join(SAMPLE_CORE)} (samples.label is what training used; record a corrected "
            "label with con.label(ids, labels, by='you'), into the labels table)")
    return ProgrammingError(
        f"{verb} {name} is refused: '{name}' is one of MetaQL's own tables and writing it from SQL would "
        "break the store; use CREATE SET / DROP SET, or the Python API (con.add_samples, con.label, "
        "con.capture), to change them")


def _labels_refusal(verb: str) -> ProgrammingError:
    return ProgrammingError(
        f"{verb} on labels is refused: a human label is never silently replaced; change labels with "
        "con.label(ids, labels, overwrite=True), or add new ones with a plain "
        "INSERT INTO labels (sample_id, label[, labeled_by]) VALUES ... | SELECT ...")


def _unknown(kind: str) -> ProgrammingError:
    return ProgrammingError(
        f"MetaQL cannot tell which tables this {kind} statement changes, so it does not run it; write it "
        "as a plain SELECT, or as INSERT/UPDATE/DELETE/CREATE/DROP on a table of yours")
