"""AST -> bound statement: parameters substituted, table functions looked up, arguments checked
and converted to Python values by the function's type hints. Names of layers, sets and
checkpoints are checked against the catalog when the function resolves them (with did-you-mean)."""
from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from typing import Any

from metaql import ast
from metaql.engine.errors import BinderException, ParserException
from metaql.engine.functions import CheckpointList, FunctionRegistry, LayerList, SampleRef, SetName, TableFunction


@dataclass
class BoundCall:
    function: TableFunction
    arguments: dict[str, Any]


def bind_call(call: ast.TableCall, registry: FunctionRegistry, params) -> BoundCall:
    fn = registry.get(call.name)
    if call.positional:
        if call.args:
            raise BinderException(
                f"{fn.name}() got a value without a name after named arguments; if it belongs to a list, "
                "write the list in brackets, e.g. layers=[fc1, fc2]")
        if len(call.positional) > len(fn.params):
            raise BinderException(f"{fn.name}() takes at most {len(fn.params)} arguments")
        call = ast.TableCall(call.name, dict(zip(fn.params, call.positional)))
    raw = {k: value_of(v, params) for k, v in call.args.items()}
    checked = fn.check_arguments(raw)
    return BoundCall(fn, {k: coerce(fn.name, k, v, fn.params[k].hint) for k, v in checked.items()})


def value_of(node, params) -> Any:
    """AST value -> Python value: names are strings, calls become SampleRef(point|batch)."""
    if isinstance(node, ast.Name):
        return node.value
    if isinstance(node, ast.Star):
        return "*"
    if isinstance(node, ast.Literal):
        return node.value
    if isinstance(node, ast.Parameter):
        return parameter(node.key, params)
    if isinstance(node, ast.ListValue):
        return [value_of(v, params) for v in node.items]
    if isinstance(node, ast.Call):
        name = node.name.lower()
        if name not in ("point", "batch") or len(node.args) != 1:
            raise BinderException(f"unknown value {node.name}(...); use point(id) or batch(set)")
        return SampleRef(name, value_of(node.args[0], params))
    return node


def parameter(key: str, params) -> Any:
    if params is None:
        raise BinderException(f"the statement has a parameter (${key}) but no parameters were passed")
    if key.isdigit():
        seq = list(params.values()) if isinstance(params, dict) else list(params)
        i = int(key) - 1
        if i >= len(seq):
            raise BinderException(f"parameter {key} is missing: {len(seq)} parameters were passed")
        return seq[i]
    if not isinstance(params, dict) or key not in params:
        raise BinderException(f"named parameter ${key} is missing; pass parameters as a dict")
    return params[key]


def coerce(fn: str, name: str, value: Any, hint: Any) -> Any:
    """Checks a value against the parameter's type hint, with a message that names both."""
    if value is None or hint is Any:
        return value
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        if str(value) not in choices:
            _bad(fn, name, value, "one of " + ", ".join(choices))
        return str(value)
    origin = typing.get_origin(hint) or hint
    want = {int: "a whole number", float: "a number", str: "a name or 'string'", bool: "true or false"}
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, (int, float)):
        return float(value)
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    if hint is SetName:
        if isinstance(value, SampleRef) and value.mode == "batch":
            return SetName(value.value)
        if isinstance(value, str):
            return SetName(value)
        return _bad(fn, name, value, "a set name")
    if hint is SampleRef:
        return value if isinstance(value, SampleRef) else SampleRef("batch", value)
    if hint in (LayerList, CheckpointList):
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
        if isinstance(value, str):
            return value
        return _bad(fn, name, value, "a list in brackets")
    if origin in want:
        return _bad(fn, name, value, want[origin])
    return value


def _bad(fn: str, name: str, value: Any, what: str):
    raise BinderException(f"{fn}() argument {name}= should be {what}, not {value!r}")


_BARE_NAME = re.compile(r"^\s*[A-Za-z_]\w*\s*$")


def check_func_select(stmt: ast.FuncSelect) -> None:
    """Recognises `SELECT train FROM INFLUENCE(...) ORDER BY ASC` (TOPK(n) forgotten)."""
    if _BARE_NAME.match(stmt.columns) and stmt.columns.strip().lower() not in ("sample_id", "score") \
            and re.match(r"^\s*order\s+by\s+(asc|desc)\s*$", stmt.tail or "", re.I):
        raise ParserException(f"SELECT {stmt.columns.strip()} FROM ... ORDER BY needs a count: "
                              f"write SELECT TOPK(n) {stmt.columns.strip()} FROM {stmt.call.name}(...) ORDER BY ...")
