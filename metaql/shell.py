"""The shell, after DuckDB's: statements end with ';' (and may span lines), dot commands, boxed
tables, a timer, history, completion. Runs scripts (-c, standard input, .read) the same way."""
from __future__ import annotations

import difflib
import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

from metaql.errors import (BinderException, CatalogException, Error, InternalException,
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
    ".schema": ("[PATTERN]", "CREATE statements of the tables, views and sets (LIKE or GLOB PATTERN)"),
    ".mode": ("[" + "|".join(MODES) + "]", "set the output mode, or show it"),
    ".headers": ("[on|off]", "column names in csv, list and tabs output"),
    ".nullvalue": ("[TEXT]", "print NULL as TEXT (default: NULL; empty in csv); or show it"),
    ".separator": ("[SEP]", "column separator of list and csv (default: | and ,); or show it"),
    ".maxrows": ("[N]", "rows a box shows, the middle ones elided (0: all); or show it"),
    ".maxwidth": ("[N]", "width a box may take (0: the terminal's); or show it"),
    ".output": ("[FILE|'|CMD']", "send results to FILE (not inside the store) or CMD, or back to the screen"),
    ".once": ("FILE|'|CMD'", "send the next statement's result to FILE or CMD"),
    ".echo": ("[on|off]", "print each statement and dot command before running it"),
    ".print": ("TEXT...", "print TEXT"),
    ".shell": ("CMD [ARGS...]", "run CMD in a system shell (.system too)"),
    ".timer": ("[on|off]", "print each statement's run time"),
    ".bail": ("[on|off]", "stop at the first error (on for -c and scripts, off at the prompt)"),
    ".read": ("FILE", "run the statements and dot commands in FILE"),
    ".open": ("[--readonly] STORE", "close this store and open STORE"),
    ".exit": ("[CODE]", "leave the shell (Ctrl-D does too)"),
}
_ALIASES = {".quit": ".exit", ".q": ".exit", ".system": ".shell", ".header": ".headers"}
_SHOW = {".tables": "SHOW TABLES", ".layers": "SHOW LAYERS", ".sets": "SHOW SETS",
         ".checkpoints": "SHOW CHECKPOINTS", ".functions": "SHOW FUNCTIONS"}

# Most specific first: DuckDB's labels for the kinds of error.
_ERROR_LABELS = [(ParserException, "Parser Error"), (BinderException, "Binder Error"),
                 (CatalogException, "Catalog Error"), (InvalidInputException, "Invalid Input Error"),
                 (IOException, "IO Error"), (InternalException, "INTERNAL Error"), (Error, "Error")]
_LABELLED = re.compile(r"^[A-Z][A-Za-z]*( [A-Za-z]+)* Error: ")   # DuckDB's messages bring their own

