"""The exception tree, after DuckDB's: every error MetaQL raises is a `metaql.Error`.

It lives in the engine (the lowest layer that raises) so storage, engine and the face share it;
`metaql` re-exports it.
"""
from __future__ import annotations


class Error(Exception):
    """Base of every MetaQL error."""


class Warning(UserWarning):  # noqa: A001 - DB-API name
    pass


class ProgrammingError(Error):
    """The statement is wrong: syntax, names, arguments."""


class ParserException(ProgrammingError):
    """The text does not parse; carries line, column and a caret under the spot."""

    def __init__(self, message: str, line: int | None = None, column: int | None = None,
                 context: str = "") -> None:
        self.line, self.column, self.context = line, column, context
        where = f" at line {line}, column {column}" if line is not None else ""
        full = f"{message}{where}"
        if context:
            full += "\n" + context
        super().__init__(full)


class BinderException(ProgrammingError):
    """The statement parses, but a name or argument does not fit the store."""


class CatalogException(ProgrammingError):
    """A catalog object (layer, set, function, checkpoint) is missing or already exists."""


class InvalidInputException(ProgrammingError):
    """Data handed to MetaQL is unusable (NaN, wrong shape, empty set)."""


class IOException(Error):
    """A file of the store is missing, corrupt, or locked by another process."""


class InterruptException(Error):
    """The statement was cancelled (Ctrl-C); nothing it started stays behind."""


class InternalException(Error):
    """A bug in MetaQL: please report it with the statement that caused it."""
