"""Bound statement -> logical plan (engine.plan nodes), which the optimizer then annotates."""
from __future__ import annotations

import dataclasses

from metaql.binder import BoundCall
from metaql.errors import BinderException
from metaql.engine.functions import SampleRef, SetName
from metaql.engine.plan import FunctionScan, TopK


def plan_call(bound: BoundCall, ctx, train_set: str | None = None):
    args = dict(bound.arguments)
    if train_set is not None and "train" in bound.function.params:
        args["train"] = SetName(train_set)
    if bound.function.logical is not None:
        return bound.function.logical(ctx, **args)
    return FunctionScan(bound.function.name, args)


def plan_topk(bound: BoundCall, ctx, k: int, ascending: bool, train_set: str, passed: frozenset = frozenset()):
    """TOPK(k) ... ORDER BY DESC|ASC; over the train x query matrix (query=each(set)) it ranks
    per query sample: each one's k proponents (DESC) or opponents (ASC), never the whole matrix.
    `passed`: the argument names the user gave the call (a train= of its own must agree)."""
    if "train" in passed:
        _check_one_training_side(bound, k, train_set)
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


def _check_one_training_side(bound: BoundCall, k: int, train_set: str) -> None:
    """TOPK(k) <set> ranks that set: a call's own train= naming another side would be replaced by
    it without a word (TOPK(3) train FROM SELF_INFLUENCE(train=batch(x)) ranked all of train)."""
    given = bound.arguments.get("train")
    mode, value = (given.mode, given.value) if isinstance(given, SampleRef) else ("batch", given)
    if mode == "batch" and str(value) == train_set:
        return
    raise BinderException(f"TOPK({k}) {train_set} ranks the set {train_set}, but {bound.function.name}() names "
                          f"train={mode}({value}): name the set to rank once, after TOPK({k}), and leave "
                          "train= out of the call")
