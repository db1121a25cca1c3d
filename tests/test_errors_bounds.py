"""Every error a metaql.Error, every argument bounded at bind time, cancel and recovery (issue #16)."""
import json
import os
import signal
import threading
import time
import warnings
from typing import Annotated

import numpy as np
import pytest
import torch

import metaql
from metaql.storage.store import Store
from tests.fuzzing import small_store


@pytest.fixture(scope="module")
def con():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = small_store()
    yield c
    c.close()


def _error(con, statement, params=None):
    with pytest.raises(metaql.Error) as info:
        con.execute(statement, params).fetchall()
    return info.value


# ---- the parser: lark's VisitError and RecursionError become ParserExceptions with a position --------
def test_a_duplicate_argument_is_a_parser_error_at_its_position(con):
    e = _error(con, "SELECT * FROM SELF_INFLUENCE(layers=[fc1],\n  layers=[fc2])")
    assert isinstance(e, metaql.ParserException)
    assert "'layers' is given twice" in str(e) and (e.line, e.column) == (2, 3)
    e = _error(con, "SELECT TOPK(3) train FROM INFLUENCE(query=batch(test), query=point(1)) ORDER BY ASC")
    assert isinstance(e, metaql.ParserException) and "given twice" in str(e)


@pytest.mark.parametrize("digits", [401, 5000])
def test_a_number_too_long_is_a_parser_error(con, digits):
    for statement in (f"SELECT * FROM SELF_INFLUENCE(layers=[{'1' * digits}])",
                      f"SELECT TOPK({'9' * digits}) train FROM SELF_INFLUENCE() ORDER BY ASC"):
        e = _error(con, statement)
        assert isinstance(e, metaql.ParserException) and "too long" in str(e) and e.column is not None
        assert len(str(e)) < 400       # the caret shows a window, not 5,000 digits


@pytest.mark.parametrize("opener", ["[", "point("])
def test_deep_nesting_is_a_parser_error_not_a_recursion_error(con, opener):
    closer = "]" if opener == "[" else ")"
    e = _error(con, f"SELECT * FROM SELF_INFLUENCE(layers={opener * 1000}fc1{closer * 1000})")
    assert isinstance(e, metaql.ParserException) and "nested more than 32" in str(e)
    assert (e.line, e.column) == (1, 36 + 32 * len(opener))     # SELF_INFLUENCE( is the first level
    depth_ok = f"SELECT * FROM SELF_INFLUENCE(layers={'[' * 20}fc1{']' * 20})"
    assert isinstance(_error(con, depth_ok), metaql.BinderException)   # parsed; the binder refuses the list


def test_a_float_literal_beyond_a_double_is_refused(con):
    e = _error(con, "SELECT * FROM ELITE(data=train, labeled=val, lr=1e999)")
    assert isinstance(e, metaql.ParserException) and "too large" in str(e)


# ---- the binder: ranges, int64, finite floats ------------------------------------------------------------
def test_elite_epochs_beyond_its_range_is_refused_at_bind_time(con):
    # 'train' holds labels 0..2, which ELITE refuses when it reads the data: a BinderException
    # proves the bound is checked first, before any sample is read or any epoch runs
    t0 = time.perf_counter()
    for epochs in (2 ** 63 - 1, 2 ** 64, 10 ** 30, 0, -1):
        e = _error(con, f"SELECT * FROM ELITE(data=test, labeled=train, epochs={epochs})")
        assert isinstance(e, metaql.BinderException) and "epochs=" in str(e), str(e)
    assert "[1, 10_000]" in str(_error(con, "SELECT * FROM ELITE(data=test, labeled=train, epochs=10001)"))
    assert time.perf_counter() - t0 < 5


def test_lancet_steps_and_budget_beyond_their_range_are_refused_at_bind_time(con):
    # the pool 'test' has no human label, which LANCET refuses when it reads the labels: a
    # BinderException proves the bounds come first
    for statement in ("SELECT * FROM LANCET_STATUS(pool=test, steps=1" + "0" * 30 + ")",
                      "SELECT * FROM LANCET_STATUS(pool=test, steps=2000000)",
                      "SELECT * FROM LANCET(pool=test, num_classes=" + str(2 ** 63) + ")",
                      "SELECT * FROM LANCET_CANDIDATES(pool=test, budget=" + str(2 ** 63 - 1) + ")",
                      "SELECT * FROM LANCET_CANDIDATES(pool=test, seed=-1)"):
        e = _error(con, statement)
        assert isinstance(e, metaql.BinderException), f"{statement}: {type(e).__name__} {e}"


