"""The AST: plain classes for what a statement says, before any name is checked."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Name:
    value: str


@dataclass
class Star:
    pass


@dataclass
class Literal:
    value: Any


@dataclass
class Parameter:
    key: str            # "?" (positional, numbered by the parser as "1", "2"...), "1", or "name"


@dataclass
class ListValue:
    items: list


@dataclass
class Call:
    name: str
    args: list


@dataclass
class TableCall:
    name: str
    args: dict[str, Any] = field(default_factory=dict)
    positional: list = field(default_factory=list)


@dataclass
class SQLWithCalls:
    """DuckDB SQL holding MetaQL table-function calls: text[lo:hi] is the SQL, each call a
    (metaql.sqlcalls.CallSpan, TableCall) with offsets into the whole statement's text."""
    text: str
    lo: int
    hi: int
    calls: list


@dataclass
class CreateSet:
    name: str
    query: str
    replace: bool = False
    body: SQLWithCalls | None = None     # the query, when it calls table functions
    # the whole statement and the query's place in it (text[lo:hi]), so that a parse error in the
    # query is placed in the user's text; not part of what the statement is
    text: str = field(default="", compare=False)
    lo: int = field(default=0, compare=False)
    hi: int = field(default=0, compare=False)


@dataclass
class DropSet:
    name: str
    if_exists: bool = False


@dataclass
class DropCheckpoint:
    name: str
    if_exists: bool = False


@dataclass
class TopKSelect:
    k: int | Parameter
    train_set: str
    call: TableCall
    ascending: bool = False


@dataclass
class FuncSelect:
    columns: str
    call: TableCall
    alias: str | None = None
    tail: str = ""


@dataclass
class Explain:
    statement: Any
    analyze: bool = False


@dataclass
class Show:
    what: str


@dataclass
class Describe:
    name: str


@dataclass
class PlainSQL:
    text: str
