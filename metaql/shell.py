"""The shell, after DuckDB's: statements end with ';' (and may span lines), dot commands, boxed
tables, a timer, history, completion. Runs scripts (-c, standard input, .read) the same way."""
from __future__ import annotations

import difflib
import os
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

from metaql.engine.errors import (BinderException, CatalogException, Error, InternalException,
                                  InterruptException, InvalidInputException, IOException, ParserException)
from metaql.format import MODES, render
from metaql.parser import is_complete, split_statements

PROMPT = "metaql> "

# name: (arguments, what it does). `.help` prints this table; completion offers the names.
DOT_COMMANDS = {
    ".help": ("", "show this text"),
    ".tables": ("", "tables of the catalog (SHOW TABLES)"),
    ".layers": ("", "captured layers (SHOW LAYERS)"),
    ".sets": ("", "named sample sets (SHOW SETS)"),
    ".checkpoints": ("", "checkpoints (SHOW CHECKPOINTS)"),
    ".functions": ("", "table functions (SHOW FUNCTIONS)"),
    ".mode": ("[" + "|".join(MODES) + "]", "set the output mode, or show it"),
    ".maxrows": ("[N]", "rows a box shows, the middle ones elided (0: all); or show it"),
    ".timer": ("[on|off]", "print each statement's run time"),
    ".bail": ("[on|off]", "stop at the first error (on for -c and scripts, off at the prompt)"),
    ".read": ("FILE", "run the statements and dot commands in FILE"),
    ".open": ("[--readonly] STORE", "close this store and open STORE"),
    ".exit": ("[CODE]", "leave the shell (Ctrl-D does too)"),
}
_ALIASES = {".quit": ".exit", ".q": ".exit"}
_SHOW = {".tables": "SHOW TABLES", ".layers": "SHOW LAYERS", ".sets": "SHOW SETS",
         ".checkpoints": "SHOW CHECKPOINTS", ".functions": "SHOW FUNCTIONS"}

# Most specific first: DuckDB's labels for the kinds of error.
_ERROR_LABELS = [(ParserException, "Parser Error"), (BinderException, "Binder Error"),
                 (CatalogException, "Catalog Error"), (InvalidInputException, "Invalid Input Error"),
                 (IOException, "IO Error"), (InternalException, "INTERNAL Error"), (Error, "Error")]
_LABELLED = re.compile(r"^[A-Z][A-Za-z]*( [A-Za-z]+)* Error: ")   # DuckDB's messages bring their own

HELP_TAIL = """\
Statements end with ';' and may span lines. Tab completes keywords, layers, sets, functions and
columns; Ctrl-R searches the history; Ctrl-C cancels the input or the running statement; Ctrl-D
leaves."""


class ExitShell(Exception):
    """`.exit` was run (from the prompt, a script or a .read file): leave with this code."""

    def __init__(self, code: int = 0):
        super().__init__(code)
        self.code = code


