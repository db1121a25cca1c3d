"""Text -> statements -> AST. Parse errors carry line, column, the line with a caret, and plain words.

The split between the two parsers:
- MetaQL's own statements parse with the Lark grammar (grammar/metaql.lark): CREATE [OR REPLACE]
  SET name AS <query> (the header; the query is SQL, below), DROP SET, DROP CHECKPOINT, SHOW LAYERS|CHECKPOINTS|SETS|
  FUNCTIONS|TABLES, DESCRIBE <table function>, SELECT TOPK(n) train FROM F(...) ORDER BY ASC|DESC,
  and EXPLAIN [ANALYZE] of TOPK or of SQL that calls a table function.
- Everything else is DuckDB's SQL. A MetaQL table-function call may stand in it wherever a table
  may (FROM, JOIN, CTEs, subqueries, UNION, CREATE TABLE AS, COPY, INSERT ... SELECT): the scanner
  of metaql/sqlcalls.py finds each call's span, the call's text alone parses with the grammar's
  table_call rule, and the face runs the call and gives DuckDB the rest, with each span replaced by
  a private relation (ast.SQLWithCalls). SQL without a call (DESCRIBE samples, EXPLAIN SELECT ...,
  SUMMARIZE) goes to DuckDB untouched (ast.PlainSQL).
"""
from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources

from lark import Lark, Token, Transformer, UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken
from lark.exceptions import VisitError

from metaql import ast
from metaql.errors import ParserException
from metaql.sqlcalls import find_calls, parameters_of

METAQL_STARTS = re.compile(r"^\s*(create\s+(or\s+replace\s+)?set\b|drop\s+(set|checkpoint)\b|show\b|select\s+topk\b)",
                           re.I)
_DESCRIBE = re.compile(r"^\s*describe\s+([A-Za-z_][A-Za-z0-9_]*)\s*;?\s*$", re.I)
_EXPLAIN = re.compile(r"^\s*explain\b(\s+analyze\b)?", re.I)
# Bounds that no real statement reaches but that keep every parse short and free of recursion
# errors: the AST transformer recurses once per level of brackets.
MAX_NESTING = 32
MAX_STATEMENT_CHARS = 1_000_000
MAX_NUMBER_CHARS = 400      # far beyond any int64 or double, far below Python's 4,300-digit limit
_CALL = re.compile(r"\b(from|join)\s+([A-Za-z_][A-Za-z0-9_]*)\s*\(", re.I)

TERMINAL_WORDS = {
    "NAME": "a name", "INT": "a whole number", "SIGNED_NUMBER": "a number", "STRING": "a 'string'",
    "PARAMETER": "a parameter (?, $1, $name)", "LPAR": "'('", "RPAR": "')'", "LSQB": "'['",
    "RSQB": "']'", "COMMA": "','", "EQUALS": "'='", "STAR": "'*'", "SEMICOLON": "';'",
    "DIRECTION": "ASC or DESC", "SQL_BODY": "a SELECT over the catalog", "SQL_COLUMNS": "columns",
    "SQL_TAIL": "more SQL", "$END": "the end of the statement",
}


@lru_cache(maxsize=1)
def parser() -> Lark:
    text = resources.files("metaql.grammar").joinpath("metaql.lark").read_text()
    return Lark(text, parser="lalr", lexer="contextual", propagate_positions=False, maybe_placeholders=True,
                start=["start", "table_call"])


def split_statements(text: str) -> list[str]:
    """Splits a script on semicolons outside quotes and comments; drops empty statements."""
    out, buf, i, quote = [], [], 0, None
    while i < len(text):
        c = text[i]
        if quote:
            buf.append(c)
            if c == quote:
                quote = None
        elif c in "'\"":
            quote = c
            buf.append(c)
        elif text.startswith("--", i):
            end = text.find("\n", i)
            end = len(text) if end < 0 else end
            buf.append(text[i:end])
            i = end
            continue
        elif c == ";":
            out.append("".join(buf))
            buf = []
        else:
            buf.append(c)
        i += 1
    out.append("".join(buf))
    return [s for s in out if _strip_comments(s).strip()]


def is_complete(text: str) -> bool:
    """True when the text ends a statement (a ';' outside quotes/comments), for the shell."""
    stripped = _strip_comments(text).rstrip()
    return stripped.endswith(";") and len(split_statements(text + "\n")) >= 1


