"""The binder (AST values -> typed arguments) and the planner (bound call -> plan nodes)."""
from typing import Literal

import pytest

import metaql
from metaql import ast
from metaql.binder import bind_call, coerce, value_of
from metaql.engine.functions import FunctionRegistry, SampleRef, SetName
from metaql.engine.plan import FunctionScan, TopK
from metaql.planner import plan_call, plan_topk


def registry():
    def scores(ctx, data: SetName, k: int = 3, mode: Literal["a", "b"] = "a", query: SampleRef = None,
               flag: bool = False):
        """A test function."""
    reg = FunctionRegistry()
    reg.register(scores)
    return reg


def test_values_bind_to_python_objects_and_parameters():
    params = {"s": "train", "n": 7}
    assert value_of(ast.Call("batch", [ast.Parameter("s")]), params) == SampleRef("batch", "train")
    assert value_of(ast.Call("point", [ast.Literal(4711)]), None) == SampleRef("point", 4711)
    assert value_of(ast.ListValue([ast.Name("fc1"), ast.Star()]), None) == ["fc1", "*"]
    assert value_of(ast.Parameter("2"), ["x", 9]) == 9
    with pytest.raises(metaql.BinderException, match="parameter 3 is missing"):
        value_of(ast.Parameter("3"), ["x", 9])
    with pytest.raises(metaql.BinderException, match="unknown value sample"):
        value_of(ast.Call("sample", [ast.Literal(1)]), None)


def test_arguments_are_checked_against_type_hints():
    bound = bind_call(ast.TableCall("scores", {"data": ast.Call("batch", [ast.Name("test")]),
                                                "k": ast.Literal(5), "flag": ast.Name("true")}), registry(), None)
    assert bound.arguments == {"data": "test", "k": 5, "mode": "a", "query": None, "flag": True}
    assert isinstance(bound.arguments["data"], SetName)
    with pytest.raises(metaql.BinderException, match="k= should be a whole number"):
        bind_call(ast.TableCall("scores", {"data": ast.Name("x"), "k": ast.Literal(1.5)}), registry(), None)
    with pytest.raises(metaql.BinderException, match="mode= should be one of a, b"):
        coerce("SCORES", "mode", "c", Literal["a", "b"])
    with pytest.raises(metaql.BinderException, match="value without a name after named"):
        bind_call(ast.TableCall("scores", {"data": ast.Name("x")}, [ast.Literal(1)]), registry(), None)
    positional = bind_call(ast.TableCall("scores", {}, [ast.Name("train"), ast.Literal(2)]), registry(), None)
    assert positional.arguments["data"] == "train" and positional.arguments["k"] == 2


def test_planner_builds_function_scans_and_topk():
    bound = bind_call(ast.TableCall("scores", {"data": ast.Name("x")}), registry(), None)
    assert plan_call(bound, ctx=None) == FunctionScan("SCORES", bound.arguments)
    top = plan_topk(bound, None, 5, True, "train")
    assert isinstance(top, TopK) and top.k == 5 and top.ascending and isinstance(top.child, FunctionScan)
