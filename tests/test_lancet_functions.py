"""The LANCET table functions over a real store: LANCET_CANDIDATES, LANCET, LANCET_STATUS, the
catalog's labels table, the cache of trained rounds (also across reopening the store), and the
errors a user meets."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import metaql
from metaql.engine.errors import Error, InvalidInputException, Warning as MetaQLWarning
from metaql.labeling import lancet_functions, session as session_module
from metaql.storage.labels import add_labels, read_labels
from metaql.labeling.dmn import OWAConfig
from metaql.labeling.embedding import TrainConfig
from metaql.labeling.lancet import LancetConfig

N, CLASSES = 90, 3


@pytest.fixture(autouse=True)
def _tiny_rounds(monkeypatch):
    """Small nets and few steps: the functions' plumbing is under test, not the learning."""
    def tiny(steps, cfm, alpha_t, seed, augment, after_stop):
        return LancetConfig(train=TrainConfig(steps=min(steps, 40), cfm=cfm, seed=seed,
                                              augment=augment),
                            owa=OWAConfig(iterations=60, refine_iterations=20, seed=seed),
                            semigan={"hidden": [32], "feature_dim": 16}, warm_steps=10,
                            alpha_t=alpha_t, after_stop=after_stop)
    monkeypatch.setattr(lancet_functions, "lancet_config", tiny)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def rounds(monkeypatch):
    """Counts the LANCET rounds actually trained (cache hits train none)."""
    calls = []
    real = session_module.run_lancet

    def counting(*args, **kwargs):
        calls.append(kwargs.get("model") is not None)   # True: warm start from a cached model
        return real(*args, **kwargs)
    monkeypatch.setattr(session_module, "run_lancet", counting)
    return calls


def blob_store(path=":memory:"):
    g = torch.Generator().manual_seed(0)
    y = np.arange(N) % CLASSES
    x = 6.0 * torch.eye(CLASSES, 6)[torch.from_numpy(y)] + torch.randn(N, 6, generator=g)
    con = metaql.connect(str(path))
    con.add_samples(np.arange(100, 100 + N), "train", labels=y, inputs=x)
    return con


def seed_labels(con, per_class=2):
    y = np.arange(N) % CLASSES
    ids = [100 + i for c in range(CLASSES) for i in np.nonzero(y == c)[0][:per_class]]
    add_labels(con.store, ids, [int(y[i - 100]) for i in ids], by="ana")
    return ids


def test_candidates_lancet_and_status_over_the_labels_table():
    con = blob_store()
    seed_labels(con)
    cands = con.execute("SELECT * FROM LANCET_CANDIDATES(pool=train, budget=4)").fetchall()
    labeled = {r[0] for r in con.execute("SELECT sample_id FROM labels").fetchall()}
    assert len(cands) == 4 and not labeled & {c[0] for c in cands}
    assert all(c[1] >= 0 and 0.0 <= c[2] <= 1.0 for c in cands)
    rows = con.execute("SELECT sample_id, label, confidence, source FROM LANCET(pool=train) "
                       "ORDER BY sample_id").fetchall()
    by_id = {r[0]: r[2] for r in rows}
    assert all(c[2] == pytest.approx(by_id[c[0]]) for c in cands)   # the propagated label's
    assert [r[0] for r in rows] == list(range(100, 100 + N))
    assert {r[0] for r in rows if r[3] == "human"} == labeled
    assert all(0.0 <= r[2] <= 1.0 for r in rows) and all(r[2] == 1.0 for r in rows if r[3] == "human")
    status = con.execute("SELECT * FROM LANCET_STATUS(pool=train)").fetchall()
    assert len(status) == 1
    should_stop, reason, dmn_loss, max_loss = status[0][:4]
    assert isinstance(should_stop, bool) and reason and 0 < dmn_loss and max_loss == pytest.approx(np.log(4))
    assert status[0][-2:] == (6, N - 6)


def test_oracle_mode_labels_the_candidates_from_a_column():
    con = blob_store()
    with pytest.warns(MetaQLWarning, match="random samples to start"):
        first = con.execute("SELECT * FROM LANCET_CANDIDATES(pool=train, budget=9, oracle='label', "
                            "num_classes=3)").fetchall()
    con.execute("SELECT * FROM LANCET_CANDIDATES(pool=train, budget=6, oracle='label')").fetchall()
    got = read_labels(con.store, np.arange(100, 100 + N))
    assert got["sample_id"].size == 15 and set(got["labeled_by"]) == {"oracle:label"}
    assert np.array_equal(got["label"], (got["sample_id"] - 100) % CLASSES)
    assert {r[0] for r in first} <= set(got["sample_id"].tolist())
    assert all(r[2] is None for r in first)          # a random start has no confidence yet