def _strip_comments(s: str) -> str:
    return re.sub(r"--[^\n]*", "", s)


def is_metaql(statement: str, function_names) -> bool:
    return not isinstance(parse_statement(statement, function_names), ast.PlainSQL)


def parse_statement(statement: str, function_names=()) -> object:
    """One statement's AST: MetaQL's own statement, SQL with table-function calls, or plain SQL."""
    head = _strip_comments(statement)
    names = {n.upper() for n in function_names}
    described = _DESCRIBE.match(head)
    if METAQL_STARTS.match(head) or (described and described.group(1).upper() in names):
        return _lark_statement(statement, function_names)
    explained = _EXPLAIN.match(statement)
    if explained:
        return _explain(statement, explained, function_names)
    return with_calls(statement, 0, len(statement), function_names) or ast.PlainSQL(statement.strip())


def _lark_statement(statement: str, function_names) -> object:
    check_size(statement)
    try:
        tree = parser().parse(statement, start="start")
    except UnexpectedInput as e:
        raise _parse_error(statement, e) from None
    return _transformed(ToAST(statement, function_names), tree)


def _transformed(transformer, tree):
    try:
        return transformer.transform(tree)
    except VisitError as e:   # Lark wraps what a rule raised; the user should see our error
        if isinstance(e.orig_exc, ParserException):
            raise e.orig_exc from None
        raise


def _explain(statement: str, explained, function_names) -> object:
    """EXPLAIN of TOPK or of SQL with a call is MetaQL's; EXPLAIN of plain SQL is DuckDB's."""
    rest = _padded(statement, explained.end(), len(statement))
    if re.match(r"^\s*select\s+topk\b", _strip_comments(rest), re.I):
        return _lark_statement(statement, function_names)
    inner = parse_statement(rest, function_names)
    if isinstance(inner, ast.SQLWithCalls):
        return ast.Explain(ast.SQLWithCalls(statement, explained.end(), inner.hi, inner.calls),
                           bool(explained.group(1)))
    return ast.PlainSQL(statement.strip())


def _padded(text: str, lo: int, hi: int) -> str:
    """text[lo:hi] at its place: what precedes it blanked, newlines kept, so that positions (and
    parse errors' line and column) stay those of the whole statement."""
    return re.sub(r"[^\n]", " ", text[:lo]) + text[lo:hi]


def with_calls(statement: str, lo: int, hi: int, function_names) -> ast.SQLWithCalls | None:
    """statement[lo:hi] as SQL with its table-function calls parsed; None when it calls none."""
    region = _padded(statement, lo, hi)
    spans = find_calls(region, {n.upper() for n in function_names})
    if not spans:
        return None
    check_size(region)
    calls = []
    for span in spans:
        text = _padded(region, span.start, span.end)
        try:
            tree = parser().parse(text, start="table_call")
        except UnexpectedInput as e:
            raise _parse_error(text, e, statement) from None
        calls.append((span, _transformed(ToAST(statement, function_names), tree)))
    return ast.SQLWithCalls(statement, lo, hi, calls)


def check_size(statement: str) -> None:
    """Refuses a MetaQL statement too long, or with brackets nested too deep, before parsing it
    (a loop, not recursion: 10,000 nested '[' must be refused, not overflow the stack)."""
    if len(statement) > MAX_STATEMENT_CHARS:
        raise ParserException(f"the statement is {len(statement):,} characters long; MetaQL statements are "
                              f"limited to {MAX_STATEMENT_CHARS:,} (pass long lists as parameters or sets)")
    depth, quote, i = 0, False, 0
    while i < len(statement):
        c = statement[i]
        if c == "'":
            quote = not quote
        elif quote:
            pass
        elif statement.startswith("--", i):
            end = statement.find("\n", i)
            i = len(statement) if end < 0 else end
            continue
        elif c in "([":
            depth += 1
            if depth > MAX_NESTING:
                line, col = _line_col(statement, i)
                raise ParserException(f"brackets are nested more than {MAX_NESTING} levels deep; "
                                      "flatten the expression", line, col, _caret(statement, line, col))
        elif c in ")]":
            depth = max(depth - 1, 0)
        i += 1


def _line_col(text: str, pos: int) -> tuple[int, int]:
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1


