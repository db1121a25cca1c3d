"""The `metaql` command: the shell, one-shot statements, and the demo.

    metaql [STORE]                 interactive shell (STORE: a directory; default :memory:)
    metaql STORE -c "STATEMENT;"   run statements, print the results, exit 1 on the first error
    metaql STORE < script.sql      run statements from standard input
    metaql demo [STORE]            the end-to-end demo on scikit-learn's digits
"""
from __future__ import annotations

import argparse
import sys

from metaql.format import MODES


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from metaql.demo import main as demo_main
        return demo_main(argv[1:])
    args = _arg_parser().parse_args(argv)
    from metaql.shell import Shell
    try:
        shell = Shell(args.store, read_only=args.readonly, mode=args.mode, max_rows=args.maxrows)
    except Exception as e:  # a store that cannot open: say why, exit non-zero
        print(f"Error: {e}", file=sys.stderr)
        return 1
    with shell:
        if args.command is not None:
            return shell.run_script(args.command, bail=True)
        if not sys.stdin.isatty():
            return shell.run_script(sys.stdin.read(), bail=True)
        return shell.interactive()


def _arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="metaql", description="MetaQL: query the gradients of your training data.",
        epilog="Run 'metaql demo [STORE]' for the end-to-end demo on scikit-learn's digits.")
    p.add_argument("store", nargs="?", default=":memory:", help="store directory (default: :memory:)")
    p.add_argument("-c", "--command", help="run these statements and exit (exit code 1 on the first error)")
    p.add_argument("--readonly", action="store_true", help="open the store read-only")
    p.add_argument("--mode", choices=MODES, default="box", help="output mode (default: box)")
    p.add_argument("--maxrows", type=int, default=40, help="rows shown per result in box mode")
    return p


if __name__ == "__main__":
    sys.exit(main())
