"""The table-function registry: every `FROM NAME(...)` of the language resolves here.

A table function is a plain Python function whose first parameter is the execution context and
whose other parameters are keyword arguments with type hints; it returns a `pyarrow.Table`.
The hints drive argument checking, `DESCRIBE name` and completion in the shell, so a user can
extend the language from Python with `con.register_function(fn)`.
"""
from __future__ import annotations

import difflib
import inspect
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from metaql.errors import BinderException, CatalogException, InvalidInputException


class SetName(str):
    """A type hint: the argument names a sample set (`train`, `test`, a CREATE SET name, ...)."""


class ColumnName(str):
    """A type hint: the argument names a column of the `samples` table ('' for none)."""


class LayerList(list):
    """A type hint: a list of layer names, or `*` for every layer."""


class CheckpointList(list):
    """A type hint: `all`, `last`, one checkpoint name, or a list of names."""


@dataclass(frozen=True)
class SampleRef:
    """A type hint and value: `point(id)` (one sample) or `batch(set)` (a named set or split)."""
    mode: str          # "point" | "batch"
    value: Any

    def __str__(self) -> str:
        return f"{self.mode}({self.value})"


@dataclass(frozen=True)
class Range:
    """The values a numeric argument accepts, as `typing.Annotated[int, Range(1, 100_000)]`:
    bounds included unless `open_low`/`open_high`; None leaves that side unbounded. The binder
    checks it before the function runs (so no statement asks for 2**63 epochs) and DESCRIBE
    shows it."""
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.open_high and value == self.high)))

    def __str__(self) -> str:
        low = "-inf" if self.low is None else _number(self.low)
        high = "inf" if self.high is None else _number(self.high)
        return f"{'(' if self.open_low or self.low is None else '['}{low}, {high}" \
               f"{')' if self.open_high or self.high is None else ']'}"


def _number(x: float) -> str:
    return f"{x:_}" if isinstance(x, int) else f"{x:g}"


INT64 = Range(-2 ** 63, 2 ** 63 - 1)    # every int argument, ranged or not: DuckDB's BIGINT


@dataclass
class Param:
    name: str
    hint: Any
    default: Any = inspect.Parameter.empty
    range: Range | None = None

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty

    @property
    def type_name(self) -> str:
        if typing.get_origin(self.hint) is typing.Literal:
            return "|".join(map(str, typing.get_args(self.hint)))
        name = getattr(self.hint, "__name__", str(self.hint))
        return name if self.range is None else f"{name} in {self.range}"

    @property
    def default_text(self) -> str:
        """The default as it is written in a statement: layers=* (not ('*',)), total=false (not
        False), [a, b] for a list; a default of None (nothing given) is `(none)`."""
        return sql_value(self.default)

    def describe(self) -> str:
        return self.type_name if self.required else f"{self.type_name} = {self.default_text}"


def sql_value(value: Any) -> str:
    """A Python default as MetaQL's syntax writes it."""
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "*" if list(value) == ["*"] else "[" + ", ".join(map(sql_value, value)) + "]"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(value)


@dataclass
class TableFunction:
    name: str
    fn: Callable[..., Any]
    params: dict[str, Param]
    columns: list[tuple[str, str]] = field(default_factory=list)
    doc: str = ""
    # builds a logical plan node instead of running `fn` directly (INFLUENCE: EXPLAIN, optimizer)
    logical: Callable[..., Any] | None = None
    # other results an argument selects (INFLUENCE's total=true): each a list like `columns`
    alternatives: list = field(default_factory=list)
    # lines EXPLAIN shows under the call: explain(ctx, **arguments) -> list[str] (how it will answer)
    explain: Callable[..., list[str]] | None = None

    def check_arguments(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Returns the call's keyword arguments with defaults filled in; raises on unknown/missing."""
        for key in kwargs:
            if key not in self.params:
                hint = difflib.get_close_matches(key, list(self.params), n=1)
                extra = f" Did you mean '{hint[0]}'?" if hint else ""
                raise BinderException(
                    f"{self.name}() has no argument '{key}'.{extra} "
                    f"Arguments: {', '.join(self.params) or '(none)'}"
                )
        missing = [p.name for p in self.params.values() if p.required and p.name not in kwargs]
        if missing:
            raise BinderException(
                f"{self.name}() needs the argument(s) {', '.join(missing)}; "
                f"see DESCRIBE {self.name}"
            )
        return {k: kwargs.get(k, p.default) for k, p in self.params.items()
                if k in kwargs or not p.required}


class FunctionRegistry:
    def __init__(self) -> None:
        self._functions: dict[str, TableFunction] = {}

    def register(self, fn: Callable[..., Any], name: str | None = None,
                 columns: list[tuple[str, str]] | None = None, replace: bool = False) -> TableFunction:
        if not callable(fn):
            raise InvalidInputException(f"a table function is a function fn(ctx, **arguments) returning a "
                                        f"pyarrow.Table, not {type(fn).__name__}")
        key = name or getattr(fn, "__name__", "")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):     # else no statement can call it
            raise InvalidInputException(f"a table function's name must be a plain identifier (letters, digits, _), "
                                        f"not {key!r}: pass name='my_function'")
        key = key.upper()
        if key in self._functions and not replace:
            raise CatalogException(f"table function {key} is already registered; pass replace=True")
        tf = TableFunction(key, fn, _params_of(fn), columns or [], inspect.getdoc(fn) or "")
        self._functions[key] = tf
        return tf

    def get(self, name: str) -> TableFunction:
        try:
            return self._functions[name.upper()]
        except KeyError:
            hint = difflib.get_close_matches(name.upper(), list(self._functions), n=1)
            extra = f" Did you mean {hint[0]}?" if hint else ""
            raise CatalogException(
                f"unknown table function '{name}'.{extra} Functions: {', '.join(sorted(self._functions))}"
            ) from None

    def __contains__(self, name: str) -> bool:
        return name.upper() in self._functions

    def names(self) -> list[str]:
        return sorted(self._functions)

    def copy(self) -> "FunctionRegistry":
        other = FunctionRegistry()
        other._functions = dict(self._functions)
        return other


def _params_of(fn: Callable[..., Any]) -> dict[str, Param]:
    sig = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception:  # hints that cannot be resolved are documentation only
        hints = {}
    params = list(sig.parameters.values())[1:]  # the first parameter is the context
    return {p.name: _param(p, hints.get(p.name, Any)) for p in params}


def _param(p: inspect.Parameter, hint: Any) -> Param:
    """A Param from an annotation, `Annotated[T, Range(...)]` split into the type and its range."""
    if typing.get_origin(hint) is not typing.Annotated:
        return Param(p.name, hint, p.default)
    base, *extras = typing.get_args(hint)
    ranges = [e for e in extras if isinstance(e, Range)]
    return Param(p.name, base, p.default, ranges[0] if ranges else None)


# Built-in functions register into this registry when their modules are imported
# (see metaql.engine.builtins); every connection starts from a copy of it.
REGISTRY = FunctionRegistry()


def table_function(name: str | None = None, columns: list[tuple[str, str]] | None = None,
                   logical: Callable[..., Any] | None = None, alternatives: list | None = None,
                   explain: Callable[..., list[str]] | None = None):
    """Decorator: registers a built-in table function in the global registry."""
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        tf = REGISTRY.register(fn, name=name, columns=columns)
        tf.logical, tf.alternatives, tf.explain = logical, list(alternatives or []), explain
        return fn
    return wrap
