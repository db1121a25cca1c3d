"""`python -m metaql`: the `metaql` command (the shell, one-shot statements, `demo`, `serve`), for an
environment whose scripts directory is not on PATH."""
import sys

from metaql.cli import main

sys.exit(main())