MAX_READ_DEPTH = 25     # .read inside .read: deeper than any real chain of included scripts

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
        self.con = self._with_clean_warnings(lambda: self._connect(store, read_only))
        self.store_name = store
        self.mode, self.max_rows, self.timer, self.bail = mode, max_rows, False, bail
        self.headers, self.nullvalue, self.separator, self.max_width, self.echo = True, None, None, 0, False
        self._screen, self._once = None, 0     # while .output/.once redirect: the stream they replaced
        self._piped = None                     # the command they write into (`.output |CMD`)
        self._ctrl_c_on_empty = 0

    def __enter__(self) -> "Shell":
        return self

    def __exit__(self, *exc) -> None:
        self._end_redirect()
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
            ok = self.run_part(part)
            if not ok:
                failed = True
                if self.bail:
                    break
        return int(failed)

    def run_part(self, part: str) -> bool:
        """Runs one statement or dot command (echoed first under `.echo on`); a pending `.once`
        redirect ends after it, whatever happened."""
        if self.echo:
            print(part if part.startswith(".") else part + ";", file=self.out)
        try:
            return self.run_dot(part) if part.startswith(".") else self.run_statement(part)
        finally:
            if self._once:
                self._once -= 1
                if not self._once:
                    self._end_redirect()

    def run_statement(self, text: str) -> bool:
        """Runs one statement and prints its result, or its error; False when it failed."""
        start = _clock()
        try:
            self._with_clean_warnings(lambda: self.con.execute(text))
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

    def _with_clean_warnings(self, run):
        """run(), its Python warnings printed as one line each ('Warning: ...'), not with the file,
        line and source that Python's default display adds. The filters stay as they are (a
        library's DeprecationWarning stays hidden); entering resets which ones were already shown."""
        with warnings.catch_warnings(record=True) as caught:
            try:
                return run()
            finally:
                for message in dict.fromkeys(str(w.message) for w in caught):
                    print(f"Warning: {message}", file=self.err)

    def print_result(self, table) -> None:
        if self.mode in ("box", "duckbox") and table.column_names == ["status"] and table.num_rows == 1:
            print(table.column(0)[0].as_py(), file=self.out)   # CREATE SET and the like: one message
            return
        text = render(table, self.mode, self.max_rows, self._width(), headers=self.headers,
                      nullvalue=self.nullvalue, separator=self.separator)
        if text:
            try:
                print(text, file=self.out)
            except BrokenPipeError:    # `.output |head -1`: the command stopped reading, as it may
                pass

    def _width(self) -> int | None:
        """.maxwidth, else the terminal's width when printing to one (boxes are narrowed to it),
        else no limit."""
        if self.max_width:
            return self.max_width
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
            print(f"Error: unknown mode {args[0]}; the modes are {', '.join(MODES)}", file=self.err)
            return False
        self.mode, self.separator = args[0], None    # as in DuckDB, a mode brings its own separator
        return True

    def _dot_maxwidth(self, args) -> bool:
        if not args:
            return self._say(str(self.max_width))
        if not args[0].isdigit():
            return self._usage(".maxwidth")
        self.max_width = int(args[0])
        return True

    def _dot_headers(self, args) -> bool:
        return self._switch(".headers", "headers", args)

    def _dot_echo(self, args) -> bool:
        return self._switch(".echo", "echo", args)

    def _dot_nullvalue(self, args) -> bool:
        if not args:
            return self._say("NULL" if self.nullvalue is None else self.nullvalue)
        if len(args) != 1:
            return self._usage(".nullvalue")
        self.nullvalue = args[0]
        return True

    def _dot_separator(self, args) -> bool:
        if not args:
            return self._say(self.separator or ("," if self.mode == "csv" else "|"))
        if len(args) != 1 or not args[0]:
            return self._usage(".separator")
        self.separator = args[0].replace("\\t", "\t")    # as typed: .separator "\t"
        return True

    def _dot_print(self, args) -> bool:
        return self._say(" ".join(args))

    def _dot_shell(self, args) -> bool:
        """Runs the command as DuckDB's .shell does (an argument with a space is passed as it is,
        so `.shell "ls -l | wc -l"` is a pipeline); its output goes where results go."""
        if not args:
            return self._usage(".shell")
        command = " ".join(a if " " in a else shlex.quote(a) for a in args)
        self.out.flush()
        try:
            sink = self.out.fileno()
        except (AttributeError, OSError, ValueError):   # not a file (a test's StringIO): relay the output
            sink = None
        done = subprocess.run(command, shell=True, stdout=sink if sink is not None else subprocess.PIPE,
                              stderr=None if sink is not None else subprocess.PIPE, text=True)
        if sink is None:
            self.out.write(done.stdout)
            self.err.write(done.stderr)
        if done.returncode:
            print(f"System command returns {done.returncode}", file=self.err)
        return True

    def _dot_output(self, args) -> bool:
        if len(args) > 1:
            return self._usage(".output")
        if not args or args[0] == "stdout":
            self._end_redirect()
            return True
        return self._redirect(args[0], once=False)

    def _dot_once(self, args) -> bool:
        if len(args) != 1:
            return self._usage(".once")
        return self._redirect(args[0], once=True)

    def _redirect(self, name: str, once: bool) -> bool:
        """Results into the file `name`, or into the command after a '|' (as in DuckDB)."""
        handle = self._pipe(name[1:]) if name.startswith("|") else self._file(name)
        if handle is None:
            return False
        self._screen, self.out = self.out, handle
        self._once = 2 if once else 0     # this dot command, then the next statement
        return True

    def _file(self, name: str):
        """`name` opened for writing once the redirect before it has ended; None (said why) when it
        is inside the store or cannot be written."""
        path = Path(name).expanduser()
        inside = _store_folder_holding(self.store_name, path)
        if inside is not None:
            print(f"Error: cannot write {name}: it is inside the store {inside}, which owns its files; "
                  "write the output outside the store", file=self.err)
            return None
        try:
            handle = path.open("w")
        except OSError as e:
            print(f"IO Error: cannot write to {name}: {e.strerror}", file=self.err)
            return None
        self._end_redirect()
        return handle

    def _pipe(self, command: str):
        if not command.strip():
            print("Error: no command after '|'", file=self.err)
            return None
        self._end_redirect()
        self.out.flush()
        self._piped = subprocess.Popen(command, shell=True, stdin=subprocess.PIPE, text=True)
        return self._piped.stdin

    def _end_redirect(self) -> None:
        if self._screen is not None:
            try:
                self.out.close()
            except BrokenPipeError:    # the command did not read it all (`| head -1`)
                pass
            self.out, self._screen, self._once = self._screen, None, 0
        if self._piped is not None:
            self._piped.wait()      # its output comes before what the shell prints next
            self._piped = None

    def _dot_schema(self, args) -> bool:
        if len(args) > 1:
            return self._usage(".schema")
        try:
            lines = schema_lines(self.con, args[0] if args else None)
        except Error as e:
            self.print_error(e)
            return False
        if lines:
            self._say("\n".join(lines))
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
        depth = getattr(self, "_read_depth", 0)
        if depth >= MAX_READ_DEPTH:     # a file that reads itself would end in a RecursionError traceback
            print(f"Error: .read {args[0]}: files nested {MAX_READ_DEPTH} deep (does a file read itself?); "
                  "stopped there", file=self.err)
            return False
        try:
            text = Path(args[0]).expanduser().read_text()
        except OSError as e:
            print(f"IO Error: cannot read {args[0]}: {e.strerror}", file=self.err)
            return False
        self._read_depth = depth + 1
        try:
            return self.run_script(text) == 0
        finally:
            self._read_depth = depth

    def _dot_open(self, args) -> bool:
        read_only = "--readonly" in args
        stores = [a for a in args if a != "--readonly"]
        if len(stores) != 1:
            return self._usage(".open")
        try:
            con = self._with_clean_warnings(lambda: self._connect(stores[0], read_only))
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
                if self._ctrl_c_on_empty >= 2:    # DuckDB's hint for who tries to leave that way
                    print("Interrupted, use Ctrl+D to exit", file=self.err)
                continue
            except EOFError:
                return 0
            self._ctrl_c_on_empty = 0
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
                             lexer=lexer(), multiline=True, key_bindings=_key_bindings(self._count_ctrl_c),
                             prompt_continuation=_continuation, complete_while_typing=False,
                             enable_history_search=True, search_ignore_case=True)

    def _count_ctrl_c(self, line: str) -> None:
        """Ctrl-C pressed at the prompt on `line`: counts the presses in a row on an empty line."""
        self._ctrl_c_on_empty = self._ctrl_c_on_empty + 1 if not line else 0

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