def parse(text: str, function_names=()) -> list:
    return [parse_statement(s, function_names) for s in split_statements(text)]


# SELECT TOPK(k) FROM f(...): the set to rank left out, so the parser took FROM for its name
_TOPK_WITHOUT_SET = re.compile(r"^\s*(explain\s+(analyze\s+)?)?select\s+topk\s*\([^)]*\)\s*(from)\s+[A-Za-z_]\w*\s*\(",
                               re.I)


def _parse_error(text: str, e: UnexpectedInput, shown: str | None = None) -> ParserException:
    forgotten = _TOPK_WITHOUT_SET.match(text)
    if forgotten:
        line, col = _line_col(text, forgotten.start(3))
        return ParserException("syntax error: TOPK(k) needs the set to rank before FROM, e.g. TOPK(3) train "
                               "FROM ...", line, col, _caret(shown or text, line, col))
    if isinstance(e, UnexpectedToken):
        expected = sorted(TERMINAL_WORDS.get(t, t) for t in e.accepts or e.expected)
        found = "the end of the statement" if e.token.type == "$END" else f"'{_clip(str(e.token))}'"
        msg = f"syntax error: unexpected {found}; expected {_or(expected)}"
    elif isinstance(e, UnexpectedEOF):
        msg = f"syntax error: the statement ends too early; expected {_or(sorted(TERMINAL_WORDS.get(t, t) for t in e.expected))}"
    else:
        assert isinstance(e, UnexpectedCharacters)
        msg = f"syntax error: unexpected character '{text[e.pos_in_stream]}'"
    hint = _hint(text)
    if hint:
        msg += f". Hint: {hint}"
    line, col = getattr(e, "line", None), getattr(e, "column", None)
    if line is None or line < 0:
        line = text.count("\n") + 1
        col = len(text.rsplit("\n", 1)[-1]) + 1
    return ParserException(msg, line, col, _caret(shown or text, line, col))


def _clip(s: str, n: int = 60) -> str:
    return s if len(s) <= n else s[:n] + "..."


