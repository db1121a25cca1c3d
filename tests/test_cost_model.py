"""The cost model's per-strategy weights (engine/calibrate.py): fitted from micro-benchmarks of the
engine's operators, kept in the catalog's meta table, re-measured by PRAGMA metaql_calibrate, and
shown against the measured time by EXPLAIN ANALYZE."""
import json
import re

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


def _fast_timing(monkeypatch):
    """The micro-benchmarks' timer replaced by one run of the operator (the fit is checked above;
    here only what the PRAGMA keeps and how the optimizer uses it)."""
    import time

    def once(fn, runs=1, budget=0.0):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    monkeypatch.setattr(calibrate, "_timed", once)


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



def _faked_store(monkeypatch, path) -> None:
    """A store at `path` whose calibration reads fake timings and fake base constants, kept in this
    test (not in the process-wide cache)."""
    monkeypatch.setattr(calibrate, "measurements", _fake_measurements)
    monkeypatch.setattr(cost, "measure_base", lambda: dict(BASE))
    monkeypatch.setattr(store_module, "_MEASURED", {})
    _fast_timing(monkeypatch)
    _store(path)


def test_pragma_calibrate_keeps_every_strategys_weights(tmp_path, monkeypatch):
    _faked_store(monkeypatch, tmp_path / "s.mq")
    with metaql.connect(tmp_path / "s.mq") as con:
        out = con.execute("PRAGMA metaql_calibrate").arrow()
        kept = _kept(con)
    assert kept["version"] == cost.MODEL_VERSION
    exact = {name for name, s in STRATEGIES.items() if not s.approximate} - {"recompute"}
    for family in calibrate.FAMILIES:
        assert set(kept["weights"][family]) == exact
        assert kept["weights"][family]["iterate"] == pytest.approx({"flops": 2.0, "bytes": 0.5})
    per_layer = len(calibrate.LAYER_WEIGHTS) * sum(len(v) for v in kept["layers"].values())
    assert len(out) == 2 + 2 * len(calibrate.FAMILIES) * len(exact) + per_layer


def test_pragma_calibrate_on_a_read_only_store_writes_nothing(tmp_path, monkeypatch):
    _faked_store(monkeypatch, tmp_path / "s.mq")
    with metaql.connect(tmp_path / "s.mq") as con:
        before = _kept(con)
    with metaql.connect(tmp_path / "s.mq", read_only=True) as con:
        con.execute("PRAGMA metaql_calibrate")
        assert _kept(con) == before


def test_explain_analyze_shows_estimate_against_measured(tmp_path, monkeypatch):
    """EXPLAIN ANALYZE prints each pick's estimate next to its measured time, and their ratio."""
    _faked_store(monkeypatch, tmp_path / "s.mq")
    sql = "EXPLAIN ANALYZE SELECT * FROM INFLUENCE(layers=*, query=batch(test))"
    with metaql.connect(tmp_path / "s.mq") as con:
        con.execute("PRAGMA metaql_calibrate")
        line = next(s for s in con.execute(sql).arrow().column("plan").to_pylist() if "c0/0" in s)
    assert "measured=" in line and "estimate " in line and "measured/estimate" in line, line
    measured = float(re.search(r"measured=([0-9.e+-]+)s", line).group(1))
    estimate = float(re.search(r"\(estimate ([0-9.e+-]+)s", line).group(1))
    ratio = float(re.search(r"measured/estimate ([0-9.e+-]+)\)", line).group(1))
    assert ratio == pytest.approx(measured / estimate, rel=1e-2)


