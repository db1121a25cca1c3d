"""Shell completion by position (keywords, layers, sets, checkpoints, table functions and their
arguments, tables, columns, dot commands) and syntax highlighting."""
from __future__ import annotations

import re
import typing

from prompt_toolkit.completion import Completer, Completion, PathCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.lexers import PygmentsLexer
from pygments.lexers.sql import SqlLexer
from pygments.token import Keyword, Name

from metaql.engine.functions import CheckpointList, LayerList, SampleRef, SetName
from metaql.format import MODES
from metaql.shell import DOT_COMMANDS
from metaql.storage.losses import LOSS_TARGETS

KEYWORDS = ["SELECT", "TOPK", "FROM", "WHERE", "GROUP BY", "ORDER BY", "ASC", "DESC", "LIMIT", "JOIN",
            "USING", "AS", "WITH", "CREATE SET", "CREATE OR REPLACE SET", "DROP SET", "DROP CHECKPOINT", "IF EXISTS", "EXPLAIN",
            "EXPLAIN ANALYZE", "SHOW", "DESCRIBE"]
SHOW_TARGETS = ["LAYERS", "CHECKPOINTS", "SETS", "FUNCTIONS", "TABLES"]
SELECT_WORDS = ["TOPK", "DISTINCT", "AS", "FROM"]
FILTER_WORDS = ["AND", "OR", "NOT", "IN", "IS", "NULL", "LIKE", "BETWEEN", "GROUP BY", "ORDER BY", "LIMIT"]
ORDER_WORDS = ["ASC", "DESC", "LIMIT"]
SWITCHES = {".mode": MODES, ".timer": ("on", "off"), ".bail": ("on", "off"), ".headers": ("on", "off"),
            ".echo": ("on", "off")}
# Arguments typed plain `str` whose values the hints cannot tell.
KNOWN_VALUES = {"similarity": ("dot", "cosine"), "loss": LOSS_TARGETS}

Candidate = tuple[str, str]    # (text, what it is: shown beside it in the menu)


class MetaQLCompleter(Completer):
    """Completes the word before the cursor with what fits its position in the statement."""

    def __init__(self, shell):
        self.shell = shell    # the shell's connection changes with .open

    def get_completions(self, document, complete_event):
        text = document.text_before_cursor
        if text.lstrip().startswith("."):
            yield from self._dot_completions(text, complete_event)
            return
        word = re.search(r"\w*$", text).group()
        try:
            candidates = self.candidates(text[:len(text) - len(word)].rsplit(";", 1)[-1])
        except Exception:  # a catalog that cannot answer must not break the prompt: offer nothing
            return
        seen = set()
        for value, meta in candidates:
            if value.lower().startswith(word.lower()) and value not in seen:
                seen.add(value)
                shown = _in_case_of(word, value) if meta == "keyword" else value
                yield Completion(shown, start_position=-len(word), display_meta=meta)

    # ---- by position ---------------------------------------------------------------------------------
    def candidates(self, before: str) -> list[Candidate]:
        """What may come next after `before` (the statement up to the word being completed)."""
        def at(pattern: str) -> bool:
            return re.search(pattern, before, re.I | re.S) is not None
        if at(r"\b(batch|each)\s*\(\s*$") or at(r"\btopk\s*\(\s*\d+\s*\)\s*$"):
            return self._sets()
        call = _open_call(before)
        if call and call[0] in self.shell.con.registry:
            return self._arguments(*call)
        if at(r"\bdrop\s+set\s+(if\s+exists\s+)?$"):
            return [(s, "set") for s in self.shell.con.store.set_names()]
        if at(r"\b(from|join)\s+$"):
            return self._functions() + self._tables()
        if at(r"\bdescribe\s+$"):
            return self._functions()
        if at(r"\bshow\s+$"):
            return _keywords(SHOW_TARGETS)
        if at(r"\bselect\s+(?:(?!\bfrom\b).)*$"):
            return self._columns() + _keywords(SELECT_WORDS)
        if at(r"\bwhere\s+(?:(?!\b(?:group|order|limit)\b).)*$"):
            return self._columns() + _keywords(FILTER_WORDS)
        if at(r"\b(?:group|order)\s+by\s+(?:(?!\blimit\b).)*$"):
            return self._columns() + _keywords(ORDER_WORDS)
        return _keywords(KEYWORDS) + self._functions() + self._layers() + self._sets() + self._columns()

    def _arguments(self, function: str, inside: str) -> list[Candidate]:
        """Inside `FUNCTION(...)`: argument names after '(' or ',', else the values of the argument
        being written, by its type hint."""
        params = self.shell.con.registry.get(function).params
        current = _last_argument(inside)
        if not current.strip():
            return [(f"{p.name}=", p.describe()) for p in params.values()]
        named = re.fullmatch(r"\s*(\w+)\s*=\s*(.*)", current, re.S)
        param = params.get(named.group(1).lower()) if named else None
        if param is None:
            return []
        in_list = named.group(2).startswith("[")
        if param.hint is LayerList:
            return self._layers() if in_list else [("*", "every layer"), ("[", "a list of layers")]
        if param.hint is CheckpointList:
            return self._checkpoints() + ([] if in_list else [("all", "keyword"), ("first", "keyword"),
                                                              ("last", "keyword")])
        if param.hint is SampleRef:     # each(set), the train x query matrix, on INFLUENCE's query side only
            each = [("each(", "each sample of a set apart")] if param.name == "query" else []
            return [("batch(", "a set or split"), *each, ("point(", "one sample id")]
        if param.hint is SetName:
            return self._sets()
        if typing.get_origin(param.hint) is typing.Literal:
            return [(str(v), "value") for v in typing.get_args(param.hint)]
        return [(v, "value") for v in KNOWN_VALUES.get(param.name, ())]

    # ---- names from the catalog -------------------------------------------------------------------------
    def _layers(self) -> list[Candidate]:
        return [(layer["name"], "layer") for layer in self.shell.con.store.layers()]

    def _sets(self) -> list[Candidate]:
        store = self.shell.con.store
        return [(s, "set") for s in store.set_names()] + [(s, "split") for s in store.splits()]

    def _checkpoints(self) -> list[Candidate]:
        return [(c["name"], "checkpoint") for c in self.shell.con.store.checkpoints()]

    def _functions(self) -> list[Candidate]:
        return [(f, "table function") for f in self.shell.con.registry.names()]

    def _tables(self) -> list[Candidate]:
        rows = self.shell.con.store.sql("SELECT table_name FROM information_schema.tables ORDER BY 1").fetchall()
        return [(r[0], "table") for r in rows]

    def _columns(self) -> list[Candidate]:
        rows = self.shell.con.store.sql("SELECT column_name FROM information_schema.columns "
                                        "WHERE table_name = 'samples' ORDER BY ordinal_position").fetchall()
        return [(r[0], "column") for r in rows]

    # ---- dot commands -------------------------------------------------------------------------------------
    def _dot_completions(self, text: str, complete_event):
        command = re.fullmatch(r"\s*(\.\w*)", text)
        if command:
            typed = command.group(1)
            for name, (_, what) in DOT_COMMANDS.items():
                if name.startswith(typed.lower()):
                    yield Completion(name, start_position=-len(typed), display_meta=what)
            return
        argument = re.fullmatch(r"\s*(\.\w+)\s+(?:.*\s)?(\S*)", text, re.S)
        if not argument:
            return
        name, word = argument.group(1).lower(), argument.group(2)
        if name in (".read", ".open", ".output", ".once"):
            if name == ".open" and word.startswith("-") and "--readonly".startswith(word):
                yield Completion("--readonly", start_position=-len(word))
            yield from PathCompleter(expanduser=True).get_completions(Document(word), complete_event)
            return
        for value in SWITCHES.get(name, ()):
            if value.startswith(word.lower()):
                yield Completion(value, start_position=-len(word))


