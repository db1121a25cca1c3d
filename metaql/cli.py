"""The `metaql` command: the shell, one-shot statements, scripts, and the demo (see `metaql --help`).

Its options are DuckDB's (`-csv`, `-json`, `-line`, `-readonly`, `-c`, `-header`, ...; one dash or
two) and act in the order given, as DuckDB's do: `metaql S -csv -c "SELECT 1" -json -c "SELECT 2"`
prints csv, then json. Arguments after the store are statements (or dot commands), run last."""
from __future__ import annotations

import argparse
import difflib
import sys

import metaql
from metaql.format import MODES

EXAMPLES = """\
examples:
  metaql runs/digits.mq                        the interactive shell on a store
  metaql runs/digits.mq "SHOW LAYERS"          run a statement, print the result, exit
  metaql runs/digits.mq -c "SHOW LAYERS;"      the same (-c may be given several times)
  metaql runs/digits.mq -csv < q.sql           statements (and dot commands) from standard input
  metaql runs/x.mq --model mypkg.nets:Net      trust the store's model factory mypkg.nets:Net to replay
  metaql demo [STORE] [--epochs N] [--force]   build a demo store from scikit-learn's digits, query it
  metaql serve STORE [--port N] [--readonly]   the web page: query, review suspects, label (extra 'web')

a statement:
  SELECT TOPK(50) train FROM INFLUENCE(layers=[fc1, fc2], query=batch(test_wrong)) ORDER BY ASC;

options take one dash or two (-csv, --csv) and act in the order given.

exit status: 0; 1 when a statement or dot command fails (with -c, statements given as arguments and
scripts the rest is skipped, as after ".bail on") or an option is wrong; 130 when interrupted (Ctrl-C).

dot commands (at the prompt or in a script, one a line):
{dots}"""

INTERRUPTED = 130    # the shells' code for a run ended by SIGINT

# Settings an option makes, applied to the shell in the order given: (attribute, value).
_MODE_FLAGS = {mode: ("mode", mode) for mode in MODES}
_SWITCHES = {"header": ("headers", True), "noheader": ("headers", False), "echo": ("echo", True),
             "bail": ("bail", True)}


