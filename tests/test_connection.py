"""The DuckDB-style Python API: execute/sql, fetch methods, parameters, functions, errors."""
import numpy as np
import pyarrow as pa
import pytest
import torch

import metaql
from metaql.engine.functions import SetName


@pytest.fixture
def con():
    c = metaql.connect(":memory:")
    c.add_samples(np.arange(5), "train", [0, 1, 0, 1, 1], torch.zeros(5, 2), columns={"w": [1.0, 2, 3, 4, 5]})
    yield c
    c.close()


def test_fetch_methods(con):
    assert con.execute("SELECT sample_id, w FROM samples ORDER BY sample_id") is con
    assert con.fetchone() == (0, 1.0)
    assert con.fetchmany(2) == [(1, 2.0), (2, 3.0)]
    assert con.fetchall() == [(3, 4.0), (4, 5.0)]
    assert con.description[0][0] == "sample_id"
    rel = con.sql("SELECT label, count(*) AS n FROM samples GROUP BY label ORDER BY label")
    assert rel.df()["n"].tolist() == [2, 3]
    assert isinstance(rel.arrow(), pa.Table)
    assert rel.fetchnumpy()["label"].tolist() == [0, 1]
    assert rel.torch()["n"].tolist() == [2, 3]


def test_parameters_are_bound_not_formatted(con):
    con.execute("CREATE SET heavy AS SELECT sample_id FROM samples WHERE w > ?", [2.5])
    assert con.execute("SELECT size FROM sets").fetchone() == (3,)
    evil = "x'; DROP TABLE samples; --"
    assert con.execute("SELECT count(*) FROM samples WHERE split = ?", [evil]).fetchone() == (0,)
    assert con.execute("SELECT count(*) FROM samples").fetchone() == (5,)


def test_user_table_function(con):
    def heavy(ctx, data: SetName, above: float = 0.0) -> pa.Table:
        """Samples of a set whose weight is above a threshold."""
        ids = ctx.store.set_ids(data)
        w = ctx.store.sample_columns(ids, ["w"])["w"]
        return pa.table({"sample_id": ids[w > above], "w": w[w > above]})

    con.register_function(heavy)
    assert con.execute("SELECT sample_id FROM heavy(data=train, above=3.5) ORDER BY sample_id").fetchall() == [(3,), (4,)]
    assert con.execute("SELECT count(*) FROM heavy(train) AS h JOIN samples USING (sample_id) "
                       "WHERE label = 1").fetchone() == (3,)
    names = [r[0] for r in con.execute("SHOW FUNCTIONS").fetchall()]
    assert {"HEAVY", "INFLUENCE", "SELF_INFLUENCE"} <= set(names)
    assert con.execute("DESCRIBE heavy").fetchall() == [("data", "SetName", "(required)"), ("above", "float", "0.0")]
    with pytest.raises(metaql.BinderException, match="above= should be a number"):
        con.execute("SELECT * FROM heavy(data=train, above='lots')")
    with pytest.raises(metaql.BinderException, match="needs the argument"):
        con.execute("SELECT * FROM heavy(above=1)")


def test_closed_connection_and_context_manager():
    with metaql.connect(":memory:") as c:
        c.execute("SELECT 1")
    with pytest.raises(metaql.ProgrammingError, match="closed"):
        c.execute("SELECT 1")


def test_module_constants():
    assert metaql.apilevel == "2.0" and metaql.paramstyle == "qmark" and metaql.threadsafety == 1
    assert issubclass(metaql.ParserException, metaql.ProgrammingError)
    assert issubclass(metaql.ProgrammingError, metaql.Error)


def test_sql_is_lazy_and_cursors_are_independent(con):
    rel = con.sql("CREATE SET heavy AS SELECT sample_id FROM samples WHERE w > 3")
    assert con.execute("SELECT count(*) FROM sets").fetchone() == (0,)   # not run yet
    assert rel.fetchall() == [("set heavy: 2 samples",)]
    with pytest.raises(metaql.ParserException):
        con.sql("SELECT TOPK(3 train FROM INFLUENCE(query=batch(x))")
    cur = con.cursor()
    cur.execute("SELECT 1 AS a")
    con.execute("SELECT 2 AS b")
    assert cur.fetchall() == [(1,)] and con.fetchall() == [(2,)]
    cur.close()
    assert con.execute("SELECT count(*) FROM samples").fetchone() == (5,)   # closing a cursor keeps the store


def test_interrupt_stops_a_running_query_cleanly(store_dir):
    import threading

    import torch.nn.functional as F

    from tests.models import MLP
    torch.manual_seed(0)
    model, x, y = MLP(), torch.randn(3000, 6), torch.randint(0, 3, (3000,))
    with metaql.connect(store_dir) as c:
        c.add_samples(np.arange(3000), "train", y.numpy(), x)
        with c.capture(model, checkpoint="c0", shard_size=8) as cap:
            for part in np.array_split(np.arange(3000), 30):
                cap.backward(F.cross_entropy(model(x[part]), y[part]), part)
        # an interrupt that lands after a statement's last check lets it finish (as DuckDB's does):
        # keep interrupting until one lands during a scan
        stop = threading.Event()

        def keep_interrupting():
            while not stop.wait(0.02):
                c.interrupt()
        thread = threading.Thread(target=keep_interrupting)
        thread.start()
        try:
            with pytest.raises(metaql.InterruptException, match="cancelled"):
                for _ in range(200):
                    c.execute("SELECT * FROM SELF_INFLUENCE()")
        finally:
            stop.set()
            thread.join()
        assert c.execute("SELECT count(*) FROM samples").fetchone() == (3000,)


def test_label_records_who_and_when_and_never_silently_overwrites(con):
    assert con.label([0, 1], [3, 4], by="ann") == 2
    assert con.execute("SELECT sample_id, label, labeled_by FROM labels ORDER BY 1").fetchall() == [(0, 3, "ann"), (1, 4, "ann")]
    with pytest.raises(metaql.InvalidInputException):
        con.label([1], [5])
    assert con.execute("SELECT label FROM labels WHERE sample_id = 1").fetchone() == (4,)
    with pytest.raises(metaql.Error):
        con.execute("INSERT INTO labels (sample_id, label) VALUES (0, 9)")   # the primary key refuses it