class Shell:
    def __init__(self, store: str = ":memory:", read_only: bool = False, mode: str = "box",
                 max_rows: int = 40, out=None, err=None, bail: bool = False, trusted_factories=()):
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.trusted_factories = list(trusted_factories)   # --model: trusted for every store this session opens
        self.con = self._connect(store, read_only)
        self.store_name = store
        self.mode, self.max_rows, self.timer, self.bail = mode, max_rows, False, bail

    def __enter__(self) -> "Shell":
        return self

    def __exit__(self, *exc) -> None:
        self.con.close()

    def _connect(self, store: str, read_only: bool):
        from metaql.connection import connect   # lazily: torch loads only when a store opens
        con = connect(store, read_only=read_only, config={"trusted_factories": self.trusted_factories})
        if self.err.isatty():   # a bar in a file or a pipe would only be noise
            con.progress = self._progress_bar
        return con

    def _progress_bar(self, iterable, total=None, desc=""):
        """tqdm on stderr, drawn only after a loop has run for a second: quick statements stay quiet,
        and the bar is erased when the loop ends."""
        from tqdm import tqdm
        return tqdm(iterable, total=total, desc=desc, file=self.err, leave=False, delay=1.0)

    # ---- running text ------------------------------------------------------------------------------
    def run_script(self, text: str) -> int:
        """Runs statements and dot commands in order: 0, or 1 when one failed (the rest is skipped
        under `.bail on`). Interrupts and `.exit` propagate to the caller."""
        failed = False
        for part in script_parts(text):
            ok = self.run_dot(part) if part.startswith(".") else self.run_statement(part)
            if not ok:
                failed = True
                if self.bail:
                    break
        return int(failed)

    def run_statement(self, text: str) -> bool:
        """Runs one statement and prints its result, or its error; False when it failed."""
        start = _clock()
        try:
            self.con.execute(text)
        except InterruptException:
            raise
        except Error as e:
            self.print_error(e)
            return False
        except Exception as e:  # a bug in a user's table function must not end the session
            print(f"Error: {type(e).__name__}: {e}", file=self.err)
            return False
        self.print_result(self.con.arrow())
        if self.timer:
            print(run_time(start), file=self.out)
        return True

    def print_result(self, table) -> None:
        if self.mode == "box" and table.column_names == ["status"] and table.num_rows == 1:
            print(table.column(0)[0].as_py(), file=self.out)   # CREATE SET and the like: one message
        else:
            print(render(table, self.mode, self.max_rows, self._width()), file=self.out)

    def _width(self) -> int | None:
        """The terminal's width when printing to one (boxes are narrowed to it), else no limit."""
        return shutil.get_terminal_size().columns if self.out.isatty() else None

    def print_error(self, e: Exception) -> None:
        print(error_text(e), file=self.err)

    # ---- dot commands ------------------------------------------------------------------------------------
    def run_dot(self, line: str) -> bool:
        """Runs one dot command; False when it failed."""
        try:
            name, *args = shlex.split(line)   # quotes allow paths with spaces
        except ValueError as e:
            print(f"Error: {e} in {line}", file=self.err)
            return False
        name = _ALIASES.get(name.lower(), name.lower())
        if name in _SHOW:
            return self.run_statement(_SHOW[name])
        if name not in DOT_COMMANDS:
            near = difflib.get_close_matches(name, list(DOT_COMMANDS), n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            print(f"Error: unknown command {name}{hint}; .help lists the commands", file=self.err)
            return False
        return getattr(self, "_dot_" + name[1:])(args)

    def _usage(self, name: str) -> bool:
        print(f"Error: usage: {name} {DOT_COMMANDS[name][0]}".rstrip(), file=self.err)
        return False

    def _say(self, text: str) -> bool:
        print(text, file=self.out)
        return True

    def _dot_help(self, args) -> bool:
        return self._say(dot_help() + "\n\n" + HELP_TAIL)

    def _dot_mode(self, args) -> bool:
        if not args:
            return self._say(self.mode)
        if args[0] not in MODES:
            return self._usage(".mode")
        self.mode = args[0]
        return True

    def _dot_maxrows(self, args) -> bool:
        if not args:
            return self._say(str(self.max_rows))
        if not args[0].isdigit():
            return self._usage(".maxrows")
        self.max_rows = int(args[0])
        return True

    def _dot_timer(self, args) -> bool:
        return self._switch(".timer", "timer", args)

    def _dot_bail(self, args) -> bool:
        return self._switch(".bail", "bail", args)

    def _switch(self, name: str, attribute: str, args) -> bool:
        if not args:
            return self._say("on" if getattr(self, attribute) else "off")
        if args[0].lower() not in ("on", "off"):
            return self._usage(name)
        setattr(self, attribute, args[0].lower() == "on")
        return True

    def _dot_read(self, args) -> bool:
        if len(args) != 1:
            return self._usage(".read")
        try:
            text = Path(args[0]).expanduser().read_text()
        except OSError as e:
            print(f"IO Error: cannot read {args[0]}: {e.strerror}", file=self.err)
            return False
        return self.run_script(text) == 0

    def _dot_open(self, args) -> bool:
        read_only = "--readonly" in args
        stores = [a for a in args if a != "--readonly"]
        if len(stores) != 1:
            return self._usage(".open")
        try:
            con = self._connect(stores[0], read_only)
        except (Error, OSError) as e:   # a bad path must not end the session
            self.print_error(e)
            return False
        self.con.close()
        self.con, self.store_name = con, stores[0]
        return True

    def _dot_exit(self, args) -> bool:
        if args and not args[0].isdigit():
            return self._usage(".exit")
        raise ExitShell(int(args[0]) if args else 0)

    # ---- interactive ---------------------------------------------------------------------------------------
    def interactive(self) -> int:
        """The prompt loop; returns the exit code (Ctrl-D: 0)."""
        import metaql
        session = self._prompt_session()
        where = "a transient in-memory store" if self.store_name == ":memory:" else self.store_name
        print(f"MetaQL {metaql.__version__}, connected to {where}.\nEnter \".help\" for usage hints.",
              file=self.out)
        while True:
            try:
                text = session.prompt(PROMPT)
            except KeyboardInterrupt:   # Ctrl-C at the prompt drops the input, as in any shell
                continue
            except EOFError:
                return 0
            try:
                self.run_script(text)
            except (KeyboardInterrupt, InterruptException):
                print("Interrupted", file=self.err)
            except ExitShell as e:
                return e.code

    def _prompt_session(self):
        from prompt_toolkit import PromptSession

        from metaql.completion import MetaQLCompleter, lexer
        return PromptSession(history=self._history(), completer=MetaQLCompleter(self),
                             lexer=lexer(), multiline=True, key_bindings=_key_bindings(),
                             prompt_continuation=_continuation, complete_while_typing=False,
                             enable_history_search=True, search_ignore_case=True)

    def _history(self):
        """The history file ($METAQL_HISTORY, else ~/.metaql_history); kept in memory only when the
        file cannot be written, since a failed write would end the prompt."""
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        path = history_path()
        try:
            path.open("a").close()
        except OSError as e:
            print(f"Warning: history kept for this session only: cannot write {path}: {e.strerror}",
                  file=self.err)
            return InMemoryHistory()
        return FileHistory(str(path))


def dot_help(indent: str = "") -> str:
    """The dot commands, one a line: usage, then what it does."""
    width = max(len(f"{n} {a}") for n, (a, _) in DOT_COMMANDS.items())
    return "\n".join(indent + f"{n} {a}".ljust(width + 2) + what for n, (a, what) in DOT_COMMANDS.items())


def _key_bindings():
    """Enter runs the input once it is whole, else starts the statement's next line."""
    from prompt_toolkit.enums import DEFAULT_BUFFER
    from prompt_toolkit.filters import completion_is_selected, has_focus
    from prompt_toolkit.key_binding import KeyBindings
    bindings = KeyBindings()
    editing = has_focus(DEFAULT_BUFFER)    # not while Ctrl-R searches: Enter there ends the search

    @bindings.add("enter", filter=editing & completion_is_selected)
    def _keep_completion(event):
        event.current_buffer.complete_state = None

    @bindings.add("enter", filter=editing & ~completion_is_selected)
    def _run_or_continue(event):
        buffer = event.current_buffer
        if input_is_whole(buffer.text):
            buffer.validate_and_handle()
        else:
            buffer.insert_text("\n")
    return bindings


def input_is_whole(text: str) -> bool:
    """Statements run once a ';' ends them; a dot command (or nothing) runs at once."""
    return not text.strip() or text.lstrip().startswith(".") or is_complete(text)


def history_path() -> Path:
    return Path(os.environ.get("METAQL_HISTORY") or Path.home() / ".metaql_history").expanduser()


def _continuation(width: int, line_number: int, is_soft_wrap: bool) -> str:
    return "·> ".rjust(width)


def script_parts(text: str) -> list[str]:
    """Dot commands (a line each, starting a statement) and statements (without ';'), in order."""
    parts, pending = [], []
    for line in text.splitlines():
        if not split_statements("\n".join(pending)) and line.strip().startswith("."):
            parts.append(line.strip())
            pending = []     # only comments were pending
        else:
            pending.append(line)
            if is_complete("\n".join(pending)):
                parts.extend(_statements("\n".join(pending)))
                pending = []
    return parts + _statements("\n".join(pending))


def _statements(text: str) -> list[str]:
    # Leading comment lines go: the parser tells MetaQL statements from SQL by their first word.
    return [re.sub(r"^(\s*--[^\n]*\n)*", "", s).strip() for s in split_statements(text)]


def error_text(e: BaseException) -> str:
    """'Parser Error: ...', 'Binder Error: ...' as DuckDB prints them (parse errors keep their caret)."""
    text = str(e) or type(e).__name__
    if _LABELLED.match(text):
        return text
    label = next((label for cls, label in _ERROR_LABELS if isinstance(e, cls)), "Error")
    return f"{label}: {text}"


def _clock() -> tuple[float, float, float]:
    t = os.times()
    return time.perf_counter(), t.user, t.system


def run_time(start: tuple[float, float, float]) -> str:
    """DuckDB's timer line: wall-clock, user and system seconds since `start` (a _clock())."""
    real, user, system = (now - then for now, then in zip(_clock(), start))
    return f"Run Time (s): real {real:.3f} user {user:.6f} sys {system:.6f}"
