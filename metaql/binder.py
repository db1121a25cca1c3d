"""AST -> bound statement: parameters substituted, table functions looked up, arguments checked
and converted to Python values by the function's type hints, and every name argument (a set, a
sample, layers with glob patterns, checkpoints, a column of `samples`) resolved against the
statement's one catalog snapshot (storage/catalog_snapshot.py), with did-you-mean. Every function,
and EXPLAIN of it, refuses an unknown name alike, before anything runs."""
from __future__ import annotations

import math
import numbers
import re
import typing
from dataclasses import dataclass
from typing import Any

import numpy as np

from metaql import ast
from metaql.errors import BinderException, ParserException
from metaql.engine.functions import (INT64, CheckpointList, ColumnName, FunctionRegistry, LayerList, Range,
                                     SampleRef, SetName, TableFunction)


@dataclass
class BoundCall:
    function: TableFunction
    arguments: dict[str, Any]


def bind_call(call: ast.TableCall, registry: FunctionRegistry, params, catalog=None) -> BoundCall:
    """The call with its function looked up and its arguments checked; with the statement's
    `catalog` snapshot, every name the user passed is resolved against it too."""
    bound = _bound_values(call, registry, params)
    if catalog is not None:
        passed = set(call.args) | set(list(bound.function.params)[:len(call.positional)])
        bound.arguments.update(resolved_names(bound.function, bound.arguments, passed, catalog))
    return bound


def resolved_names(fn: TableFunction, arguments: dict[str, Any], passed: set[str], catalog) -> dict[str, Any]:
    """The name arguments among `passed`, resolved by their declared type: a set must exist (a
    named set or a split), a point's sample be registered, layers (names or glob patterns) become
    the stored layers they name, checkpoints (all/first/last/names) the complete checkpoints they
    name, a column name a column of `samples`. A function's own defaults are resolved when it runs."""
    out = {}
    for name in passed:
        value, hint = arguments.get(name), fn.params[name].hint
        if value is None:
            continue
        if hint is SetName:
            catalog.require_set(value)
        elif hint is SampleRef and isinstance(value, SampleRef):
            catalog.require_sample(value.value) if value.mode == "point" else catalog.require_set(value.value)
        elif hint is LayerList:
            out[name] = catalog.layer_names(value)
        elif hint is CheckpointList:
            out[name] = catalog.checkpoint_names(value)
        elif hint is ColumnName and value != "":
            catalog.require_column(value)
    return out


def _bound_values(call: ast.TableCall, registry: FunctionRegistry, params) -> BoundCall:
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
    return BoundCall(fn, {k: v if v is None and fn.params[k].default is None
                          else coerce(fn.name, k, v, fn.params[k].hint, fn.params[k].range)
                          for k, v in checked.items()})


from metaql.engine.influence import TOPK_RANGE  # noqa: E402  one bound for TOPK(n) and topk=


def check_topk(k: int) -> int:
    """TOPK(n): a count torch.topk can take (it needs an int32-sized k)."""
    if k not in TOPK_RANGE:
        shown = str(k) if len(str(k)) <= 20 else str(k)[:17] + "..."
        fix = "ask for at least one sample" if k < TOPK_RANGE.low else "use a smaller count"
        raise BinderException(f"TOPK(n) needs n in {TOPK_RANGE}, not {shown}; {fix}")
    return k


def value_of(node, params) -> Any:
    """AST value -> Python value: names are strings, calls become SampleRef(point|batch|each)."""
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
        if name not in ("point", "batch", "each") or len(node.args) != 1:
            raise BinderException(f"unknown value {node.name}(...); use point(id), batch(set) or each(set) "
                                  "(every sample of the set apart: the train x query matrix)")
        return SampleRef(name, value_of(node.args[0], params))
    return node


def parameter(key: str, params) -> Any:
    if params is None:
        raise BinderException(f"the statement has a parameter (${key}) but no parameters were passed")
    if key.isdigit():
        seq = list(params.values()) if isinstance(params, dict) else list(params)
        i = int(key) - 1
        if i < 0:
            raise BinderException(f"parameters are numbered from $1, not ${key}")
        if i >= len(seq):
            raise BinderException(f"parameter {key} is missing: {len(seq)} parameters were passed")
        return seq[i]
    if not isinstance(params, dict) or key not in params:
        raise BinderException(f"named parameter ${key} is missing; pass parameters as a dict")
    return params[key]