class _Step(argparse.Action):
    """Records the option in `namespace.steps`, keeping the order the options were given in."""

    def __call__(self, parser, namespace, values, option_string=None):
        steps = list(getattr(namespace, "steps", None) or [])
        steps.append((self.dest, values if self.nargs != 0 else self.const))
        namespace.steps = steps


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """A wrong option is told DuckDB's way, with the nearest option, and exits with 1."""
        unknown = message.split(": ", 1)[1].split()[0] if message.startswith("unrecognized") else None
        options = [s for a in self._actions for s in a.option_strings]
        near = difflib.get_close_matches(unknown, options, n=1) if unknown else []
        hint = f" (did you mean {near[0]}?)" if near else ""
        self.exit(1, f"Error: {message}{hint}\nRun 'metaql --help' for the options.\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from metaql.demo import main as demo_main
        return demo_main(argv[1:])
    if argv and argv[0] == "serve":
        return serve_main(argv[1:])
    parser = _arg_parser()
    _refuse_glued_options(parser, argv)
    args = parser.parse_intermixed_args(argv)
    from metaql.errors import InterruptException
    from metaql.shell import ExitShell, Shell, error_text
    steps = list(getattr(args, "steps", None) or [])
    one_shot = bool(args.sql) or any(kind in ("command", "file") for kind, _ in steps)
    try:
        shell = Shell(args.store, read_only=args.readonly, mode="box", max_rows=40,
                      bail=one_shot or not sys.stdin.isatty(), trusted_factories=args.model)
    except Exception as e:  # a store that cannot open: say why, exit non-zero
        print(error_text(e), file=sys.stderr)
        return 1
    with shell:
        try:
            return _run(shell, steps, args.sql, one_shot)
        except ExitShell as e:
            return e.code
        except (KeyboardInterrupt, InterruptException):   # Ctrl-C in a script (the prompt handles its own)
            print("Interrupted", file=sys.stderr)
            return INTERRUPTED


def serve_main(argv: list[str]) -> int:
    """`metaql serve STORE [--port N] [--host H] [--readonly] [--token T]`: the local web page."""
    p = argparse.ArgumentParser(prog="metaql serve", description="The local web page over a store: a MetaQL "
                                "console, a review grid for suspected mislabels, a LANCET labeling session.")
    p.add_argument("store", help="store directory (metaql demo builds one)")
    p.add_argument("--port", type=int, default=8765, help="port (default: 8765)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; any other needs --token)")
    p.add_argument("--readonly", action="store_true", help="open the store read-only: every write is refused")
    p.add_argument("--token", default=None, help="require this token on every request (open URL?token=T once)")
    p.add_argument("--user", default=None, help="the default reviewer name written to labeled_by")
    args = p.parse_args(argv)
    try:
        from metaql.web import serve
    except ImportError as e:
        print(f"Error: metaql serve needs the extra 'web' ({e.name} is missing): pip install 'metaql[web]'",
              file=sys.stderr)
        return 1
    from metaql.errors import Error
    try:
        serve(args.store, host=args.host, port=args.port, readonly=args.readonly, token=args.token, user=args.user)
    except Error as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return INTERRUPTED
    return 0


def _refuse_glued_options(parser: _Parser, argv: list[str]) -> None:
    """argparse would read `-cvs` as `-c vs`; an unknown word after one dash is a wrong option, as
    in DuckDB (a value after an option that takes one is left alone)."""
    takes_value = {s for a in parser._actions if a.option_strings and a.nargs != 0 for s in a.option_strings}
    for before, arg in zip([None] + argv, argv):
        if (arg.startswith("-") and not arg.startswith("--") and len(arg) > 2 and " " not in arg
                and arg not in parser._option_string_actions and before not in takes_value):
            parser.error(f"unrecognized arguments: {arg}")


def _run(shell, steps: list, statements: list[str], one_shot: bool) -> int:
    """The options in order (settings, -c, -cmd, -f), then the statements given as arguments; then,
    unless one of those ran something, standard input or the prompt. The first failure of -c, -f
    or a statement argument ends the run with 1, as in DuckDB."""
    for kind, value in steps:
        if kind == "setting":
            setattr(shell, *value)
        elif kind in ("command", "cmd", "file"):
            text = value if kind != "file" else _file_text(value)
            if text is None or shell.run_script(text) != 0:
                if kind != "cmd" or shell.bail:
                    return 1
    for statement in statements:     # needs no ';': `metaql S "SELECT 1"`
        if shell.run_script(statement) != 0:
            return 1
    if one_shot:
        return 0
    return shell.interactive() if sys.stdin.isatty() else shell.run_script(sys.stdin.read())


def _file_text(name: str) -> str | None:
    try:
        with open(name) as f:
            return f.read()
    except OSError as e:
        print(f"IO Error: cannot read {name}: {e.strerror}", file=sys.stderr)
        return None


def _arg_parser() -> argparse.ArgumentParser:
    from metaql.shell import dot_help
    p = _Parser(
        prog="metaql", formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False, add_help=False,
        usage="metaql [OPTIONS] [STORE [SQL ...]]",
        description="MetaQL: query the gradients of your training data. Without -c, -f or statements "
                    "after the store, and with a terminal on standard input, opens the interactive "
                    "shell (statements end with ';').",
        epilog=EXAMPLES.format(dots=dot_help(indent="  ")))
    p.add_argument("-h", "-help", "--help", action="help", help="show this help and exit")
    p.add_argument("store", nargs="?", default=":memory:",
                   help="store directory, created if missing (default: :memory:, a throwaway store)")
    p.add_argument("sql", nargs="*", metavar="SQL",
                   help="statements or dot commands to run after the options, then exit")
    p.add_argument("-c", "--command", "-s", dest="command", action=_Step, metavar="STATEMENTS",
                   help="run these statements and dot commands, then exit (repeatable)")
    p.add_argument("-cmd", "--cmd", dest="cmd", action=_Step, metavar="STATEMENTS",
                   help="run these before reading standard input or opening the prompt")
    p.add_argument("-f", "--file", dest="file", action=_Step, metavar="FILE",
                   help="run the statements and dot commands in FILE, then exit")
    p.add_argument("-readonly", "--readonly", action="store_true", help="open the store read-only")
    p.add_argument("--model", "-model", action="append", default=[], metavar="PKG.MOD:FACTORY",
                   help="trust this model factory for the session, so queries that replay samples may "
                        "import and call it to rebuild a store's model (repeatable; a store alone never "
                        "makes MetaQL run the code it names)")
    p.add_argument("--mode", "-mode", dest="setting", action=_Step, metavar="MODE",
                   type=_mode, help=f"output mode: {', '.join(MODES)} (default: box); -csv, -json, "
                                    "-line and the others are short for --mode csv, ...")
    for mode in MODES:
        p.add_argument(f"-{mode}", f"--{mode}", dest="setting", action=_Step, nargs=0, const=("mode", mode),
                       help=argparse.SUPPRESS)
    for name, (attribute, value) in _SWITCHES.items():
        p.add_argument(f"-{name}", f"--{name}", dest="setting", action=_Step, nargs=0, const=(attribute, value),
                       help={"header": "column names in csv, list and tabs output (the default)",
                             "noheader": "no column names in csv, list and tabs output",
                             "echo": "print each statement before running it",
                             "bail": "stop at the first error"}[name])
    p.add_argument("-nullvalue", "--nullvalue", dest="setting", action=_Step, metavar="TEXT",
                   type=lambda t: ("nullvalue", t), help="print NULL as TEXT (default: NULL; empty in csv)")
    p.add_argument("-separator", "--separator", dest="setting", action=_Step, metavar="SEP",
                   type=lambda t: ("separator", t), help="column separator of list and csv output")
    p.add_argument("--maxrows", "-maxrows", dest="setting", action=_Step, metavar="N",
                   type=lambda n: ("max_rows", _count(n)),
                   help="rows a box shows, the middle ones elided (default: 40; 0: all)")
    p.add_argument("--maxwidth", "-maxwidth", dest="setting", action=_Step, metavar="N",
                   type=lambda n: ("max_width", _count(n)),
                   help="width a box may take (default 0: the terminal's)")
    p.add_argument("-version", "--version", action="version", version=f"metaql {metaql.__version__}")
    return p


def _mode(text: str) -> tuple[str, str]:
    if text not in MODES:
        raise argparse.ArgumentTypeError(f"unknown mode {text!r}; the modes are {', '.join(MODES)}")
    return ("mode", text)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a count (0, 1, 2, ...), not {text!r}")
    return int(text)


if __name__ == "__main__":
    sys.exit(main())
