"""Finds MetaQL table-function calls inside DuckDB SQL, and the statement's parameters.

A call's arguments are MetaQL's own syntax (layers=[fc1, fc2], query=batch(t), layers=*), which no
SQL parser reads, so calls are cut out of the text before DuckDB sees it: a scanner that respects
quotes, comments and brackets finds each registered name standing where a table may stand (after
FROM, JOIN, or a comma of a FROM list) and followed by '('. The caller replaces each span
by a private relation name; everything else is DuckDB's text, character for character.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
_PARAM = re.compile(r"\?|\$([0-9]+|[A-Za-z_][A-Za-z0-9_]*)")
# Words after which a FROM list is over (at the same bracket depth).
_CLAUSE_ENDS = {"SELECT", "WHERE", "GROUP", "HAVING", "ORDER", "LIMIT", "OFFSET", "UNION", "EXCEPT",
                "INTERSECT", "ON", "USING", "WINDOW", "QUALIFY", "SET", "VALUES", "RETURNING", "TO"}
_TABLE_STARTS = {"FROM", "JOIN"}
# Words that may follow a table but are not its alias.
_NOT_ALIAS = _CLAUSE_ENDS | {"JOIN", "INNER", "LEFT", "RIGHT", "FULL", "OUTER", "CROSS", "NATURAL", "POSITIONAL",
                             "ASOF", "ANTI", "SEMI", "SAMPLE", "TABLESAMPLE", "PIVOT", "UNPIVOT", "FETCH", "FOR",
                             "FROM", "WITH", "LATERAL", "INTO"}


@dataclass(frozen=True)
class CallSpan:
    start: int          # text[start:end] is NAME(...)
    end: int
    name: str           # as the user wrote it
    has_alias: bool     # the user gave the relation an alias (AS r, r, "r")


def _skip(text: str, i: int) -> int:
    """The index after a quoted string, quoted identifier or comment starting at i (i if none)."""
    c = text[i]
    if c in "'\"":
        j = i + 1
        while j < len(text):
            if text[j] == c:
                if text.startswith(c, j + 1):   # '' or "" is an escaped quote
                    j += 2
                    continue
                return j + 1
            j += 1
        return len(text)
    if text.startswith("--", i):
        j = text.find("\n", i)
        return len(text) if j < 0 else j
    if text.startswith("/*", i):
        j = text.find("*/", i + 2)
        return len(text) if j < 0 else j + 2
    if text.startswith("$$", i):
        j = text.find("$$", i + 2)
        return len(text) if j < 0 else j + 2
    return i


def _next_significant(text: str, i: int) -> int:
    """The index of the next character that is not space or comment."""
    while i < len(text):
        if text[i].isspace():
            i += 1
        elif text.startswith("--", i) or text.startswith("/*", i):
            i = _skip(text, i)
        else:
            break
    return i


def _closing(text: str, i: int) -> int:
    """The index after the bracket that closes the '(' at i (len(text) when it never closes)."""
    depth = 0
    while i < len(text):
        j = _skip(text, i)
        if j != i:
            i = j
            continue
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return len(text)


def _has_alias(text: str, i: int) -> bool:
    i = _next_significant(text, i)
    if i >= len(text):
        return False
    if text[i] == '"':
        return True
    m = _WORD.match(text, i)
    return bool(m) and (m.group(0).upper() == "AS" or m.group(0).upper() not in _NOT_ALIAS)


def find_calls(text: str, names) -> list[CallSpan]:
    """Every call of a function in `names` (case-insensitive) that stands where a table may."""
    wanted = {n.upper() for n in names}
    spans: list[CallSpan] = []
    in_from = [False]               # per bracket depth: inside a FROM list
    previous = ""                   # the last significant word or symbol
    i = 0
    while i < len(text):
        j = _skip(text, i)
        if j != i:
            i, previous = j, (previous if text[i] in "-/" else "value")
            continue
        c = text[i]
        m = _WORD.match(text, i) if (c.isalpha() or c == "_") and (i == 0 or not
                                                                    (text[i - 1].isalnum() or text[i - 1] in "_.$")) else None
        if m:
            word = m.group(0).upper()
            after = _next_significant(text, m.end())
            table_position = previous in _TABLE_STARTS or (previous == "," and in_from[-1])
            if word in wanted and table_position and after < len(text) and text[after] == "(":
                end = _closing(text, after)
                spans.append(CallSpan(i, end, m.group(0), _has_alias(text, end)))
                i, previous = end, "value"
                continue
            if word == "FROM":
                in_from[-1] = True
            elif word in _CLAUSE_ENDS:
                in_from[-1] = False
            previous = word
            i = m.end()
            continue
        if c == "(":
            in_from.append(False)
        elif c == ")" and len(in_from) > 1:
            in_from.pop()
        if not c.isspace():
            previous = c
        i += 1
    return spans


def number_parameters(text: str) -> str:
    """`text` with each positional '?' written as '$n', n counting the statement's '?' from 1, so
    that a function's arguments and the SQL around them share one numbering."""
    out, n, i = [], 0, 0
    while i < len(text):
        j = _skip(text, i)
        if j != i:
            out.append(text[i:j])
            i = j
            continue
        if text[i] == "?":
            n += 1
            out.append(f"${n}")
        else:
            out.append(text[i])
        i += 1
    return "".join(out)


