"""The optimizer's choice, for a TOPK under error= over a store with a projected index, between the
exact TOPK and the index's two-phase TOPK (metaql.approx.indexed), by their estimated seconds.

The exact route costs what the cost model says each layer's chosen strategy costs over the
training side (engine/cost.py; pruning, which can only make it cheaper, is not counted). The
index route replaces each indexed layer's scan by
    split    the query's average gradient split on the subspaces, projected, its spectral norms
             (once per query and layer; timed on the layer at build time, approx/index.py `costs`),
    scan     one index row per training sample (seconds per row, timed over the whole layer at build),
    rescore  R samples' exact scores: their rows gathered from the shards (the first sample's
             seconds, opening them, and seconds per further byte, timed at build on random rows)
             and scored by the layer's chosen strategy (the cost model at N = R, without the query
             side, which phase 1 has built already),
with R = min(N, RESCORED x k): the two-phase TOPK rescores between k and a few tenths more (131,
124, 111 for k = 100 on the MiniLM at N = 1,000-4,000). Layers without an index cost their exact
scan in both routes. The query side (replaying the query batch) is the same in both and left out.

An index built before its costs were timed gets no estimate and keeps the index route (as every
index TOPK ran before); `build_index` again times them. config `approx_route`: 'auto' (default),
'index' or 'exact' forces one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

CONFIG_KEY = "approx_route"
ROUTES = ("auto", "index", "exact")
RESCORED = 1.3           # expected samples rescored, in units of k (module docstring)


@dataclass
class Route:
    """The pick and what it was picked by (EXPLAIN prints it; ANALYZE adds the index route's
    measured steps, from the statement's approximation info)."""
    chosen: str                       # "index" | "exact"
    why: str
    exact: float | None = None        # seconds: the exact TOPK's estimate (its layers' picks)
    index: dict = field(default_factory=dict)     # step -> seconds of the index route's estimate
    rescored: int = 0                 # R the index estimate assumes

    @property
    def index_total(self) -> float | None:
        return sum(self.index.values()) if self.index else None


def choose_route(plan, env):
    """Optimizer rule: a TOPK under error= (dot similarity, a query side, no layer stored projected)
    over a store whose projected index covers some of its layers gets `plan.route`."""
    from metaql.engine.plan import TopK
    if not isinstance(plan, TopK) or getattr(plan.child, "error", None) is None:
        return plan
    scan = plan.child
    if scan.query is None or scan.similarity != "dot" or scan.total or getattr(scan, "pairwise", False):
        return plan
    store = env.catalog.store
    from metaql.approx.kind import is_projected
    if any(is_projected(env.catalog.layer_meta(layer)[0]) for layer in scan.layers):
        return plan
    entries = index_entries(scan, store, env.catalog)
    if entries:
        plan.index_entries = entries          # for the execution (approx/indexed.py), not looked up twice
        plan.route = route_of(scan, plan.k, entries, env.config.get(CONFIG_KEY, "auto"), env.catalog)
    return plan


def index_entries(scan, store, catalog) -> dict:
    """{(checkpoint, layer): index entry} of the scan's layers that the store's index covers (its
    shards read through the statement's catalog snapshot)."""
    from metaql.approx.index import load_index, usable
    entries = {}
    for ckpt in scan.checkpoints:
        index = load_index(store, ckpt)
        for layer in scan.layers:
            entry = usable(index, catalog, ckpt, layer)
            if entry is not None:
                entries[(ckpt, layer)] = entry
    return entries


def route_of(scan, k: int, entries: dict, forced: str, catalog) -> Route:
    exact = sum(s.estimates[s.chosen]["seconds"] for s in scan.strategies)
    n = len(scan.train.ids)
    r = min(n, math.ceil(RESCORED * k))
    index = index_estimate(scan, entries, r, catalog)
    if forced in ("index", "exact"):
        return Route(forced, f"config {CONFIG_KEY}='{forced}'", exact, index or {}, r)
    if index is None:
        return Route("index", "the index was built before its costs were timed (build_index again to let the "
                     "optimizer choose); the index route, as before", exact, {}, r)
    total = sum(index.values())
    if total < exact:
        return Route("index", f"its estimate {total:.3g} s is below the exact TOPK's {exact:.3g} s", exact, index, r)
    return Route("exact", f"the exact TOPK's estimate {exact:.3g} s is not above the index route's {total:.3g} s "
                 "(an exact answer meets any error=)", exact, index, r)


def index_estimate(scan, entries: dict, r: int, catalog) -> dict | None:
    """{step: seconds} of the index route (module docstring), or None when an entry has no costs."""
    if any("costs" not in e for e in entries.values()):
        return None
    from metaql.engine import autocalibrate, cost
    consts = autocalibrate.with_fits(catalog.store, catalog.cost_constants(cost.measure_constants))
    n = len(scan.train.ids)
    out = {"query split and norms": 0.0, "index scan": 0.0, "rescoring": 0.0, "exact layers": 0.0}
    for s in scan.strategies:
        entry = entries.get((s.checkpoint, s.layer))
        if entry is None:
            out["exact layers"] += s.estimates[s.chosen]["seconds"]
            continue
        costs = entry["costs"]
        out["query split and norms"] += costs["split"]
        out["index scan"] += costs["scan_row"] * n
        out["rescoring"] += costs["gather"] + costs["gather_byte"] * costs["sample_bytes"] * r \
            + scored_seconds(scan, s, r, catalog, consts)
    return out


def scored_seconds(scan, strat, r: int, catalog, consts: dict) -> float:
    """The cost model's seconds of the layer's chosen strategy over r training samples, less what
    it costs over none (the query side, which phase 1 built)."""
    from dataclasses import replace
    from metaql.engine import cost
    from metaql.engine.optimizer import layer_shapes
    shapes = layer_shapes(scan, catalog, strat.checkpoint, strat.layer)

    def at(n: int) -> float:
        sh = replace(shapes, n=n)
        return cost.seconds(cost.estimates(sh)[strat.chosen], consts, strat.chosen, strat.kind, strat.layer, sh)
    return max(at(r) - at(0), 0.0)


def route_lines(route: Route, scan, analyze: bool, indent: str) -> list[str]:
    """EXPLAIN's lines of the pick; with ANALYZE, the route's measured time against its estimate
    (the index route's steps; the exact route's layer scans)."""
    lines = [f"{indent}  route: {route.chosen} ({route.why})"]
    if route.index:
        steps = ", ".join(f"{name} {s:.3g}" for name, s in route.index.items())
        lines.append(f"{indent}  estimates (s, the query side's replay left out: the same in both): exact TOPK "
                     f"{route.exact:.3g}; index route {route.index_total:.3g} = {steps} (rescoring {route.rescored} samples)")
    if not analyze:
        return lines
    info = getattr(scan, "approximation", None) or {}
    seconds = info.get("index", {}).get("seconds")
    if seconds and route.index:
        measured = ", ".join(f"{name} {seconds.get(name, 0.0):.3g} s ({_ratio(seconds.get(name, 0.0), est)})"
                             for name, est in route.index.items())
        total = sum(seconds.get(name, 0.0) for name in route.index)
        lines.append(f"{indent}  measured (measured/estimate): {measured}; in all {total:.3g} s "
                     f"({_ratio(total, route.index_total)}); rescored {info.get('certificate', {}).get('candidates', '?')} "
                     "samples")
    scans = [s.measured_seconds for s in scan.strategies if s.measured_seconds is not None]
    if route.chosen == "exact" and scans and route.exact:
        lines.append(f"{indent}  measured: the layers' scans {sum(scans):.3g} s ({_ratio(sum(scans), route.exact)})")
    return lines


def _ratio(measured: float, estimate: float) -> str:
    return f"x{measured / estimate:.2f}" if estimate > 0 else "no estimate"