def test_explain_analyze_measures_by_the_clock_of_the_estimates(tmp_path):
    """At one torch thread the estimates predict the process's CPU time (cost.work_clock), so
    EXPLAIN ANALYZE's measured= is CPU time, with the wall time beside it."""
    _store(tmp_path / "s.mq")
    sql = "EXPLAIN ANALYZE SELECT * FROM INFLUENCE(layers=*, query=batch(test))"
    threads = torch.get_num_threads()
    try:
        with metaql.connect(tmp_path / "s.mq") as con:
            torch.set_num_threads(1)
            one = next(s for s in con.execute(sql).arrow().column("plan").to_pylist() if "c0/0" in s)
            torch.set_num_threads(2)
            two = next(s for s in con.execute(sql).arrow().column("plan").to_pylist() if "c0/0" in s)
    finally:
        torch.set_num_threads(threads)
    assert re.search(r"measured=[0-9.e+-]+s .*CPU time; wall [0-9.e+-]+s", one), one
    assert "measured=" in two and "CPU time" not in two, two


def test_explain_says_when_estimates_are_not_fitted_to_the_layers(tmp_path, monkeypatch):
    """Before PRAGMA metaql_calibrate the estimates come from two base constants alone (up to
    100x low for large intermediates): EXPLAIN says so and how to fit them; after it, not."""
    _faked_store(monkeypatch, tmp_path / "s.mq")
    sql = "EXPLAIN SELECT * FROM INFLUENCE(layers=*, query=batch(test))"
    with metaql.connect(tmp_path / "s.mq") as con:
        before = "\n".join(con.execute(sql).arrow().column("plan").to_pylist())
        con.execute("PRAGMA metaql_calibrate")
        after = "\n".join(con.execute(sql).arrow().column("plan").to_pylist())
    assert "base constants alone" in before and "PRAGMA metaql_calibrate" in before, before
    assert "base constants alone" not in after, after


def test_pragma_calibrate_fits_each_layer_on_its_own_factors(tmp_path, monkeypatch):
    """Every stored layer gets a fit per strategy (fixed seconds per chunk, the weights of the scan
    and query-row parts of the formula, the query side's seconds), and the optimizer's estimate for
    that layer is engine.cost.layer_seconds of it."""
    _faked_store(monkeypatch, tmp_path / "s.mq")
    with metaql.connect(tmp_path / "s.mq") as con:
        con.execute("PRAGMA metaql_calibrate")
        kept = _kept(con)
        line = next(s for s in con.execute("EXPLAIN SELECT * FROM INFLUENCE(layers=*, query=batch(test))").arrow()
                    .column("plan").to_pylist() if "c0/0" in s)
    fits = kept["layers"]["0"]
    assert {"iterate", "batch_average", "reconstruct", "self_gram", "self_full"} <= set(fits)
    assert all(f[k] >= 0 for f in fits.values() for k in calibrate.LAYER_WEIGHTS)
    assert all(f["scan"] + f["query"] > 0 and f["rows"] >= 1 for f in fits.values())
    sh = cost.Shapes(n=10, s=1, b=2, sq=1, din=5, dout=3, stored="factored")
    want = cost.layer_seconds(fits["iterate"], "iterate", sh, kept)
    shown = re.search(r"\biterate\*?=([0-9.e+-]+)s", line)
    assert shown and float(shown.group(1)) == pytest.approx(want, rel=1e-2), line


# ---- the formula's structure: how estimates scale with N, B and the layer's dims -----------------------
SH = cost.Shapes(n=100, s=4, b=8, sq=4, din=33, dout=16, stored="factored")


def _split(name, **kw):
    from dataclasses import replace
    return cost.split(STRATEGIES[name].estimate, replace(SH, **kw), BASE)


def test_iterates_scan_part_ignores_b_and_its_query_part_grows_with_n_and_b():
    scan, query = _split("iterate")
    assert scan > 0 and query > 0
    assert _split("iterate", b=32)[0] == pytest.approx(scan)
    assert _split("iterate", b=32)[1] == pytest.approx(4 * query)
    assert _split("iterate", sq=8)[1] == pytest.approx(2 * query)
    assert _split("iterate", n=300)[0] == pytest.approx(3 * scan)
    assert _split("iterate", n=300)[1] == pytest.approx(3 * query)
    assert _split("iterate", b=0)[1] == 0


