"""The Ray engine's scan by units: one task scores a group of samples over every (checkpoint, layer)
pass at once and returns their totals, or only its k best for a TOPK; the driver merges k rows per
task instead of every shard's partial scores of every pass, and waits at no barrier between passes.

A task may rank its samples only when it holds all of their shards (distributed/units.py says when
the catalog proves it, or the tasks check it); otherwise, or when a task finds the ids do not line
up, the scan runs pass by pass as before (ray_engine.layer_pass_ray). Totals are summed as the
local engine sums them and ranked by its order (distributed/unit_scan.py), so answers are identical.
"""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

from metaql.distributed import ray_engine
from metaql.distributed.unit_scan import BestK, Pass, Scan, scan_units
from metaql.distributed.units import Units, plan_units

BY_UNITS = True        # False: every scan runs pass by pass (the benchmark's "before")
REFUSED = "_ray_units_refused"     # set on a scan whose tasks found shards that do not line up

_remote = None


def top_k_by_units(plan, ctx, runner=None) -> pa.Table | None:
    """A TOPK over INFLUENCE / SELF_INFLUENCE ranked by tasks, or None (run it as before)."""
    from metaql.engine.plan import InfluenceScan
    scan = plan.child
    if not isinstance(scan, InfluenceScan) or scan.total:
        return None
    table = scored(scan, ctx, plan.k, plan.ascending, runner)
    if table is not None and scan.query is not None:      # EXPLAIN ANALYZE says why it did not prune
        from metaql.engine.pruning import Pruning
        plan.pruning = Pruning(reason="the Ray engine ranks each task's k best; the driver merges them")
    return table


def influence_by_units(scan, ctx, runner=None) -> pa.Table | None:
    """executor.influence's table computed by unit tasks, or None (run it pass by pass)."""
    return scored(scan, ctx, None, True, runner)


def scored(scan, ctx, k: int | None, ascending: bool, runner=None) -> pa.Table | None:
    from metaql.engine.strategies import strategy_named
    from metaql.storage.catalog_snapshot import catalog_of
    if not BY_UNITS or getattr(scan, "pairwise", False) or getattr(scan, REFUSED, False) \
            or any(strategy_named(s.chosen).replays for s in scan.strategies):
        return None
    catalog = catalog_of(ctx)
    train = np.sort(scan.train.ids)
    ckpts, passes = passes_of(scan)
    units = plan_units([catalog.factor_shards(c, s.layer) for c, s in passes], train)
    if units is None or not units.shards:
        return None
    shared = shared_scan(scan, ctx, catalog, train, ckpts, passes, k, ascending)
    merged = merge(units, shared, ctx, runner or ray_runner, f"{len(passes)} passes of {len(units.shards)} units")
    if merged is None:
        setattr(scan, REFUSED, True)
        return None
    pos, score, seconds = merged
    for j, (_, s) in enumerate(passes):
        s.measured_seconds = float(seconds[j])       # summed over the workers' tasks
    if k is not None:
        return pa.table({"sample_id": pa.array(train[pos]), "score": pa.array(score)})
    seen = np.zeros(len(train), bool)
    total = np.zeros(len(train))
    total[pos], seen[pos] = score, True
    if scan.total:
        return pa.table({"train_samples": pa.array([int(seen.sum())], pa.int64()),
                         "score": pa.array([float(total[seen].sum())])})
    return pa.table({"sample_id": pa.array(train[seen]), "score": pa.array(total[seen])})


def passes_of(scan) -> tuple[list[str], list[tuple]]:
    """The checkpoints, and the (checkpoint, strategy) passes in executor.influence's order."""
    by_ckpt: dict[str, list] = {}
    for s in scan.strategies:
        by_ckpt.setdefault(s.checkpoint, []).append(s)
    return list(by_ckpt), [(c, s) for c, ss in by_ckpt.items() for s in ss]


