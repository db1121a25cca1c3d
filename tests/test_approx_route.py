"""The optimizer's route for a TOPK under error= over a projected index (approx/route.py): the exact
TOPK or the index's two phases, by their estimates; the index's build-time costs; EXPLAIN."""
from __future__ import annotations

import math

import numpy as np
import pytest

from metaql.errors import InvalidInputException
from tests.test_approx import _indexed_store

STMT = "SELECT TOPK(10) train FROM INFLUENCE(layers=*, query=batch(test){}) ORDER BY DESC"


@pytest.fixture(scope="module")
def indexed():
    from metaql.approx.index import build_index
    con, *_ = _indexed_store(seed=1, n=80, width=32, t=8)
    build_index(con, proj_dim=4)
    con.config["approx_route"] = "auto"
    yield con
    con.close()


def _plan(con, stmt: str) -> str:
    return "\n".join(r[0] for r in con.execute(stmt).fetchall())


def test_build_times_the_costs_the_estimate_reads(indexed):
    from metaql.approx.index import load_index
    for ckpt in ("c0", "c1"):
        for layer, entry in load_index(indexed.store, ckpt).items():
            costs = entry["costs"]
            assert costs["split"] > 0 and costs["scan_row"] > 0 and costs["gather"] > 0, (layer, costs)
            assert costs["gather_byte"] >= 0
            _, tensors = indexed.store.shard_tensors(indexed.store.factor_shards(ckpt, layer)[0])
            assert costs["sample_bytes"] == sum(t[0].numel() * t.element_size() for t in tensors.values())
            assert costs["sample_bytes"] == (16 if layer == "proj" else 8) * 4 * (32 + 32)  # proj runs twice
    indexed.execute(STMT.format(", error=0.05"))
    route = indexed.approximation["route"]
    assert route["rescored"] == math.ceil(1.3 * 10)
    assert set(route["index"]) == {"query split and norms", "index scan", "rescoring", "exact layers"}
    assert all(v >= 0 for v in route["index"].values()) and route["exact"] > 0
    assert route["chosen"] == ("index" if sum(route["index"].values()) < route["exact"] else "exact")


@pytest.mark.parametrize("index_seconds,chosen,order", [(1e9, "exact", "DESC"), (0.0, "index", "DESC"),
                                                        (1e9, "exact", "ASC")])
def test_auto_takes_the_cheaper_route(indexed, monkeypatch, index_seconds, chosen, order):
    """Whichever route the estimates pick, the answer is the exact TOPK's ids with exact scores; the
    exact route's certificate is an exact answer's."""
    from metaql.approx import route
    stmt = STMT.replace("DESC", order)
    exact = indexed.execute(stmt.format("")).fetchall()
    real = route.index_estimate
    monkeypatch.setattr(route, "index_estimate", lambda *a: {k: index_seconds for k in real(*a)})
    got = indexed.execute(stmt.format(", error=0.05")).fetchall()
    info = indexed.approximation
    assert info["route"]["chosen"] == chosen
    if chosen == "exact":
        assert got == exact
        assert info["certificate"]["exact"] and info["certificate"]["recall_bound"] == 1.0
        assert "index" not in info
    else:
        assert info["index"]["indexed"] == 4
        every = dict(indexed.execute("SELECT sample_id, score FROM INFLUENCE(layers=*, query=batch(test))").fetchall())
        np.testing.assert_allclose([s for _, s in got], [every[i] for i, _ in got], rtol=1e-5, atol=1e-9)
    plan = _plan(indexed, "EXPLAIN ANALYZE " + stmt.format(", error=0.05"))
    assert f"route: {chosen}" in plan and "estimates (s" in plan
    assert ("measured (measured/estimate)" in plan) == (chosen == "index")
    assert ("exact TOPK: 80 samples scored exactly" in plan) == (chosen == "exact")


def test_forced_routes_and_bad_config(indexed):
    for forced in ("exact", "index"):
        indexed.config["approx_route"] = forced
        try:
            plan = _plan(indexed, "EXPLAIN " + STMT.format(", error=0.05"))
            assert f"route: {forced} (config approx_route='{forced}')" in plan
        finally:
            indexed.config["approx_route"] = "auto"
    import metaql
    with pytest.raises(InvalidInputException, match="'auto', 'index' or 'exact'"):
        metaql.connect(":memory:", config={"approx_route": "fast"})


def test_an_index_without_costs_keeps_the_index_route(indexed):
    """An index built before its costs were timed: no estimate, the index route as before, and
    EXPLAIN says how to get one."""
    from metaql.approx.index import load_index
    saved = {}
    for ckpt in ("c0", "c1"):
        for layer, entry in load_index(indexed.store, ckpt).items():
            saved[(ckpt, layer)] = entry.pop("costs")
    try:
        plan = _plan(indexed, "EXPLAIN " + STMT.format(", error=0.05"))
        assert "route: index (the index was built before its costs were timed (build_index again" in plan
        indexed.execute(STMT.format(", error=0.05"))
        assert indexed.approximation["index"]["indexed"] == 4
    finally:
        for (ckpt, layer), costs in saved.items():
            load_index(indexed.store, ckpt)[layer]["costs"] = costs