def test_floats_must_be_finite_and_ints_whole(con):
    e = _error(con, "SELECT * FROM ELITE(data=test, labeled=train, lr=?)", [float("nan")])
    assert isinstance(e, metaql.BinderException) and "finite" in str(e)
    e = _error(con, f"SELECT * FROM ELITE(data=test, labeled=train, lr={10 ** 350})")   # OverflowError before
    assert isinstance(e, metaql.BinderException) and "finite" in str(e)
    e = _error(con, "SELECT * FROM ELITE(data=test, labeled=train, normal_label=?)", [2 ** 64])
    assert isinstance(e, metaql.BinderException) and "whole number in [-9_223" in str(e)
    assert isinstance(_error(con, "SELECT * FROM ELITE(data=test, labeled=train, epochs=?)", [np.int64(0)]),
                      metaql.BinderException)


def test_null_is_no_value_for_a_typed_argument(con):
    e = _error(con, "SELECT * FROM ELITE(data=train, labeled=val, epochs=?)", [None])   # a TypeError before
    assert isinstance(e, metaql.BinderException) and "NULL" in str(e)


@pytest.mark.parametrize("sid", ["1.5", "1e308", "'x'", str(2 ** 63), "[1]"])
def test_point_takes_a_whole_sample_id(con, sid):
    e = _error(con, f"SELECT * FROM INFLUENCE(query=point({sid}))")
    assert isinstance(e, metaql.BinderException) and "point(id)" in str(e)


def test_topk_is_bounded(con):
    for k in ("0", str(2 ** 31), "1" + "0" * 30):
        e = _error(con, f"SELECT TOPK({k}) train FROM SELF_INFLUENCE() ORDER BY ASC")
        assert isinstance(e, metaql.BinderException) and "TOPK(n)" in str(e)
        assert ("at least one" in str(e)) == (k == "0"), str(e)   # TOPK(0) was told to use a smaller count
    assert len(con.execute(f"SELECT TOPK({2 ** 31 - 1}) train FROM SELF_INFLUENCE() ORDER BY ASC").fetchall()) == 32
    # the bound shown is the one checked: torch.topk's int32 k, 2**31 - 1 (it said 2_147_483_648)
    assert "[1, 2_147_483_647]" in str(_error(con, f"SELECT TOPK({2 ** 31}) train FROM SELF_INFLUENCE() ORDER BY ASC"))
    assert ("topk", "int in [1, 2_147_483_647]") in [r[:2] for r in con.execute("DESCRIBE INFLUENCE").fetchall()]


def test_empty_and_nested_lists_are_refused(con):
    e = _error(con, "SELECT * FROM SELF_INFLUENCE(layers=[])")
    assert isinstance(e, metaql.BinderException) and "at least one layer, or layers=*" in str(e)
    e = _error(con, "SELECT * FROM SELF_INFLUENCE(checkpoints=[])")
    assert isinstance(e, metaql.BinderException) and "checkpoints=all" in str(e)
    e = _error(con, "SELECT * FROM SELF_INFLUENCE(layers=[[fc1]])")
    assert isinstance(e, metaql.BinderException) and "layer names" in str(e)


def test_parameter_zero_is_an_error_not_the_last_parameter(con):
    e = _error(con, "SELECT * FROM SELF_INFLUENCE(train=$0)", [])
    assert isinstance(e, metaql.BinderException) and "from $1" in str(e)


def test_describe_shows_ranges(con):
    described = dict((a, t) for a, t, _ in con.execute("DESCRIBE ELITE").fetchall())
    assert described["epochs"] == "int in [1, 10_000]" and described["lr"] == "float in (0, 10]"
    described = dict((a, t) for a, t, _ in con.execute("DESCRIBE LANCET_STATUS").fetchall())
    assert described["steps"] == "int in [1, 1_000_000]" and described["alpha_t"] == "float in (0, 1)"


def test_a_user_function_declares_its_range(con):
    from metaql.engine.functions import Range   # annotations evaluate here (no __future__ import)

    def ranged(ctx, n: Annotated[int, Range(1, 5)] = 1, x: Annotated[float, Range(0, 1, open_high=True)] = 0.0):
        return {"n": [n], "x": [x]}
    con.register_function(ranged, replace=True)
    assert con.execute("SELECT * FROM ranged(n=5, x=0.5)").fetchall() == [(5, 0.5)]
    for bad in ("n=6", "n=0", "x=1", "x=-0.1"):
        assert isinstance(_error(con, f"SELECT * FROM ranged({bad})"), metaql.BinderException)
    assert ("n", "int in [1, 5]", "1") in con.execute("DESCRIBE ranged").fetchall()


# ---- the last resort: nothing but metaql.Error leaves a statement ---------------------------------------
@pytest.mark.parametrize("exc", [KeyError("k"), IndexError("list index out of range"), TypeError("t"),
                                 ValueError("v"), OverflowError("o"), json.JSONDecodeError("bad", "{", 0)])