def _store_folder_holding(store: str, path: Path) -> Path | None:
    """The store's folder when `path` lies inside it (symlinks resolved), else None."""
    if store == ":memory:":
        return None
    root = Path(store).expanduser().resolve()
    target = path.resolve()
    return root if target == root or root in target.parents else None


def schema_lines(con, pattern: str | None = None) -> list[str]:
    """The CREATE statements of the store's user-visible tables and views, and a CREATE SET per
    set (a comment for a set made from ids), names matching `pattern` (LIKE, or GLOB when it
    has * ? or [), case-insensitively, as DuckDB's .schema. MetaQL's own tables are left out."""
    from metaql.storage import catalog
    from metaql.storage.sqlguard import SCRATCH_PREFIX
    hidden = {t.lower() for t in catalog.INTERNAL_TABLES}

    def wanted(name: str) -> bool:
        if name.lower() in hidden or name.lower().startswith(SCRATCH_PREFIX):
            return False
        return pattern is None or _name_matches(name, pattern)
    objects = con.execute("SELECT table_name, sql FROM duckdb_tables() WHERE NOT internal UNION ALL "
                          "SELECT view_name, sql FROM duckdb_views() WHERE NOT internal ORDER BY 1").fetchall()
    lines = [sql for name, sql in objects if wanted(name)]
    for name, size, definition, _ in con.execute("SHOW SETS").fetchall():
        if pattern is None or _name_matches(name, pattern):
            lines.append(f"CREATE SET {name} AS {definition};" if definition
                         else f"-- set {name}: {size} samples, made from a list of ids")
    return lines


def _name_matches(name: str, pattern: str) -> bool:
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name.lower(), pattern.lower())
    regex = "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern.lower())
    return re.fullmatch(regex, name.lower(), re.S) is not None


def dot_help(indent: str = "") -> str:
    """The dot commands, one a line: usage, then what it does."""
    width = max(len(f"{n} {a}") for n, (a, _) in DOT_COMMANDS.items())
    return "\n".join(indent + f"{n} {a}".ljust(width + 2) + what for n, (a, what) in DOT_COMMANDS.items())


def _key_bindings(on_ctrl_c=None):
    """Enter runs the input once it is whole, else starts the statement's next line; Ctrl-C drops
    the input, telling `on_ctrl_c` what it dropped."""
    from prompt_toolkit.enums import DEFAULT_BUFFER
    from prompt_toolkit.filters import completion_is_selected, has_focus
    from prompt_toolkit.key_binding import KeyBindings
    bindings = KeyBindings()
    editing = has_focus(DEFAULT_BUFFER)    # not while Ctrl-R searches: Enter there ends the search

    @bindings.add("c-c", filter=editing)
    def _drop_input(event):
        if on_ctrl_c is not None:
            on_ctrl_c(event.current_buffer.text)
        event.app.exit(exception=KeyboardInterrupt, style="class:aborting")

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
