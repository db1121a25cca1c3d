"""The interactive shell, after DuckDB's: statements end with ';' (and may span lines), dot
commands, boxed tables, a timer, history, completion. Also runs scripts non-interactively."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from metaql.connection import Connection, connect
from metaql.engine.errors import Error, InterruptException
from metaql.format import MODES, render
from metaql.parser import is_complete, split_statements

KEYWORDS = ["SELECT", "TOPK", "FROM", "ORDER BY", "ASC", "DESC", "CREATE SET", "CREATE OR REPLACE SET", "AS",
            "DROP SET", "IF EXISTS", "EXPLAIN", "EXPLAIN ANALYZE", "SHOW", "DESCRIBE", "LAYERS", "CHECKPOINTS",
            "SETS", "FUNCTIONS", "TABLES", "WHERE", "JOIN", "USING", "LIMIT", "GROUP BY", "batch", "point",
            "layers", "query", "train", "checkpoints", "similarity", "loss", "dot", "cosine", "all", "last"]

HELP = """\
.help                 this text
.tables               tables of the catalog
.layers               captured layers (SHOW LAYERS)
.sets                 named sample sets (SHOW SETS)
.functions            table functions (SHOW FUNCTIONS)
.mode MODE            output mode: box, csv, json, markdown
.maxrows N            rows shown per result in box mode
.timer on|off         print each statement's time
.read FILE            run the statements in FILE
.open [--readonly] STORE   open another store
.exit                 leave (Ctrl-D works too)
Statements end with ';' and may span several lines. Ctrl-C cancels the input or the running query."""


class Shell:
    def __init__(self, store: str = ":memory:", read_only: bool = False, mode: str = "box",
                 max_rows: int = 40, out=None, err=None):
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.con: Connection = connect(store, read_only=read_only)
        self.store_name = store
        self.mode, self.max_rows, self.timer = mode, max_rows, False

    def __enter__(self) -> "Shell":
        return self

    def __exit__(self, *exc) -> None:
        self.con.close()

    # ---- running text ------------------------------------------------------------------------------
    def run_script(self, text: str, bail: bool = True) -> int:
        """Runs dot commands and statements; returns 1 at the first error when `bail`."""
        status = 0
        for chunk in _chunks(text):
            ok = self.run_dot(chunk) if chunk.startswith(".") else self.run_statement(chunk)
            if ok is False:
                status = 1
                if bail:
                    return 1
            if ok == "exit":
                break
        return status

    def run_statement(self, text: str) -> bool:
        t0 = time.perf_counter()
        try:
            self.con.execute(text)
        except Error as e:
            self._error(e)
            return False
        result = self.con._last().arrow()
        if not (result.column_names == ["status"] and result.num_rows == 1 and self.mode == "box"):
            print(render(result, self.mode, self.max_rows), file=self.out)
        else:
            print(result.column(0)[0].as_py(), file=self.out)
        if self.timer:
            print(f"Run Time: {time.perf_counter() - t0:.3f} s", file=self.out)
        return True

    def _error(self, e: Exception) -> None:
        kind = type(e).__name__.replace("Exception", " Error") if type(e).__name__ != "Error" else "Error"
        print(f"{kind}: {e}", file=self.err)

    def run_dot(self, line: str):
        parts = line.strip().split()
        cmd, args = parts[0].lower(), parts[1:]
        simple = {".tables": "SHOW TABLES", ".layers": "SHOW LAYERS", ".sets": "SHOW SETS",
                  ".functions": "SHOW FUNCTIONS", ".checkpoints": "SHOW CHECKPOINTS"}
        if cmd in simple:
            return self.run_statement(simple[cmd])
        if cmd == ".help":
            print(HELP, file=self.out)
        elif cmd in (".exit", ".quit"):
            return "exit"
        elif cmd == ".mode" and args and args[0] in MODES:
            self.mode = args[0]
        elif cmd == ".maxrows" and args and args[0].isdigit():
            self.max_rows = int(args[0])
        elif cmd == ".timer" and args and args[0] in ("on", "off"):
            self.timer = args[0] == "on"
        elif cmd == ".read" and args:
            try:
                text = Path(args[0]).read_text()
            except OSError as e:
                print(f"Error: cannot read {args[0]}: {e.strerror}", file=self.err)
                return False
            return self.run_script(text, bail=True) == 0
        elif cmd == ".open" and args:
            ro = "--readonly" in args
            store = [a for a in args if a != "--readonly"][0]
            try:
                new = connect(store, read_only=ro)
            except Error as e:
                self._error(e)
                return False
            self.con.close()
            self.con, self.store_name = new, store
        else:
            print(f"Error: unknown or incomplete dot command '{line.strip()}'; .help lists them", file=self.err)
            return False
        return True

    # ---- interactive ---------------------------------------------------------------------------------
    def interactive(self) -> int:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory

        from metaql.completion import MetaQLCompleter, lexer
        print(f"MetaQL {__import__('metaql').__version__} on {self.store_name}. Enter \".help\" for usage hints.",
              file=self.out)
        history = Path(os.environ.get("METAQL_HISTORY", Path.home() / ".metaql_history"))
        session = PromptSession(history=FileHistory(str(history)), completer=MetaQLCompleter(self),
                                lexer=lexer(), complete_while_typing=False, enable_history_search=True)
        buffer = ""
        while True:
            try:
                line = session.prompt("M " if not buffer else "· ")
            except KeyboardInterrupt:
                buffer = ""
                continue
            except EOFError:
                return 0
            if not buffer and line.strip().startswith("."):
                if self.run_dot(line) == "exit":
                    return 0
                continue
            buffer += line + "\n"
            if is_complete(buffer):
                try:
                    self.run_script(buffer, bail=False)
                except (KeyboardInterrupt, InterruptException):
                    print("Interrupted", file=self.err)
                buffer = ""


def _chunks(text: str) -> list[str]:
    """Dot commands (one line each) and statements, in order."""
    out, pending = [], []
    for line in text.splitlines():
        if not "".join(pending).strip() and line.strip().startswith("."):
            out.append(line.strip())
        else:
            pending.append(line)
            if is_complete("\n".join(pending)):
                out.extend(split_statements("\n".join(pending)))
                pending = []
    if "".join(pending).strip():
        out.extend(split_statements("\n".join(pending)))
    return out