def test_a_bug_in_a_table_function_is_an_internal_exception(con, exc):
    def broken(ctx):
        raise exc
    con.register_function(broken, replace=True)
    e = _error(con, "SELECT * FROM broken()")
    assert isinstance(e, metaql.InternalException) and type(exc).__name__ in str(e)
    assert e.__cause__ is exc                 # the original traceback is chained
    assert con.execute("SELECT count(*) FROM samples").fetchone() == (48,)


def test_duckdb_errors_map_to_their_metaql_classes(con):
    assert isinstance(_error(con, "SELECT 'a'::INT"), metaql.InvalidInputException)
    assert isinstance(_error(con, "SELECT * FROM nosuch"), metaql.CatalogException)
    assert isinstance(_error(con, "SELEC 1"), metaql.ParserException)


def test_a_statement_that_is_not_a_string_is_a_programming_error(con):
    with pytest.raises(metaql.ProgrammingError, match="string"):
        con.execute(None)


def test_the_shell_prints_an_internal_error_cleanly(con):
    from metaql.shell import error_text

    def broken(ctx):
        raise KeyError("k")
    con.register_function(broken, replace=True)
    text = error_text(_error(con, "SELECT * FROM broken()"))
    assert text.startswith("INTERNAL Error: builtins.KeyError: 'k'") and "Traceback" not in text


# ---- data in: labels and lr; data out: finite scores --------------------------------------------------
def test_add_samples_refuses_non_integral_labels(store_dir):
    with metaql.connect(store_dir) as c:
        with pytest.raises(metaql.InvalidInputException, match="whole class indices"):
            c.add_samples([0, 1], "train", labels=np.array([0.9, 1.0]))
        with pytest.raises(metaql.InvalidInputException, match="whole class indices"):
            c.add_samples([0, 1], "train", labels=[1.0, float("nan")])
        assert c.execute("SELECT count(*) FROM samples").fetchone() == (0,)
        c.add_samples([0, 1], "train", labels=np.array([1.0, 2.0]))
        assert c.execute("SELECT label FROM samples ORDER BY 1").fetchall() == [(1,), (2,)]


def test_capture_refuses_an_lr_that_would_overflow_scores(store_dir):
    from tests.models import MLP
    with metaql.connect(store_dir) as c:
        c.add_samples([0, 1], "train", labels=[0, 1], inputs=torch.randn(2, 6))
        for lr in (1e308, -1e7, float("inf")):
            with pytest.raises(metaql.InvalidInputException, match="lr must be a finite number"):
                with c.capture(MLP(), checkpoint="c0", lr=lr):
                    pass


