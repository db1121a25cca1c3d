"""EXPLAIN text: the plan tree, and per checkpoint and layer every strategy's estimate and the pick."""
from __future__ import annotations

from metaql.engine.autocalibrate import MIN_SECONDS
from metaql.engine.cost import work_is_cpu
from metaql.engine.plan import FunctionScan, InfluenceScan, TopK


def explain_lines(plan, analyze: bool = False, indent: str = "", ctx=None) -> list[str]:
    if isinstance(plan, TopK):
        order = "ASC" if plan.ascending else "DESC"
        pruning = getattr(plan, "pruning", None) if analyze else None
        route = getattr(plan, "route", None)         # under error= over a projected index (approx/route.py)
        if route is not None:
            from metaql.approx.route import route_lines
            route = route_lines(route, plan.child, analyze, indent)
        return [f"{indent}TOP_K k={plan.k} order={order}"] + (route or []) \
            + ([f"{indent}  {line}" for line in pruning.lines()] if pruning is not None else []) \
            + explain_lines(plan.child, analyze, indent + "  ", ctx)
    if isinstance(plan, FunctionScan):
        args = ", ".join(f"{k}={v}" for k, v in plan.arguments.items())
        lines = [f"{indent}TABLE_FUNCTION {plan.name}({args})"]
        fn = ctx.registry.get(plan.name) if ctx is not None and plan.name in ctx.registry else None
        if fn is not None and fn.explain is not None:
            lines += [f"{indent}  {line}" for line in fn.explain(ctx, **plan.arguments)]
        return lines
    if isinstance(plan, InfluenceScan):
        return influence_lines(plan, analyze, indent)
    return [f"{indent}{plan!r}"]


def influence_lines(scan: InfluenceScan, analyze: bool, indent: str) -> list[str]:
    kind = "SELF_INFLUENCE" if scan.query is None else "INFLUENCE"
    head = (f"{indent}{kind} train={scan.train.label} ({len(scan.train.ids)} samples)"
            + ("" if scan.query is None else f" query={scan.query.label} ({len(scan.query.ids)} samples)")
            + f" similarity={scan.similarity} checkpoints={len(scan.checkpoints)} layers={len(scan.layers)}")
    lines = [head]
    if getattr(scan, "pairwise", False):
        from metaql.engine.matrix import explain_lines as matrix_lines
        lines += matrix_lines(scan, indent)
    for s in scan.strategies:
        ests = "  ".join(f"{name}{'*' if name == s.chosen else ''}={e['seconds']:.3g}s"
                         + (f" (query side {e['space'] * 4 / 2 ** 20:.3g} MiB)" if "space" in e else "")
                         for name, e in sorted(s.estimates.items()))
        kind = f" ({s.kind})" if s.kind else ""
        line = f"{indent}  {s.checkpoint}/{s.layer}{kind}: {s.chosen}  [{ests}]"
        if analyze and s.measured_seconds is not None:
            est = s.estimates.get(s.chosen, {}).get("seconds")
            line += f"  measured={s.measured_seconds:.3g}s"
            if est:
                line += f" (estimate {est:.3g}s, measured/estimate {s.measured_seconds / est:.3g})"
            if s.measured_wall_seconds is not None and work_is_cpu():
                line += f"  CPU time; wall {s.measured_wall_seconds:.3g}s"
        lines.append(line)
    if scan.query is not None and hasattr(scan, "replay_estimate"):
        lines.append(f"{indent}  query side: replays {len(scan.query.ids)} sample(s) at each of {len(scan.checkpoints)} "
                     "checkpoint(s), " + replay_text(scan.replay_estimate))
    unfitted = sorted({s.layer for s in scan.strategies if not s.fitted})
    if unfitted:
        lines.append(f"{indent}  estimates of {len(unfitted)} layer(s) from the machine's base constants alone "
                     "(unfitted estimates of strategies with large intermediates can be 100x low): a query "
                     f"estimated at {MIN_SECONDS:g} s or more fits its layers' own timings in the background "
                     "for the statements after it (config auto_calibrate=False turns that off); "
                     "PRAGMA metaql_calibrate (on a quiet machine) fits every layer now")
    if getattr(scan, "error", None) is not None:      # INFLUENCE(..., error=e): metaql.approx
        from metaql.approx.execute import explain_lines as approx_lines
        lines += approx_lines(scan, analyze, indent)
    return lines


def replay_text(estimate: float | None) -> str:
    if estimate is None:
        return ("no estimate yet (priced once this process has replayed the model at two batch sizes: "
                "a query side and con.replay's batches, or two query sides)")
    return f"estimate {estimate:.3g} s (a line fitted to this process's replays of the model)"