def coerce(fn: str, name: str, value: Any, hint: Any, bounds: Range | None = None) -> Any:
    """Checks a value against the parameter's type hint and range, with a message that names
    both; every number that reaches a function is finite and within its bounds (int64 at most)."""
    if hint is Any:
        return value
    if value is None:
        _bad(fn, name, value, "a value (NULL is none; leave the argument out for its default)")
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        if str(value) not in choices:
            _bad(fn, name, value, "one of " + ", ".join(choices))
        return str(value)
    origin = typing.get_origin(hint) or hint
    want = {int: "a whole number", float: "a number", str: "a name or 'string'", bool: "true or false"}
    if hint is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    if hint is int and isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        return _in_range(fn, name, int(value), bounds, INT64)
    if hint is float and isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        return _in_range(fn, name, _finite(fn, name, value), bounds)
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    if hint is ColumnName:
        if isinstance(value, str):
            return ColumnName(value)
        return _bad(fn, name, value, "a column name of samples")
    if hint is SetName:
        if isinstance(value, SampleRef) and value.mode == "batch" and isinstance(value.value, str):
            return SetName(value.value)
        if isinstance(value, str):
            return SetName(value)
        return _bad(fn, name, value, "a set name")
    if hint is SampleRef:
        return _sample_ref(fn, name, value)
    if hint in (LayerList, CheckpointList):
        return _name_list(fn, name, value, "layer" if hint is LayerList else "checkpoint")
    if origin in want:
        return _bad(fn, name, value, want[origin])
    return value


def _in_range(fn: str, name: str, value, bounds: Range | None, limit: Range | None = None):
    r = bounds or limit     # a parameter's own range lies within int64: name the tighter one
    if r is not None and value not in r:
        _bad(fn, name, value, f"{_sign_word(r, value)}{'a whole number' if isinstance(value, int) else 'a number'} in {r}")
    return value


def _sign_word(r: Range, value) -> str:
    """'positive: ' when the value falls below a range that starts at zero or one."""
    if r.low is None or value > r.low:
        return ""
    if r.low == 0 and r.open_low or r.low == 1:
        return "positive: "
    return "non-negative: " if r.low == 0 else ""


def _finite(fn: str, name: str, value) -> float:
    try:
        out = float(value)
    except OverflowError:
        out = math.inf
    if not math.isfinite(out):
        _bad(fn, name, value if len(str(value)) < 40 else f"{str(value)[:20]}...", "a finite number")
    return out


def _sample_ref(fn: str, name: str, value) -> SampleRef:
    """point(id) with a whole id in int64 range; batch(set) or a bare value naming a set."""
    ref = value if isinstance(value, SampleRef) else SampleRef("batch", value)
    if ref.mode == "point":
        sid = ref.value
        if isinstance(sid, str) and re.fullmatch(r"[+-]?\d{1,19}", sid.strip()):
            sid = int(sid)
        if not isinstance(sid, numbers.Integral) or isinstance(sid, bool) or int(sid) not in INT64:
            _bad(fn, name, value, "point(id) with a whole sample id")
        return SampleRef("point", int(sid))
    if not isinstance(ref.value, str):
        _bad(fn, name, value, f"{'each' if ref.mode == 'each' else 'batch'}(set) or a set name")
    return ref


def _name_list(fn: str, name: str, value, kind: str):
    if isinstance(value, str):
        return value
    if not isinstance(value, (list, tuple)):
        return _bad(fn, name, value, "a list in brackets")
    if not value:
        every = "layers=*" if kind == "layer" else "checkpoints=all"
        raise BinderException(f"{fn}() argument {name}=[] names no {kind}: name at least one {kind}, or {every}")
    if not all(isinstance(v, str) for v in value):
        return _bad(fn, name, value, f"a list of {kind} names, e.g. [{'fc1, fc2' if kind == 'layer' else 'c0, c1'}]")
    return list(value)


def _bad(fn: str, name: str, value: Any, what: str):
    shown = str(value) if isinstance(value, SampleRef) else repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise BinderException(f"{fn}() argument {name}= should be {what}, not {shown}")


_BARE_NAME = re.compile(r"^\s*[A-Za-z_]\w*\s*$")


def check_func_select(stmt: ast.FuncSelect) -> None:
    """Recognises `SELECT train FROM INFLUENCE(...) ORDER BY ASC` (TOPK(n) forgotten)."""
    if _BARE_NAME.match(stmt.columns) and stmt.columns.strip().lower() not in ("sample_id", "score") \
            and re.match(r"^\s*order\s+by\s+(asc|desc)\s*$", stmt.tail or "", re.I):
        raise ParserException(f"SELECT {stmt.columns.strip()} FROM ... ORDER BY needs a count: "
                              f"write SELECT TOPK(n) {stmt.columns.strip()} FROM {stmt.call.name}(...) ORDER BY ...")