def _caret(text: str, line: int, col: int, width: int = 100) -> str:
    lines = text.split("\n")
    src = lines[line - 1] if 0 < line <= len(lines) else ""
    col = max(col, 1)
    if len(src) > width:    # a window around the spot, so a huge line prints as one screen line
        start = max(0, min(col - 1 - width // 2, len(src) - width))
        src = ("..." if start else "") + src[start:start + width] + ("..." if start + width < len(src) else "")
        col = col - start + (3 if start else 0)
    return f"  {src}\n  {' ' * (col - 1)}^"


def _or(words: list[str]) -> str:
    words = list(dict.fromkeys(words))
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _hint(text: str) -> str | None:
    if re.search(r"layers\s*=\s*[A-Za-z_][\w.]*\s*,\s*[A-Za-z_][\w.]*\s*(,|\))", text, re.I) and \
            not re.search(r"layers\s*=\s*\[", text, re.I):
        return "layers= takes a list in brackets, e.g. layers=[fc1, fc2], or layers=*"
    if re.match(r"\s*select\s+topk\s*[^(\s]", text, re.I) or re.match(r"\s*select\s+topk\s+\d", text, re.I):
        return "write TOPK(n) with the count in parentheses, e.g. SELECT TOPK(50) train FROM ..."
    return None


class ToAST(Transformer):
    """Lark tree -> metaql.ast objects."""

    def __init__(self, text: str = "", function_names=()):
        super().__init__()
        self._text = text
        self._names = function_names
        # a '?' is numbered by its place in the whole statement, so that numbering is one across
        # TOPK(?), a call's arguments and the SQL around them
        self._question_marks = [start for start, _, key in parameters_of(text) if key == "?"]

    def _parameter(self, token) -> ast.Parameter:
        s = str(token)
        if s != "?":
            return ast.Parameter(s[1:])
        pos = getattr(token, "start_pos", None)
        n = self._question_marks.index(pos) + 1 if pos in self._question_marks else 1
        return ast.Parameter(str(n))

    def _error(self, message: str, token) -> ParserException:
        line, col = getattr(token, "line", None), getattr(token, "column", None)
        if line is None:
            return ParserException(message)
        return ParserException(message, line, col, _caret(self._text, line, col))

    def start(self, items):
        return items[0]

    # values
    def name(self, items):
        return ast.Name(str(items[0]))

    def star(self, _):
        return ast.Star()

    def number(self, items):
        return ast.Literal(self._number(items[0]))

    def _number(self, token) -> int | float:
        s = str(token)
        if len(s) > MAX_NUMBER_CHARS:
            raise self._error(f"a number of {len(s):,} characters is too long; numbers are limited to "
                              f"{MAX_NUMBER_CHARS} characters", token)
        if not any(c in s for c in ".eE"):
            return int(s)
        value = float(s)
        if value in (float("inf"), float("-inf")):
            raise self._error(f"the number {s} is too large for a double", token)
        return value

    def string(self, items):
        return ast.Literal(str(items[0])[1:-1].replace("''", "'"))

    def parameter(self, items):
        return self._parameter(items[0])

    def list(self, items):
        return ast.ListValue([v for v in items if v is not None and not isinstance(v, Token)])

    def call(self, items):
        return ast.Call(str(items[0]), [v for v in items[1:] if v is not None and not isinstance(v, Token)])

    def positional_argument(self, items):
        return (None, items[0])

    def named_argument(self, items):
        return (items[0], items[2])

    def table_call(self, items):
        call = ast.TableCall(str(items[0]))
        for item in items[1:]:
            if not isinstance(item, tuple):
                continue
            key, value = item
            if key is None:
                call.positional.append(value)
            elif str(key).lower() in call.args:
                raise self._error(f"argument '{key}' is given twice in {call.name}(); give each argument once",
                                  key)
            else:
                call.args[str(key).lower()] = value
        return call

    topk_call = table_call

    # statements
    def create_set(self, items):
        replace = any(isinstance(i, ast.Literal) and i.value == "or_replace" for i in items)
        name = [i for i in items if isinstance(i, Token) and i.type == "NAME"][0]
        body = [i for i in items if isinstance(i, Token) and i.type == "SQL_BODY"][0]
        calls = with_calls(self._text, body.start_pos, body.end_pos, self._names)
        return ast.CreateSet(str(name), str(body).strip(), replace, calls, self._text, body.start_pos, body.end_pos)

    def or_replace(self, _):
        return ast.Literal("or_replace")

    def if_exists(self, _):
        return ast.Literal("if_exists")

    def drop_set(self, items):
        name = [i for i in items if isinstance(i, Token) and i.type == "NAME"][0]
        return ast.DropSet(str(name), any(isinstance(i, ast.Literal) for i in items))

    def drop_checkpoint(self, items):
        name = [i for i in items if isinstance(i, Token) and i.type in ("NAME", "STRING")][0]
        text = str(name)[1:-1].replace("''", "'") if name.type == "STRING" else str(name)
        return ast.DropCheckpoint(text, any(isinstance(i, ast.Literal) for i in items))

    def order(self, items):
        if items[2].type == "NAME" and str(items[2]).lower() != "score":
            raise self._error(f"TOPK ranks by the function's score: write ORDER BY score ASC|DESC (or ORDER BY "
                              f"ASC|DESC), not ORDER BY {_clip(str(items[2]))}", items[2])
        direction = items[-1] if items[-1].type == "DIRECTION" else "asc"
        return str(direction).lower() == "asc"

    def topk_select(self, items):
        k = self._parameter(items[3]) if items[3].type == "PARAMETER" else self._number(items[3])
        call = [i for i in items if isinstance(i, ast.TableCall)][0]
        asc = items[-1] if isinstance(items[-1], bool) else False
        return ast.TopKSelect(k, str(items[5]), call, asc)

    def alias(self, items):
        return ast.Name(str(items[1]))

    def func_select(self, items):
        call = [i for i in items if isinstance(i, ast.TableCall)][0]
        alias = next((i.value for i in items if isinstance(i, ast.Name)), None)
        tail = next((str(i) for i in items if isinstance(i, Token) and i.type == "SQL_TAIL"), "")
        return ast.FuncSelect(str(items[1]).strip(), call, alias, tail.strip())

    def explain(self, items):
        analyze = any(isinstance(i, Token) and i.type == "ANALYZE" for i in items)
        return ast.Explain(items[-1], analyze)

    def show(self, items):
        return ast.Show(str(items[1]).lower())

    def describe(self, items):
        return ast.Describe(str(items[1]))
