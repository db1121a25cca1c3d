"""The exception tree: DB-API 2.0's classes with DuckDB's names underneath; every error MetaQL
raises is a `metaql.Error`.

A leaf module: it imports nothing of MetaQL, so every layer (storage, engine, the face) raises
from it without pulling in another layer. `metaql` re-exports it; `metaql.engine.errors` is kept
as an alias for code written against the old place. The tree follows DuckDB's own (duckdb 1.x/2.x
place each name under the same DB-API class), so `except metaql.DataError` catches what
`except duckdb.DataError` would.
"""
from __future__ import annotations


def user_stacklevel() -> int:
    """The `stacklevel` for warnings.warn, called in the function that warns, at which the warning
    names the first caller outside MetaQL (the user's line), however many of MetaQL's own calls
    lead there (cap.backward and cap.record reach the same warning at different depths)."""
    import sys
    frame, level = sys._getframe(1), 1
    # the standard library's wrappers MetaQL calls through (its context managers) are MetaQL's frames too
    while frame is not None and (frame.f_globals.get("__name__") or "").split(".")[0] in _OWN_FRAMES:
        frame, level = frame.f_back, level + 1
    return level


_OWN_FRAMES = {"metaql", "contextlib", "functools"}


class Error(Exception):
    """Base of every MetaQL error (DB-API 2.0's Error)."""


class Warning(UserWarning):  # noqa: A001 - DB-API name
    """What MetaQL warns about (a checkpoint left out, a result not saved)."""


class InterfaceError(Error):
    """The Python interface was misused (DB-API 2.0)."""


class DatabaseError(Error):
    """An error of the store or of a statement run on it (DB-API 2.0)."""


class DataError(DatabaseError):
    """A value does not fit: a conversion failed, a number is out of range (DB-API 2.0)."""


class OperationalError(DatabaseError):
    """The store cannot do it now: a file, a lock, memory, a transaction (DB-API 2.0)."""


class IntegrityError(DatabaseError):
    """A constraint of the catalog would break: a duplicate key, a missing reference (DB-API 2.0)."""


class InternalError(DatabaseError):
    """The engine reached a state it should not (DB-API 2.0)."""


class ProgrammingError(DatabaseError):
    """The statement is wrong: syntax, names, arguments."""


class NotSupportedError(DatabaseError):
    """The statement asks for something MetaQL or DuckDB does not do (DB-API 2.0)."""


# ---- DuckDB's names ------------------------------------------------------------------------------
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
    """Data handed to MetaQL is unusable (NaN, wrong shape, empty set). Under ProgrammingError,
    where DuckDB puts its InvalidInputException."""


class InvalidTypeException(BinderException):
    """A value of the wrong type reached a statement."""


# Below, a class with two bases keeps `except InvalidInputException` (or BinderException,
# ProgrammingError) catching what it caught before these classes existed.
class ConversionException(DataError, InvalidInputException):
    """A value cannot be converted to the type asked for."""


class OutOfRangeException(DataError, InvalidInputException):
    """A value lies outside its type's range."""


class TypeMismatchException(DataError, BinderException):
    """Two types that do not go together (a comparison, an insert)."""


class ConstraintException(IntegrityError, InvalidInputException):
    """A catalog constraint would break (a duplicate sample id, a NULL where none may be)."""


class IOException(OperationalError):
    """A file of the store is missing, corrupt, or locked by another process."""


class PermissionException(IOException):
    """The store or the statement is not allowed to do this (read-only, a guarded path)."""


class OutOfMemoryException(IOException):
    """The statement ran out of memory."""


class SerializationException(IOException):
    """A value could not be written or read back."""


class TransactionException(OperationalError, ProgrammingError):
    """A transaction conflict or misuse (a BEGIN left open, a concurrent write)."""


class InterruptException(DatabaseError):
    """The statement was cancelled (Ctrl-C); nothing it started stays behind."""


class NotImplementedException(NotSupportedError, ProgrammingError):
    """A feature MetaQL or DuckDB does not implement."""


class InternalException(InternalError):
    """A bug in MetaQL: please report it with the statement that caused it."""


class FatalException(InternalException):
    """The database cannot go on (DuckDB's fatal error): reopen the store."""


# DuckDB's exception class name -> MetaQL's class, most specific first: a DuckDB error raised by
# the catalog or by the user's SQL becomes the class of the same name (by name, so this module
# needs no DuckDB import).
DUCKDB_NAMES: list[tuple[str, type]] = [
    ("ParserException", ParserException), ("SyntaxException", ParserException),
    ("CatalogException", CatalogException), ("BinderException", BinderException),
    ("PermissionException", PermissionException), ("OutOfMemoryException", OutOfMemoryException),
    ("SerializationException", SerializationException), ("IOException", IOException),
    ("InterruptException", InterruptException), ("ConversionException", ConversionException),
    ("OutOfRangeException", OutOfRangeException), ("InvalidInputException", InvalidInputException),
    ("TypeMismatchException", TypeMismatchException), ("ConstraintException", ConstraintException),
    ("InvalidTypeException", InvalidTypeException), ("NotImplementedException", NotImplementedException),
    ("TransactionException", TransactionException), ("FatalException", FatalException),
    ("InternalException", InternalException),
    # DB-API classes DuckDB raises directly
    ("IntegrityError", IntegrityError), ("DataError", DataError), ("NotSupportedError", NotSupportedError),
    ("OperationalError", OperationalError), ("InternalError", InternalError),
]

__all__ = ["Error", "Warning", "InterfaceError", "DatabaseError", "DataError", "OperationalError",
           "IntegrityError", "InternalError", "ProgrammingError", "NotSupportedError"] + \
          [cls.__name__ for _, cls in DUCKDB_NAMES if cls.__name__ not in
           ("IntegrityError", "DataError", "NotSupportedError", "OperationalError", "InternalError")]
__all__ = list(dict.fromkeys(__all__))
