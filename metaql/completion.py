"""Shell completion (keywords, layers, sets, functions, columns) and syntax highlighting."""
from __future__ import annotations

import re

from prompt_toolkit.completion import Completer, Completion

from metaql.shell import KEYWORDS


class MetaQLCompleter(Completer):
    def __init__(self, shell):
        self.shell = shell

    def candidates(self, before: str) -> list[str]:
        con = self.shell.con
        names: list[str] = []
        try:
            if re.search(r"layers\s*=\s*\[[^\]]*$", before, re.I):
                return [l["name"] for l in con.store.layers()]
            if re.search(r"(batch\(|TOPK\(\d+\)\s+)\w*$", before, re.I):
                return con.store.set_names() + con.store.splits()
            if re.search(r"\bfrom\s+\w*$", before, re.I):
                return con.registry.names() + ["samples", "checkpoints", "layers", "sets", "shards"]
            names += con.registry.names() + [l["name"] for l in con.store.layers()] + con.store.set_names()
            names += [r[0] for r in con.store.sql("SELECT column_name FROM information_schema.columns "
                                                  "WHERE table_name = 'samples'").fetchall()]
        except Exception:  # completion must never break the prompt
            pass
        return KEYWORDS + names

    def get_completions(self, document, complete_event):
        word = document.get_word_before_cursor(WORD=False)
        for c in self.candidates(document.text_before_cursor):
            if c.lower().startswith(word.lower()):
                yield Completion(c, start_position=-len(word))


def lexer():
    from prompt_toolkit.lexers import PygmentsLexer
    from pygments.lexers.sql import SqlLexer
    return PygmentsLexer(SqlLexer)