def shared_scan(scan, ctx, catalog, train, ckpts, passes, k, ascending) -> Scan:
    """What every task needs, the query sides replayed here once per checkpoint (as the local
    engine replays them) and moved to the CPU."""
    from metaql.engine.executor import device_of, query_sides
    from metaql.storage.layers import kind_named
    queries, qnorms = [], []
    for c in ckpts:
        strategies = [s for cc, s in passes if cc == c]
        side = None if scan.query is None else query_sides(scan, ctx.store, c, strategies, device_of(ctx), catalog)
        qnorm = 0.0
        for s in strategies:
            q = None if side is None else side[s.layer]
            if q is not None and scan.similarity == "cosine":
                qnorm += float((q["gbar_flat"].double() ** 2).sum())
            queries.append(None if q is None else {n: v.cpu() if hasattr(v, "cpu") else v for n, v in q.items()})
        qnorms.append(qnorm if side is not None else None)
    out = []
    for c, s in passes:
        meta, stored = catalog.layer_meta(s.layer)
        out.append(Pass(ckpts.index(c), s.layer, kind_named(meta.kind), meta, stored, s.chosen))
    scale = len(scan.query.ids) if scan.reduce == "sum" and scan.similarity == "dot" and scan.query is not None \
        else None
    return Scan(train, out, queries, ckpts, [catalog.checkpoint(c)["lr"] for c in ckpts], qnorms,
                scan.similarity, scale, k, ascending)


def merge(units: Units, shared: Scan, ctx, runner, where: str):
    """(positions, scores, seconds per pass) merged from every task; None when the shards turn out
    not to line up (a task says so, or two units hold the same sample)."""
    best = None if shared.k is None else BestK(shared.k, shared.ascending)
    pos_parts, score_parts = [], []
    marks = np.zeros(len(shared.train), bool) if units.check else None
    bad = np.zeros(len(shared.passes) + len(shared.lrs), np.int64)
    seconds = np.zeros(len(shared.passes))
    results = runner(ctx, task_units(units), shared, units.check, where)
    try:
        for res in results:
            if res.get("unaligned"):
                return None
            if marks is not None:
                if marks[res["all"]].any():
                    return None
                marks[res["all"]] = True
            bad += res["bad"]
            seconds += res["seconds"]
            if best is not None:
                best.add(res["pos"], res["score"])
            else:
                pos_parts.append(res["pos"])
                score_parts.append(res["score"])
    finally:
        results.close()        # cancels the tasks still running when the scan gives up
    raise_not_finite(bad, shared)
    if best is not None:
        return (*best.result(), seconds)
    empty = [np.zeros(0, np.int64)], [np.zeros(0)]
    return np.concatenate(pos_parts or empty[0]), np.concatenate(score_parts or empty[1]), seconds


def raise_not_finite(bad: np.ndarray, shared: Scan) -> None:
    """The local engine's error for its first failing check (a pass's scores, then its checkpoint's
    total, checkpoint by checkpoint), with the count over every task."""
    from metaql.engine.executor import check_finite
    if not bad.any():
        return
    npass = len(shared.passes)
    for c, name in enumerate(shared.ckpts):
        layers = [j for j, p in enumerate(shared.passes) if p.ckpt == c]
        for j in layers:
            if bad[j]:      # check_finite words the error; an array of that many NaNs makes it count them
                check_finite(np.full(int(bad[j]), np.nan), shared.passes[j].layer, name)
        if bad[npass + c]:
            check_finite(np.full(int(bad[npass + c]), np.nan), ", ".join(shared.passes[j].layer for j in layers),
                         name, shared.lrs[c])


def task_units(units: Units) -> list[list]:
    """The units grouped into tasks of about ray_engine.TASK_BYTES of shard bytes (all passes)."""
    sized = [{"bytes": sum(int(r.get("bytes") or 0) for shards in u for r in shards), "unit": u}
             for u in units.shards]
    return [[s["unit"] for s in g] for g in ray_engine.task_groups(sized)]


def ray_runner(ctx, groups: list[list], shared: Scan, check: bool, where: str):
    """Each task's result as it finishes (ray_engine.collect: cancelled on an interrupt, a failure,
    or when the caller closes this generator)."""
    global _remote
    ray = ray_engine.ensure_ray(ctx.config.get("address"))
    if _remote is None:
        _remote = ray.remote(scan_units)
    shared_ref = ray.put(shared)
    fault = os.environ.get("METAQL_RAY_FAULT")
    task = _remote.options(max_retries=ray_engine.MAX_RETRIES, retry_exceptions=False, num_cpus=ray_engine.TASK_CPUS)
    location = ray_engine.store_location(ctx.store)
    refs = [task.remote(location, g, shared_ref, check, fault) for g in groups]
    yield from ray_engine.collect(ray, refs, ctx, where)


def local_runner(ctx, groups: list[list], shared: Scan, check: bool, where: str):
    """The same tasks run one after another in this process (tests, without a Ray cluster)."""
    location = ray_engine.store_location(ctx.store)
    for g in groups:
        ctx.check_interrupt()
        yield scan_units(location, g, shared, check)