@pytest.mark.parametrize("name", ["batch_average", "reconstruct", "self_gram", "self_full"])
def test_a_strategy_without_query_rows_has_no_query_part_and_scales_with_n(name):
    scan, query = _split(name)
    assert query == 0 and scan > 0
    assert _split(name, b=64) == pytest.approx((scan, 0.0))         # the query side is built once
    assert _split(name, n=400)[0] == pytest.approx(4 * scan)


def test_batch_average_and_reconstruct_scale_with_the_layers_parameters():
    """Lemma 7 costs S x din x dout per sample, reconstruct (S + 1) x din x dout plus the built
    gradient's traffic: doubling dout doubles their flops part."""
    for name in ("batch_average", "reconstruct"):
        one = STRATEGIES[name].estimate(cost.Shapes(n=50, s=4, b=0, sq=4, din=33, dout=16, stored="factored"))
        two = STRATEGIES[name].estimate(cost.Shapes(n=50, s=4, b=0, sq=4, din=33, dout=32, stored="factored"))
        assert two["flops"] == pytest.approx(2 * one["flops"])


FIT = {"fixed": 1e-4, "scan": 2.0, "query": 0.5, "prep": 1e-3, "prep_each": 1e-4, "rows": 64}


def test_layer_seconds_is_fixed_per_chunk_plus_weighted_parts_plus_the_query_side():
    from dataclasses import replace
    scan, query = cost.split(STRATEGIES["iterate"].estimate, SH, BASE)
    want = 1e-4 * 2 + 2.0 * scan + 0.5 * query + 1e-3 + 1e-4 * 8       # 100 samples: 2 chunks of 64
    assert cost.layer_seconds(FIT, "iterate", SH, BASE) == pytest.approx(want)
    # N x 64: the per-sample parts and the chunks grow 64-fold, the query side not at all
    big = cost.layer_seconds(FIT, "iterate", replace(SH, n=6400), BASE)
    assert big == pytest.approx(1e-4 * 100 + 64 * (2.0 * scan + 0.5 * query) + 1e-3 + 1e-4 * 8)
    # no query (self-influence): no query side
    assert cost.layer_seconds(FIT, "self_gram", replace(SH, b=0), BASE) == pytest.approx(
        1e-4 * 2 + 2.0 * cost.split(STRATEGIES["self_gram"].estimate, replace(SH, b=0), BASE)[0])


def test_seconds_uses_the_layers_fit_with_shapes_and_the_family_weights_without():
    consts = {**BASE, "layers": {"fc": {"iterate": FIT}}}
    est = STRATEGIES["iterate"].estimate(SH)
    assert cost.seconds(est, consts, "iterate", "linear", "fc", SH) == pytest.approx(
        cost.layer_seconds(FIT, "iterate", SH, consts))
    assert cost.seconds(est, consts, "iterate", "linear", "other", SH) == pytest.approx(cost.plain_seconds(est, BASE))


def test_fit_terms_recovers_the_weights_that_made_the_timings():
    """Timings made by known weights (fixed per chunk, scan, query) at the points a layer's
    calibration takes (two N at B = 1, two at a larger B) give those weights back."""
    rows = [[1, 1e-3, 1e-4], [1, 4e-3, 4e-4], [1, 1e-3, 3e-3], [2, 4e-3, 1.2e-2]]
    w = (2e-4, 1.5, 0.7)
    points = [(r, w[0] * r[0] + w[1] * r[1] + w[2] * r[2]) for r in rows]
    got = calibrate._fit_terms(points)
    assert (got["fixed"], got["scan"], got["query"]) == pytest.approx(w, rel=1e-6)


def test_fit_terms_ignores_a_query_part_that_is_rounding():
    """A strategy whose formula has no query part gives split() rounding at most; no weight may be
    fitted to it (one was 7e17)."""
    points = [([1, 1e-3, 0.0], 3e-3), ([1, 4e-3, 0.0], 9e-3)]
    got = calibrate._fit_terms(points)
    assert got["scan"] == pytest.approx(2.0) and got["query"] == 1.0