def test_non_finite_scores_are_refused_naming_layer_and_checkpoint(store_dir):
    import torch.nn.functional as F

    from tests.models import MLP
    torch.manual_seed(0)
    model, x, y = MLP(), torch.randn(8, 6), torch.randint(0, 3, (8,))
    with torch.no_grad():
        model.fc2.weight.mul_(1e30)       # gradients of ~1e30 per sample: their products overflow doubles
    with metaql.connect(store_dir) as c:
        c.add_samples(np.arange(8), "train", y.numpy(), x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with c.capture(model, checkpoint="c0", lr=1.0) as cap:
                cap.backward(F.cross_entropy(model(x), y), np.arange(8))
        with pytest.raises(metaql.InvalidInputException, match="layer fc1 at checkpoint c0 are not finite"):
            c.execute("SELECT * FROM SELF_INFLUENCE(layers=[fc1])").fetchall()


# ---- cancel and recovery ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cancel", ["interrupt", "ctrl-c"])
def test_a_statement_after_a_cancelled_influence_works(con, monkeypatch, cancel):
    """A cancel that lands while INFLUENCE reads the catalog leaves DuckDB an interrupted execute()
    result; its complete() re-raised the interrupt in every later statement."""
    reference = con.execute("SELECT TOPK(5) train FROM INFLUENCE(query=batch(test)) ORDER BY ASC").fetchall()
    original = Store.factor_shards

    def cancelled_mid_read(self, checkpoint, layer):
        pending = self.db.execute("SELECT * FROM range(10000000000)")
        if cancel == "interrupt":
            con.interrupt()                       # as from another thread
        else:
            os.kill(os.getpid(), signal.SIGINT)   # the statement runs in the main thread: its handler
        pending.fetchall()
        return original(self, checkpoint, layer)
    monkeypatch.setattr(Store, "factor_shards", cancelled_mid_read)
    with pytest.raises(metaql.InterruptException, match="cancelled"):
        con.execute("SELECT TOPK(5) train FROM INFLUENCE(query=batch(test)) ORDER BY ASC")
    monkeypatch.setattr(Store, "factor_shards", original)
    assert con.execute("SELECT count(*) FROM samples").fetchone() == (48,)
    assert con.execute("SHOW SETS").fetchall()
    assert con.execute("SELECT TOPK(5) train FROM INFLUENCE(query=batch(test)) ORDER BY ASC").fetchall() == reference


def test_a_loop_that_reports_progress_stops_at_a_cancel(con):
    """LANCET's training steps run under ctx.progress: a cancel stops them at the next step."""
    def slow(ctx, steps: int = 3000):
        for _ in ctx.progress(range(steps), total=steps, desc="slow"):
            time.sleep(0.001)
        return {"steps": [steps]}
    con.register_function(slow, replace=True)
    timer = threading.Timer(0.2, con.interrupt)
    timer.start()
    t0 = time.perf_counter()
    with pytest.raises(metaql.InterruptException):
        con.execute("SELECT * FROM slow()")
    timer.join()
    assert time.perf_counter() - t0 < 2
    assert con.execute("SELECT * FROM slow(steps=2)").fetchall() == [(2,)]


def test_set_queries_of_non_integer_or_null_ids_are_binder_errors():
    with metaql.connect(":memory:") as con:
        con.add_samples(np.arange(4), "train", labels=[0, 1, 0, 1])
        for query in ("SELECT 'x'", "SELECT NULL", "SELECT 1.5 AS sample_id"):
            with pytest.raises(metaql.BinderException, match="integer sample ids"):
                con.execute(f"CREATE SET s AS {query}")
        con.execute("CREATE SET s AS SELECT sample_id FROM samples WHERE label = 1")
        assert con.execute("SELECT size FROM sets").fetchall() == [(2,)]


def test_labels_are_whole_numbers_of_registered_samples():
    with metaql.connect(":memory:") as con:
        con.add_samples(np.arange(4), "train", labels=[0, 1, 0, 1])
        with pytest.raises(metaql.InvalidInputException, match="whole number"):
            con.label([1], [0.9])                    # was stored as label 0
        with pytest.raises(metaql.InvalidInputException, match="not registered"):
            con.label([99], [1])
        with pytest.raises(metaql.InvalidInputException, match="not registered"):
            con.execute("INSERT INTO labels (sample_id, label) VALUES (999, 0)")
        assert con.label([1], [1.0]) == 1
        assert con.execute("SELECT sample_id, label FROM labels").fetchall() == [(1, 1)]


def test_labels_inserted_through_sql_are_whole_numbers_not_rounded():
    with metaql.connect(":memory:") as con:
        con.add_samples(np.arange(4), "train", labels=[0, 1, 0, 1])
        for values in ("(1, 1.7)", "(2, 0.5)", "(3, '2.6')"):       # stored as 2, 1 (or 0) and 3 before
            with pytest.raises(metaql.InvalidInputException, match="whole number"):
                con.execute(f"INSERT INTO labels (sample_id, label) VALUES {values}")
        con.execute("INSERT INTO labels (sample_id, label) VALUES (1, 2.0), (2, '3')")
        assert con.execute("SELECT sample_id, label FROM labels ORDER BY 1").fetchall() == [(1, 2), (2, 3)]


def test_python_api_arguments_and_catalog_errors_are_metaql_errors(tmp_path):
    torch.manual_seed(0)
    with metaql.connect(str(tmp_path / "s.mq"), config={"progress": False}) as con:
        con.add_samples(np.arange(8), "train", labels=np.arange(8) % 3, inputs=torch.randn(8, 6))
        from tests.models import MLP
        model = MLP()
        with pytest.raises(metaql.InvalidInputException, match="shard_size"):
            con.capture(model, checkpoint="c0", shard_size=0)
        con.checkpoint(model, "c0", lr=0.1)
        for call in (lambda: con.update_predictions(batch_size=0),            # was ValueError
                     lambda: con.replay("c0", batch_size=0),                     # was ZeroDivisionError
                     lambda: con.replay("c0", shard_size=-1),
                     lambda: con.label([0], [1], by=5),                          # was TypeError
                     lambda: con.add_samples([100], None)):                      # was a raw duckdb error
            with pytest.raises(metaql.InvalidInputException):
                call()
        assert con.verify() == []


def test_unknown_config_keys_are_refused_with_a_hint():
    with pytest.raises(metaql.InvalidInputException, match="unknown config key 'progres'. Did you mean 'progress'"):
        metaql.connect(":memory:", config={"progres": False})        # a typo was silently ignored
    with pytest.raises(metaql.InvalidInputException, match="true or false"):
        metaql.connect(":memory:", config={"progress": "no"})
    with metaql.connect(":memory:", config={"progress": False, "device": "cpu"}) as con:
        assert con.execute("SELECT 1").fetchall() == [(1,)]
