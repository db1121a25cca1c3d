"""The cost model's per-strategy weights (engine/calibrate.py): fitted from micro-benchmarks of the
engine's operators, kept in the catalog's meta table, re-measured by PRAGMA metaql_calibrate, and
shown against the measured time by EXPLAIN ANALYZE."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import metaql
from metaql.engine import calibrate, cost
from metaql.engine.strategies import STRATEGIES
from metaql.storage import store as store_module

BASE = {"sec_per_flop": 1e-10, "sec_per_byte": 1e-9}


def test_fit_recovers_the_weights_that_made_the_timings():
    a, b = 3.0, 0.25
    points = [({"flops": f, "bytes": by}, a * f * BASE["sec_per_flop"] + b * by * BASE["sec_per_byte"])
              for f, by in ((1e9, 1e6), (1e6, 1e9), (5e8, 5e8))]
    w = calibrate.fit(points, BASE)
    assert w["flops"] == pytest.approx(a, rel=1e-6) and w["bytes"] == pytest.approx(b, rel=1e-6)


def test_seconds_weighs_flops_and_bytes_per_strategy_and_family():
    est = {"flops": 1e9, "bytes": 1e6}
    consts = {**BASE, "weights": {"conv": {"iterate": {"flops": 2.0, "bytes": 10.0}}}}
    assert cost.seconds(est, consts, "iterate", "conv") == pytest.approx(2 * 0.1 + 10 * 1e-3)
    # a kind of the linear family, and constants kept before the weights: the plain formula
    assert cost.seconds(est, consts, "iterate", "linear") == pytest.approx(0.1 + 1e-3)
    assert cost.seconds(est, BASE, "iterate", "conv") == pytest.approx(0.1 + 1e-3)


def _fake_measurements(family):
    """Timings of weights (2, 0.5) for every timed strategy: PRAGMA's test need not wait for the
    real micro-benchmarks (their fit is checked above, their use below)."""
    return {name: [({"flops": f, "bytes": by}, 2 * f * BASE["sec_per_flop"] + 0.5 * by * BASE["sec_per_byte"]) for f, by in ((1e9, 1e6), (1e6, 1e9))]
            for name in calibrate.TIMED}


def _store(path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    model.metaql_config = {}
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    with metaql.connect(path) as con:
        con.add_samples(np.arange(10), "train", y[:10].numpy(), x[:10])
        con.add_samples(10 + np.arange(2), "test", y[10:].numpy(), x[10:])
        with con.capture(model, layers=["0"], checkpoint="c0", lr=0.1) as cap:
            cap.backward(F.cross_entropy(model(x[:10]), y[:10]), np.arange(10))


def _kept(con):
    row = con.execute("SELECT value FROM meta WHERE key = 'cost_constants'").fetchone()
    return None if row is None else json.loads(row[0])


def test_pragma_calibrate_keeps_every_strategys_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(calibrate, "measurements", _fake_measurements)
    monkeypatch.setattr(cost, "measure_base", lambda: dict(BASE))
    monkeypatch.setattr(store_module, "_MEASURED", {})     # the fake constants stay in this test
    _store(tmp_path / "s.mq")
    with metaql.connect(tmp_path / "s.mq") as con:
        out = con.execute("PRAGMA metaql_calibrate").arrow()
        kept = _kept(con)
    assert kept["version"] == cost.MODEL_VERSION
    for family in calibrate.FAMILIES:
        assert set(kept["weights"][family]) == set(STRATEGIES) - {"recompute"}
        assert kept["weights"][family]["iterate"] == pytest.approx({"flops": 2.0, "bytes": 0.5})
    assert len(out) == 2 + 2 * len(calibrate.FAMILIES) * (len(STRATEGIES) - 1)


def test_pragma_calibrate_on_a_read_only_store_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(calibrate, "measurements", _fake_measurements)
    monkeypatch.setattr(cost, "measure_base", lambda: dict(BASE))
    monkeypatch.setattr(store_module, "_MEASURED", {})     # the fake constants stay in this test
    _store(tmp_path / "s.mq")
    with metaql.connect(tmp_path / "s.mq") as con:
        before = _kept(con)
    with metaql.connect(tmp_path / "s.mq", read_only=True) as con:
        con.execute("PRAGMA metaql_calibrate")
        assert _kept(con) == before


def test_explain_analyze_shows_estimate_against_measured(tmp_path, monkeypatch):
    """After PRAGMA metaql_calibrate, the estimates use the fitted weights, and EXPLAIN ANALYZE
    prints each pick's estimate next to its measured time."""
    monkeypatch.setattr(calibrate, "measurements", _fake_measurements)
    monkeypatch.setattr(cost, "measure_base", lambda: dict(BASE))
    monkeypatch.setattr(store_module, "_MEASURED", {})
    _store(tmp_path / "s.mq")
    sql = "EXPLAIN ANALYZE SELECT * FROM INFLUENCE(layers=*, query=batch(test))"
    with metaql.connect(tmp_path / "s.mq") as con:
        con.execute("PRAGMA metaql_calibrate")
        line = next(s for s in con.execute(sql).arrow().column("plan").to_pylist() if "c0/0" in s)
    assert "measured=" in line and "estimate " in line and "measured/estimate" in line, line
    pick = line.split(": ")[1].split()[0]
    shown = float(line.split(f"{pick}*=")[1].split("s")[0])
    est = cost.estimates(cost.Shapes(n=10, s=1, b=2, sq=1, din=5, dout=3, stored="factored"))[pick]
    assert shown == pytest.approx(2 * est["flops"] * BASE["sec_per_flop"] + 0.5 * est["bytes"] * BASE["sec_per_byte"],
                                  rel=1e-2), line
