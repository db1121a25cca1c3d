"""What a replay costs (storage/replay.py): a line a + b x samples per batch, fitted to this
process's replays of the model, prices the query side in EXPLAIN and a two-phase TOPK's rescoring
in EXPLAIN ANALYZE; before two batch sizes were seen there is no estimate, and EXPLAIN says so."""
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import metaql
from metaql.storage import replay
from metaql.storage.replay import affine_fit, replay_seconds
from tests.models import MLP


def test_the_fit_recovers_a_line_and_keeps_it_non_negative():
    assert affine_fit([(8, 1.0), (8, 2.0)]) is None                       # one batch size: no line
    a, b = affine_fit([(1, 0.6), (64, 0.6 + 63 * 0.01), (256, 0.6 + 255 * 0.01)])
    assert a == pytest.approx(0.59) and b == pytest.approx(0.01)
    a, b = affine_fit([(1, 0.5), (1, 9.0), (1, 0.7), (100, 1.7)])        # the median of each size
    assert a == pytest.approx(0.7 - 1 / 99) and b == pytest.approx(1 / 99)
    assert affine_fit([(1, 2.0), (100, 1.0)]) == (1.5, 0.0)               # no negative slope
    a, b = affine_fit([(10, 0.1), (100, 2.0)])                            # no negative intercept
    assert a == 0.0 and b == pytest.approx((0.1 * 10 + 2.0 * 100) / (10 ** 2 + 100 ** 2))


def test_replay_seconds_prices_whole_batches(monkeypatch):
    key = ("/nowhere", 1)
    monkeypatch.setattr(replay, "_SEEN", {(*key, torch.get_num_threads()): [(1, 1.01), (256, 3.56)]})
    assert replay_seconds(key, 0) == 0.0
    assert replay_seconds(key, 10) == pytest.approx(1.0 + 0.1)
    assert replay_seconds(key, 600) == pytest.approx(2 * 3.56 + (1.0 + 0.88))    # 256 + 256 + 88
    assert replay_seconds(("/elsewhere", 1), 10) is None


@pytest.fixture()
def con(monkeypatch):
    monkeypatch.setattr(replay, "_SEEN", {})
    torch.manual_seed(0)
    model, x, y = MLP(), torch.randn(300, 6), torch.randint(0, 3, (300,))
    c = metaql.connect(":memory:", config={"progress": False})
    c.add_samples(np.arange(290), "train", y[:290].numpy(), x[:290])
    c.add_samples(np.arange(290, 300), "test", y[290:].numpy(), x[290:])
    with c.capture(model, checkpoint="c0", lr=0.1, factory="tests.models:MLP", kwargs=model.metaql_config) as cap:
        cap.backward(F.cross_entropy(model(x[:290]), y[:290]), np.arange(290))
    yield c
    c.close()


def _query_side(con, sql: str) -> str:
    lines = [r[0] for r in con.execute(sql).fetchall()]
    found = [line.strip() for line in lines if line.strip().startswith("query side:")]
    assert len(found) == 1, lines
    return found[0]


def test_explain_prices_the_query_side_once_two_batch_sizes_were_replayed(con):
    stmt = "EXPLAIN SELECT * FROM INFLUENCE(query=batch(test))"
    assert "no estimate yet" in _query_side(con, stmt)
    con.execute("SELECT * FROM INFLUENCE(query=batch(test))")   # warms up, then one batch of 10
    assert "no estimate yet" in _query_side(con, stmt)
    con.replay("c0", "train")                                   # batches of 256 and 34
    line = _query_side(con, stmt)
    assert re.fullmatch(r"query side: replays 10 sample\(s\) at each of 1 checkpoint\(s\), estimate [0-9.e-]+ s "
                        r"\(a line fitted to this process's replays of the model\)", line), line
    est = float(re.search(r"estimate ([0-9.e-]+) s", line).group(1))
    assert est > 0
    # SELF_INFLUENCE replays no query side: no such line
    lines = [r[0] for r in con.execute("EXPLAIN SELECT * FROM SELF_INFLUENCE()").fetchall()]
    assert not any("query side" in line for line in lines)


def test_replay_times_outlive_the_process(tmp_path, monkeypatch):
    """A writer keeps its replay times in the catalog when it closes: a fresh process (here: this
    one with its own times forgotten) prices the query side before replaying anything, read-only
    too; a process at another thread count does not use them."""
    monkeypatch.setattr(replay, "_SEEN", {})
    torch.manual_seed(0)
    model, x, y = MLP(), torch.randn(300, 6), torch.randint(0, 3, (300,))
    path = str(tmp_path / "store")
    con = metaql.connect(path, config={"progress": False})
    con.add_samples(np.arange(290), "train", y[:290].numpy(), x[:290])
    con.add_samples(np.arange(290, 300), "test", y[290:].numpy(), x[290:])
    with con.capture(model, checkpoint="c0", lr=0.1, factory="tests.models:MLP", kwargs=model.metaql_config) as cap:
        cap.backward(F.cross_entropy(model(x[:290]), y[:290]), np.arange(290))
    con.replay("c0", "train")
    con.execute("SELECT * FROM INFLUENCE(query=batch(test))")
    stmt = "EXPLAIN SELECT * FROM INFLUENCE(query=batch(test))"
    assert "estimate" in _query_side(con, stmt).replace("no estimate yet", "")
    con.close()
    monkeypatch.setattr(replay, "_SEEN", {})                    # a new process: nothing replayed yet
    for read_only in (False, True):
        again = metaql.connect(path, read_only=read_only, config={"progress": False})
        line = _query_side(again, stmt)
        assert "no estimate yet" not in line and re.search(r"estimate [0-9.e-]+ s", line), line
        again.close()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        other = metaql.connect(path, read_only=True, config={"progress": False})
        assert "no estimate yet" in _query_side(other, stmt)
        other.close()
    finally:
        torch.set_num_threads(threads)