def parameters_of(text: str) -> list[tuple[int, int, str]]:
    """(start, end, key) of every parameter outside quotes and comments; key is '?', a number or a name."""
    found, i = [], 0
    while i < len(text):
        j = _skip(text, i)
        if j != i:
            i = j
            continue
        m = _PARAM.match(text, i) if text[i] in "?$" and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")) \
            else None
        if m:
            found.append((m.start(), m.end(), m.group(1) or "?"))
            i = m.end()
            continue
        i += 1
    return found


def rewritten(text: str, lo: int, hi: int, spans: list[CallSpan], private: list[str]) -> str:
    """text[lo:hi] with each call replaced by its private relation (aliased by the function's name
    when the user gave no alias, so columns read `influence.score`) and each '?' written as '$n',
    n its place among the statement's '?'."""
    edits = [(s.start, s.end, p if s.has_alias else f"{p} AS {s.name.lower()}") for s, p in zip(spans, private)]
    inside = [(s.start, s.end) for s in spans]
    ordinal = 0
    for start, end, key in parameters_of(text):
        if key != "?":
            continue
        ordinal += 1
        if lo <= start < hi and not any(a <= start < b for a, b in inside):
            edits.append((start, end, f"${ordinal}"))
    out, at = [], lo
    for start, end, new in sorted(edits):
        out.append(text[at:start])
        out.append(new)
        at = end
    out.append(text[at:hi])
    return "".join(out)


def blanked(text: str, lo: int, hi: int, spans: list[CallSpan]) -> str:
    """text[lo:hi] as DuckDB may parse it, each character at its place: what lies outside blanked
    and each call replaced by one identifier padded with spaces (newlines kept), so that a parse
    error's line and column are those of the user's statement."""
    chars = [c if lo <= i < hi or c == "\n" else " " for i, c in enumerate(text)]
    for s in spans:
        chars[s.start:s.end] = ["q"] + [" " if c != "\n" else c for c in text[s.start + 1:s.end]]
    return "".join(chars)


def bound_parameters(text: str, params):
    """(text, parameters) for DuckDB: only the parameters `text` uses, renumbered $1.. in order
    of first use, so that those of function arguments are not passed to DuckDB too."""
    from metaql.binder import parameter
    found = parameters_of(text)
    if not found:
        return text, None
    if all(not key.isdigit() and key != "?" for _, _, key in found) and isinstance(params, dict):
        return text, {key: parameter(key, params) for _, _, key in found}
    numbers: dict[str, int] = {}
    values, out, at = [], [], 0
    for start, end, key in found:
        if key not in numbers:
            numbers[key] = len(numbers) + 1
            values.append(parameter(key, params))
        out.append(text[at:start] + f"${numbers[key]}")
        at = end
    out.append(text[at:])
    return "".join(out), values
