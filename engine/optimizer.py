"""The optimizer: a list of small rules, each a function (plan, env) -> plan, applied in order to a
copy of the logical plan (after sqlglot's optimizer), so the planner's tree is never changed and a
plan optimized once is not optimized again.

RULES today: per (checkpoint, layer) of an influence scan, the cheapest strategy by the cost model
(engine/cost.py, engine/strategies.py); for a TOPK under error= over a projected index, the exact
TOPK or the index's two-phase TOPK, the cheaper by their estimates (approx/route.py); the query
side's replay, priced by what this process's replays of the model took (estimate_replays). The
optimizer reads the catalog only through the statement's CatalogSnapshot (layer rows and the cost
constants, each read once); the store keeps the measured cost constants (Store.cost_constants).
The one write: per-layer fits that a background calibration finished (engine/autocalibrate.py)
are kept in the catalog by the next statement.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from metaql.engine import cost
from metaql.engine.plan import InfluenceScan, Strategy, TopK
from metaql.engine.strategies import STRATEGIES
from metaql.storage.catalog_snapshot import CatalogSnapshot

FORCE_KEY = "force_strategy"   # connection config: pin one strategy (benchmarks, tests)


@dataclass
class Env:
    """What rules may read: the statement's catalog snapshot and the connection's config."""
    catalog: CatalogSnapshot
    config: dict


def optimize(plan, catalog, config: dict | None = None):
    """`plan` optimized by every rule, as a new tree; `catalog` is the statement's CatalogSnapshot
    (a Store is accepted and read through a snapshot of its own)."""
    if getattr(plan, "_optimized", False):
        return plan
    env = Env(snapshot_of(catalog), dict(config or {}))
    out = copy_plan(plan)
    for rule in RULES:
        out = rule(out, env)
    out._optimized = True
    return out


def snapshot_of(catalog) -> CatalogSnapshot:
    return catalog if isinstance(catalog, CatalogSnapshot) else CatalogSnapshot(catalog)


def copy_plan(node):
    """A copy of every plan node of the tree; leaf data (sample id arrays) is shared, never changed."""
    if isinstance(node, TopK):
        return dataclasses.replace(node, child=copy_plan(node.child))
    if isinstance(node, InfluenceScan):
        return dataclasses.replace(node, layers=list(node.layers), checkpoints=list(node.checkpoints),
                                   strategies=[dataclasses.replace(s, estimates=dict(s.estimates))
                                               for s in node.strategies])
    return dataclasses.replace(node) if dataclasses.is_dataclass(node) else node


def scans(plan):
    """The influence scans of the tree."""
    if isinstance(plan, TopK):
        yield from scans(plan.child)
    elif isinstance(plan, InfluenceScan):
        yield plan


# ---- rules ------------------------------------------------------------------------------------------
def choose_scan_strategies(plan, env: Env):
    """Per (checkpoint, layer) of each influence scan, every applicable strategy's estimate and the
    cheapest one that is not a baseline (or the one the config forces); self-influence weighs
    the self-norm forms (engine/strategies.py: self_gram, self_full, self_norm)."""
    for scan in scans(plan):
        scan.strategies = choose_strategies(scan, env.catalog, env.config.get(FORCE_KEY), env.config)
    return plan


def choose_approximate_route(plan, env: Env):
    """A TOPK under error= over a projected index: the exact TOPK or the index's two phases, by
    their estimates (approx/route.py)."""
    from metaql.approx.route import choose_route
    return choose_route(plan, env)


def estimate_replays(plan, env: Env):
    """Per influence scan with a query, the replay of its query samples at each checkpoint, priced
    by the line fitted to this process's replays of the checkpoint's model (storage/replay.py;
    None until it replayed two batch sizes): the cost model's layer estimates leave it out."""
    for scan in scans(plan):
        if scan.query is None:
            continue
        b = len(scan.query.ids)
        each = [replay_estimate(env.catalog, ckpt, b) for ckpt in scan.checkpoints]
        scan.replay_estimate = None if None in each else sum(each)
    return plan


def replay_estimate(catalog, ckpt: str, samples: int) -> float | None:
    """Seconds to replay `samples` samples at the checkpoint (storage/replay.py), from this process's
    replays of its model and those earlier processes kept in the catalog."""
    from metaql.storage.replay import replay_seconds
    model_id = catalog.checkpoint(ckpt)["model_id"]
    store = catalog.store
    return replay_seconds(store.replay_key(model_id), samples, kept=store.kept_replay_times(model_id))


RULES: list[Callable] = [choose_scan_strategies, choose_approximate_route, estimate_replays]


def choose_strategies(scan: InfluenceScan, catalog, force: str | None = None,
                      config: dict | None = None) -> list[Strategy]:
    """Per (checkpoint, layer) the picks; with a connection's `config`, layers without a fit get one
    measured in the background (engine/autocalibrate.py) and used from the next statement on."""
    from metaql.engine import autocalibrate
    catalog = snapshot_of(catalog)
    store = catalog.store
    consts = autocalibrate.with_fits(store, catalog.cost_constants(cost.measure_constants))
    out = []
    for ckpt in scan.checkpoints:
        for layer in scan.layers:
            sh = layer_shapes(scan, catalog, ckpt, layer)
            ests = cost.estimates(sh)
            kind = catalog.layer_meta(layer)[0].kind
            for name, e in ests.items():
                e["seconds"] = cost.seconds(e, consts, name, kind, layer, sh)
            if force and force in ests:
                chosen = force
            else:
                chosen = min(candidates(ests), key=lambda k: ests[k]["seconds"])
            out.append(Strategy(ckpt, layer, chosen, ests, kind=kind, fitted=layer in consts.get("layers", {})))
    if config is not None:
        autocalibrate.maybe_start(store, scan, out, consts, config)
    return out


def candidates(ests: dict) -> list[str]:
    """The strategies cost may pick: no baseline, and (for the matrix) none whose query side would
    exceed cost.SPACE_LIMIT while another fits."""
    picks = [k for k in ests if not STRATEGIES[k].baseline]
    fitting = [k for k in picks if ests[k].get("space", 0) <= cost.SPACE_LIMIT]
    return fitting or picks


def layer_shapes(scan: InfluenceScan, catalog, ckpt: str, layer: str) -> cost.Shapes:
    row = snapshot_of(catalog).layer(layer)
    meta, stored = row["layer_meta"], row["storage"]
    positions = int(row["positions"] or 1)
    n = len(scan.train.ids)
    b = 0 if scan.query is None else len(scan.query.ids)
    each = getattr(scan, "pairwise", False)
    return cost.Shapes(n=n, s=positions, b=b, sq=positions, din=meta.din + int(meta.bias),
                       dout=meta.dout, stored=stored, each=each, kind=meta.kind if each else "",
                       self_influence=scan.query is None)


def cost_constants(store) -> dict[str, float]:
    """The cost constants (kept by the store; measured on first use)."""
    return store.cost_constants(cost.measure_constants)