def test_the_candidate_rule_shares_the_trained_round(rounds):
    con = blob_store()
    seed_labels(con)
    con.execute("SELECT * FROM LANCET(pool=train)").fetchall()
    con.execute("SELECT * FROM LANCET_CANDIDATES(pool=train, budget=3, after_stop='dmn')").fetchall()
    con.execute("SELECT * FROM LANCET_CANDIDATES(pool=train, budget=3)").fetchall()
    assert len(rounds) == 1                          # one training; the rule only picks from it


def test_rounds_are_cached_by_the_labeled_set_and_survive_reopening(tmp_path, rounds):
    con = blob_store(tmp_path / "store.mq")
    seed_labels(con)
    a = con.execute("SELECT * FROM LANCET(pool=train) ORDER BY sample_id").fetchall()
    con.execute("SELECT * FROM LANCET_STATUS(pool=train)").fetchall()
    assert rounds == [False]                          # one round trained, from scratch
    con.close()
    con = metaql.connect(str(tmp_path / "store.mq"))  # a restart: the cache is on disk
    b = con.execute("SELECT * FROM LANCET(pool=train) ORDER BY sample_id").fetchall()
    assert a == b and rounds == [False]
    con.execute("INSERT INTO labels VALUES (120, 2, 'bob', now())")
    con.execute("SELECT * FROM LANCET(pool=train)").fetchall()
    assert rounds == [False, True]                    # a new labeled set: warm from the cached model
    con.execute("SELECT * FROM LANCET(pool=train, seed=1)").fetchall()
    assert rounds == [False, True, False]             # other arguments: another cache family
    kept = [d for d in (tmp_path / "store.mq" / "artifacts" / "lancet" / "train").iterdir()]
    assert len(kept) <= lancet_functions.CACHE_KEEP
    con.close()


def test_contradicting_labels_are_refused_not_overwritten():
    con = blob_store()
    add_labels(con.store, [100, 101], [0, 1], by="ana")
    with pytest.raises(InvalidInputException, match="contradict"):
        add_labels(con.store, [101, 102], [2, 2], by="bob")
    got = read_labels(con.store, np.asarray([100, 101, 102]))
    assert got["label"].tolist() == [0, 1] and list(got["labeled_by"]) == ["ana", "ana"]
    assert add_labels(con.store, [100], [0], by="bob") == 0           # same label: a no-op
    assert read_labels(con.store, np.asarray([100]))["labeled_by"][0] == "ana"
    with pytest.warns(MetaQLWarning, match="replacing 1"):
        add_labels(con.store, [101], [2], by="bob", overwrite=True)
    assert read_labels(con.store, np.asarray([101]))["label"].tolist() == [2]


@pytest.mark.parametrize("query, match", [
    ("SELECT * FROM LANCET_CANDIDATES(pool=train, budget=500)", "larger than the 84 unlabeled"),
    ("SELECT * FROM LANCET_CANDIDATES(pool=train, budget=0)", "positive"),
    ("SELECT * FROM LANCET(pool=train, num_classes=2)", r"outside \[0, 2\)"),
    ("SELECT * FROM LANCET_STATUS(pool=train, alpha_t=2.0)", "alpha_t"),
    ("SELECT * FROM LANCET(pool=train, augment='flip')", "one of auto, none, cold, shift"),
    ("SELECT * FROM LANCET(pool=train, augment='shift')", "image-shaped"),
    ("SELECT * FROM LANCET_CANDIDATES(pool=train, budget=5, after_stop='maybe')",
     "after_stop must be one of confidence, dmn"),
])
def test_bad_arguments_are_clear_errors(query, match):
    con = blob_store()
    seed_labels(con)
    with pytest.raises(Error, match=match):
        con.execute(query).fetchall()


def test_a_pool_without_labels_or_with_one_class_is_an_error():
    con = blob_store()
    with pytest.raises(Error, match="no human label|two labeled classes"):
        con.execute("SELECT * FROM LANCET(pool=train)").fetchall()
    add_labels(con.store, [100, 103], [0, 0])
    with pytest.raises(Error, match="at least two classes|two labeled classes"):
        con.execute("SELECT * FROM LANCET(pool=train, num_classes=3)").fetchall()


def test_a_class_without_labels_warns():
    con = blob_store()
    add_labels(con.store, [100, 101, 103, 104], [0, 1, 0, 1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        con.execute("SELECT * FROM LANCET(pool=train, num_classes=3)").fetchall()
    assert any("[2] have no labeled sample" in str(w.message) for w in caught)