def _keywords(words: list[str]) -> list[Candidate]:
    return [(w, "keyword") for w in words]


def _in_case_of(typed: str, keyword: str) -> str:
    """Keywords follow the case the user types them in."""
    return keyword.lower() if typed and typed.islower() else keyword


def _open_call(before: str) -> tuple[str, str] | None:
    """The innermost unclosed `name(` before the cursor: its name and the text after the '('."""
    opened = []
    for m in re.finditer(r"[()]", before):
        if m.group() == "(":
            opened.append(m.start())
        elif opened:
            opened.pop()
    if not opened:
        return None
    name = re.search(r"(\w+)\s*$", before[:opened[-1]])
    return (name.group(1), before[opened[-1] + 1:]) if name else None


def _last_argument(inside: str) -> str:
    """The text after the last top-level ',' of a call's arguments (commas in [...] do not count)."""
    depth, start = 0, 0
    for i, c in enumerate(inside):
        if c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
        elif c == "," and depth == 0:
            start = i + 1
    return inside[start:]


# ---- highlighting ------------------------------------------------------------------------------------------
class MetaQLLexer(SqlLexer):
    """SQL, plus MetaQL's words: TOPK and SHOW's targets as keywords, `name(` as a function (table
    functions, batch, point), and a dot command as one token."""
    name = "MetaQL"
    aliases = ["metaql"]

    def get_tokens_unprocessed(self, text, stack=("root",)):
        if text.lstrip().startswith("."):
            yield 0, Keyword.Pseudo, text
            return
        tokens = list(super().get_tokens_unprocessed(text, stack))
        previous = ""
        for i, (index, token, value) in enumerate(tokens):
            if token in Name and (value.upper() == "TOPK" or (previous == "SHOW" and value.upper() in SHOW_TARGETS)):
                token = Keyword
            elif token in Name and i + 1 < len(tokens) and tokens[i + 1][2] == "(":
                token = Name.Function
            if value.strip():
                previous = value.upper()
            yield index, token, value


def lexer() -> PygmentsLexer:
    return PygmentsLexer(MetaQLLexer)