def test_sizes_time_a_querys_chunk_within_the_point_budget(monkeypatch):
    """The larger size is the chunk a query runs (n_max) when that is cheap, else what takes about
    POINT_SECONDS; the smaller a quarter of it."""
    clock = [0.0]
    monkeypatch.setattr(calibrate, "_clock", lambda: clock[0])

    def run_at(per):
        def run(n):
            clock[0] += n * per
        return run
    assert calibrate._sizes(run_at(1e-6), 200) == [50, 200]
    big = int(calibrate.POINT_SECONDS / 2 ** -6)          # a binary fraction: no rounding
    assert calibrate._sizes(run_at(2 ** -6), 200) == [max(1, big // 4), big]
    assert calibrate._sizes(run_at(10.0), 200) == [1]


def test_pragma_fits_layers_against_the_base_constants_it_keeps(tmp_path, monkeypatch):
    """The layer weights are relative to the base constants: the PRAGMA measures them once and
    keeps those (a second measurement, noisy on a shared machine, scaled every estimate)."""
    calls = []

    def base():
        calls.append(1)
        return {"sec_per_flop": 1e-10 * len(calls), "sec_per_byte": 1e-9 * len(calls)}
    monkeypatch.setattr(calibrate, "measurements", _fake_measurements)
    monkeypatch.setattr(cost, "measure_base", base)
    monkeypatch.setattr(store_module, "_MEASURED", {})
    _fast_timing(monkeypatch)
    _store(tmp_path / "s.mq")
    with metaql.connect(tmp_path / "s.mq") as con:
        con.execute("PRAGMA metaql_calibrate")
    assert len(calls) == 1


def test_query_weight_interpolates_in_log_b_between_the_timed_batches():
    fit = {**FIT, "query": 1.0, "query_large": 3.0, "query_b": [32, 128]}
    assert cost.query_weight(fit, 8) == 1.0 and cost.query_weight(fit, 32) == 1.0
    assert cost.query_weight(fit, 64) == pytest.approx(2.0)          # halfway in log B
    assert cost.query_weight(fit, 512) == 3.0
    assert cost.query_weight(FIT, 512) == FIT["query"]                 # not timed at a large batch


def test_a_layers_timed_runs_pass_the_cache_when_max_rows_samples_fit_in_it(monkeypatch):
    """A query streams the stored factors from memory; timed runs over a cache-sized head read them
    from the cache (the MLP's 4096 x 4096 layer: 256 samples are 8 MB, and a point query took 2.1-3x
    its estimate). The largest timed size covers twice the cache where the shard allows."""
    from metaql.engine.executor import chunk_rows
    monkeypatch.setattr(calibrate, "cache_bytes", lambda: 2 ** 20, raising=False)
    asked = []

    def sizes(run, n_max):
        asked.append(n_max)
        return [n_max]
    monkeypatch.setattr(calibrate, "_sizes", sizes)
    monkeypatch.setattr(calibrate, "_timed", lambda fn, runs=1, budget=0.0: 1e-3)
    from metaql.storage.layers import find_kind
    layer = torch.nn.Linear(255, 256)           # 2 KB per sample (X with its bias column, and D)
    kind = find_kind(layer)[0]
    meta = kind.meta("big", layer)
    tensors = calibrate._factors(kind, layer, 2048, (1, 255))
    calibrate._layer_fit("iterate", kind, meta, "factored", tensors, BASE)
    step = chunk_rows(tensors, None, "iterate", meta)
    assert asked[0] > calibrate.MAX_ROWS                # 256 samples are 0.5 MB: timed past 2 MB
    per_sample = sum(t[:1].numel() * t.element_size() for t in tensors.values())
    assert calibrate.timed_rows(tensors) == -(-2 * 2 ** 20 // per_sample)
    assert asked[0] == min(calibrate.timed_rows(tensors), 2047, step)
