"""The `metaql` command: the shell, one-shot statements, scripts, and the demo (see `metaql --help`)."""
from __future__ import annotations

import argparse
import sys

import metaql
from metaql.format import MODES

EXAMPLES = """\
examples:
  metaql runs/digits.mq                        the interactive shell on a store
  metaql runs/digits.mq -c "SHOW LAYERS;"      run statements, print the results, exit
  metaql runs/digits.mq --mode csv < q.sql     statements (and dot commands) from standard input
  metaql runs/x.mq --model mypkg.nets:Net      trust the store's model factory mypkg.nets:Net to replay
  metaql demo [STORE] [--epochs N] [--force]   build a demo store from scikit-learn's digits, query it

a statement:
  SELECT TOPK(50) train FROM INFLUENCE(layers=[fc1, fc2], query=batch(test_wrong)) ORDER BY ASC;

exit status: 0; 1 when a statement or dot command fails (with -c and scripts the rest is skipped,
as after ".bail on"); 130 when interrupted (Ctrl-C).

dot commands (at the prompt or in a script, one a line):
{dots}"""

INTERRUPTED = 130    # the shells' code for a run ended by SIGINT


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from metaql.demo import main as demo_main
        return demo_main(argv[1:])
    args = _arg_parser().parse_args(argv)
    from metaql.engine.errors import InterruptException
    from metaql.shell import ExitShell, Shell, error_text
    script = _script(args)
    try:
        shell = Shell(args.store, read_only=args.readonly, mode=args.mode, max_rows=args.maxrows,
                      bail=script is not None, trusted_factories=args.model)
    except Exception as e:  # a store that cannot open: say why, exit non-zero
        print(error_text(e), file=sys.stderr)
        return 1
    with shell:
        try:
            return shell.interactive() if script is None else shell.run_script(script)
        except ExitShell as e:
            return e.code
        except (KeyboardInterrupt, InterruptException):   # Ctrl-C in a script (the prompt handles its own)
            print("Interrupted", file=sys.stderr)
            return INTERRUPTED


def _script(args) -> str | None:
    """The statements to run without a prompt: -c's, else standard input's unless it is a terminal."""
    if args.command is not None:
        return args.command
    return None if sys.stdin.isatty() else sys.stdin.read()


def _arg_parser() -> argparse.ArgumentParser:
    from metaql.shell import dot_help
    p = argparse.ArgumentParser(
        prog="metaql", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="MetaQL: query the gradients of your training data. Without -c and with a terminal "
                    "on standard input, opens the interactive shell (statements end with ';').",
        epilog=EXAMPLES.format(dots=dot_help(indent="  ")))
    p.add_argument("store", nargs="?", default=":memory:",
                   help="store directory, created if missing (default: :memory:, a throwaway store)")
    p.add_argument("-c", "--command", metavar="STATEMENTS",
                   help="run these statements and dot commands, then exit")
    p.add_argument("--readonly", action="store_true", help="open the store read-only")
    p.add_argument("--model", action="append", default=[], metavar="PKG.MOD:FACTORY",
                   help="trust this model factory for the session, so queries that replay samples may "
                        "import and call it to rebuild a store's model (repeatable; a store alone never "
                        "makes MetaQL run the code it names)")
    p.add_argument("--mode", choices=MODES, default="box", help="output mode (default: box)")
    p.add_argument("--maxrows", type=int, default=40, metavar="N",
                   help="rows a box shows, the middle ones elided (default: 40; 0: all)")
    p.add_argument("--version", action="version", version=f"metaql {metaql.__version__}")
    return p


if __name__ == "__main__":
    sys.exit(main())
