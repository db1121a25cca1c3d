"""Bound statement -> logical plan (engine.plan nodes), which the optimizer then annotates."""
from __future__ import annotations

from metaql.binder import BoundCall
from metaql.engine.functions import SetName
from metaql.engine.plan import FunctionScan, TopK


def plan_call(bound: BoundCall, ctx, train_set: str | None = None):
    args = dict(bound.arguments)
    if train_set is not None and "train" in bound.function.params:
        args["train"] = SetName(train_set)
    if bound.function.logical is not None:
        return bound.function.logical(ctx, **args)
    return FunctionScan(bound.function.name, args)


def plan_topk(bound: BoundCall, ctx, k: int, ascending: bool, train_set: str):
    return TopK(plan_call(bound, ctx, train_set), k, ascending)
