"""Bound statement -> logical plan (engine.plan nodes), which the optimizer then annotates."""
from __future__ import annotations

import dataclasses

from metaql.binder import BoundCall
from metaql.errors import BinderException
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
    """TOPK(k) ... ORDER BY DESC|ASC; over the train x query matrix (query=each(set)) it ranks
    per query sample: each one's k proponents (DESC) or opponents (ASC), never the whole matrix."""
    child = plan_call(bound, ctx, train_set)
    if getattr(child, "pairwise", False):
        if child.topk is not None:
            raise BinderException(f"TOPK({k}) and topk={child.topk} both give the count per query sample: "
                                  "give it once")
        want = "opponents" if ascending else "proponents"
        if child.direction not in ("proponents", want):
            raise BinderException(f"ORDER BY {'ASC' if ascending else 'DESC'} ranks the {want}, not "
                                  f"direction={child.direction}: leave direction= out, or write SELECT * FROM "
                                  f"INFLUENCE(..., query=each(set), topk={k}, direction={child.direction})")
        return dataclasses.replace(child, topk=k, direction=want)
    return TopK(child, k, ascending)
