"""A store nobody calibrated gets per-layer cost fits in a background thread after a query on it
(engine/autocalibrate.py): kept by the next statement on a writable store, for the process on a
read-only one, never while a scan runs, stopped by close, off by config or environment."""
import shutil

import numpy as np
import pytest

import metaql
from metaql.engine import autocalibrate, calibrate, cost, plan
from metaql.storage import store as store_module
from tests.test_cost_model import BASE, _fake_measurements, _fast_timing, _kept, _store

QUERY = "SELECT * FROM INFLUENCE(layers=*, query=batch(test))"
UNFITTED = "base constants alone"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path = tmp_path_factory.mktemp("auto") / "s.mq"
    _store(path)
    return path


@pytest.fixture
def store(built, tmp_path, monkeypatch):
    """A copy of a tiny store, timed fast with fake base constants (tests/test_cost_model.py);
    every query counts as worth a calibration."""
    monkeypatch.setattr(calibrate, "measurements", _fake_measurements)
    monkeypatch.setattr(cost, "measure_base", lambda: dict(BASE))
    monkeypatch.setattr(store_module, "_MEASURED", {})
    _fast_timing(monkeypatch)
    monkeypatch.setattr(autocalibrate, "MIN_SECONDS", 0.0)
    monkeypatch.setattr(autocalibrate, "NICE", 0)     # not starved by the other jobs of a loaded machine
    monkeypatch.delenv(autocalibrate.ENV_KEY, raising=False)
    shutil.copytree(built, tmp_path / "s.mq")
    return tmp_path / "s.mq"


def _explain(con) -> str:
    return "\n".join(con.execute("EXPLAIN " + QUERY).arrow().column("plan").to_pylist())


def test_a_query_fits_its_layers_in_the_background_and_the_next_statement_keeps_them(store):
    with metaql.connect(store) as con:
        assert UNFITTED in _explain(con)
        first = con.execute(QUERY).arrow()
        job = autocalibrate.job_of(con.store)
        assert job is not None and job.done.wait(60) and job.error is None
        assert set(job.fits) == {"0"} and {"iterate", "batch_average"} <= set(job.fits["0"])
        assert UNFITTED not in _explain(con)                # the next statement uses and keeps them
        assert _kept(con)["layers"]["0"] == job.fits["0"]
        again = con.execute(QUERY).arrow()
    assert again.column("sample_id").to_pylist() == first.column("sample_id").to_pylist()
    # the fits may change the pick (another strategy, another float32 rounding), never the answer
    np.testing.assert_allclose(again.column("score").to_numpy(), first.column("score").to_numpy(), rtol=1e-5)
    with metaql.connect(store) as con:
        assert UNFITTED not in _explain(con)
        con.execute(QUERY)
        assert autocalibrate.job_of(con.store) is None       # fitted: nothing more to do


def test_a_read_only_store_uses_the_fits_in_this_process_only(store):
    with metaql.connect(store) as con:
        before = _kept(con)
    with metaql.connect(store, read_only=True) as con:
        con.execute(QUERY)
        assert autocalibrate.wait(con.store, 60)
        assert UNFITTED not in _explain(con)
        assert _kept(con) == before


@pytest.mark.parametrize("how", ["config", "env"])
def test_auto_calibration_can_be_turned_off(store, monkeypatch, how):
    config = {"auto_calibrate": False} if how == "config" else {}
    if how == "env":
        monkeypatch.setenv(autocalibrate.ENV_KEY, "0")
    with metaql.connect(store, config=config) as con:
        con.execute(QUERY)
        assert autocalibrate.job_of(con.store) is None
        assert UNFITTED in _explain(con)


def test_a_query_estimated_below_min_seconds_starts_none(store, monkeypatch):
    monkeypatch.setattr(autocalibrate, "MIN_SECONDS", 1e9)
    with metaql.connect(store) as con:
        con.execute(QUERY)
        assert autocalibrate.job_of(con.store) is None


def test_the_calibration_waits_while_a_scan_runs_and_stops_when_the_store_closes(store):
    """While a layer pass runs (here: one held open) the thread times nothing; closing the store
    ends it with nothing fitted and nothing written."""
    with metaql.connect(store) as con:
        plan._running(+1)
        try:
            con.execute(QUERY)
            job = autocalibrate.job_of(con.store)
            assert job is not None and not job.done.wait(0.2) and not job.fits
            con.close()
            assert job.done.wait(10) and not job.fits and job.error is None
        finally:
            plan._running(-1)
    with metaql.connect(store, read_only=True) as con:
        assert "layers" not in _kept(con)


def test_auto_calibrate_is_a_known_config_key():
    with pytest.raises(metaql.Error, match="auto_calibrate"):
        metaql.connect(":memory:", config={"auto_calibrat": True})


def test_the_calibration_waits_for_the_whole_statement_not_only_its_layer_passes(store, monkeypatch):
    """A statement's work outside its layer passes (here the query side's replay, held open for
    0.3 s; under error= also the index scan and the rescoring) does not share the machine with the
    calibration: before, only layer passes paused it, and its thread took 1.9-3.9 of the 6.2-12.4 s
    of CPU of a MiniLM TOPK under error=."""
    import threading
    import time
    from metaql.engine import executor
    stamps, stop = [], threading.Event()
    real_fit = calibrate.fit_layer

    def busy_fit(name, inputs, base):       # records when it runs, pausing as a timed run does
        while not stop.is_set():
            calibrate.pause()
            stamps.append(time.monotonic())
            time.sleep(0.002)
        return real_fit(name, inputs, base)

    monkeypatch.setattr(calibrate, "fit_layer", busy_fit)
    window = []
    real_sides = executor.query_sides

    def held_sides(*args, **kwargs):
        window.append(time.monotonic())
        time.sleep(0.3)
        window.append(time.monotonic())
        return real_sides(*args, **kwargs)

    with metaql.connect(store) as con:
        con.execute(QUERY)                                   # starts the calibration
        deadline = time.monotonic() + 30
        while not stamps and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stamps, "the calibration never ran"
        monkeypatch.setattr(executor, "query_sides", held_sides)
        con.execute(QUERY)
        stop.set()
        assert autocalibrate.wait(con.store, 60)
    start, end = window[0], window[1]
    inside = [t for t in stamps if start + 0.05 < t < end]
    assert not inside, f"the calibration ran {len(inside)} times during the statement's query side"
