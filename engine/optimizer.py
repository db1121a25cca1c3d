"""The optimizer: per (checkpoint, layer), the cheapest strategy by the cost model.

Rules are small functions over the plan, applied in order (after sqlglot's optimizer).
"""
from __future__ import annotations

import json

from metaql.engine import cost
from metaql.engine.plan import InfluenceScan, Strategy, TopK

FORCE_KEY = "force_strategy"   # connection config: pin one strategy (benchmarks, tests)


def optimize(plan, store, config: dict | None = None):
    node = plan.child if isinstance(plan, TopK) else plan
    if isinstance(node, InfluenceScan):
        node.strategies = choose_strategies(node, store, (config or {}).get(FORCE_KEY))
    return plan


def choose_strategies(scan: InfluenceScan, store, force: str | None = None) -> list[Strategy]:
    consts = cost_constants(store)
    out = []
    for ckpt in scan.checkpoints:
        for layer in scan.layers:
            ests = cost.estimates(layer_shapes(scan, store, ckpt, layer))
            for e in ests.values():
                e["seconds"] = cost.seconds(e, consts)
            if scan.query is None:
                chosen = "self_norm"
            elif force and force in ests:
                chosen = force
            else:
                chosen = min((k for k in ests if k not in cost.BASELINES), key=lambda k: ests[k]["seconds"])
            out.append(Strategy(ckpt, layer, chosen, ests))
    return out


def layer_shapes(scan: InfluenceScan, store, ckpt: str, layer: str) -> cost.Shapes:
    meta, stored = store.layer_meta(layer)
    row = store.sql("SELECT positions FROM layers WHERE name = ?", [layer]).fetchone()
    positions = int(row[0] or 1)
    n = len(scan.train.ids)
    b = 0 if scan.query is None else len(scan.query.ids)
    return cost.Shapes(n=n, s=positions, b=b, sq=positions, din=meta.din + int(meta.bias),
                       dout=meta.dout, stored=stored)


def cost_constants(store) -> dict[str, float]:
    row = store.sql("SELECT value FROM meta WHERE key = 'cost_constants'").fetchone()
    if row:
        return json.loads(row[0])
    consts = cost.measure_constants()
    if not store.read_only:
        store.sql("INSERT OR REPLACE INTO meta VALUES ('cost_constants', ?)", [json.dumps(consts)])
    return consts
