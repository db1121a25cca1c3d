"""The ELITE table function: store-backed input, the result's columns, the saved detector, errors."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import roc_auc_score

import metaql.cleaning.elite_function  # noqa: F401  registers ELITE
from metaql.cleaning.elite import EliteDetector
from metaql.engine.errors import BinderException, InvalidInputException
from metaql.engine.functions import REGISTRY, SetName
from metaql.storage.store import Store

FAST = {"epochs": 40, "batch_size": 64, "lr": 1e-3}


def polluted(seed: int, n_normal: int, n_anomalous: int, features: int = 4):
    g = np.random.default_rng(seed)
    normal = g.normal(size=(n_normal, features))
    d = g.normal(size=(n_anomalous, features))
    anomalous = 7 * d / np.linalg.norm(d, axis=1, keepdims=True)
    return np.concatenate([normal, anomalous]).astype(np.float32), np.r_[np.zeros(n_normal), np.ones(n_anomalous)]


@pytest.fixture
def ctx(tmp_path):
    """A store with a polluted 'train' split (labels = truth, for checking) and a small 'val' split."""
    store = Store(tmp_path / "store.mq")
    x, y = polluted(0, 150, 30)
    xl, yl = polluted(1, 6, 6)
    cols = lambda a: {f"f{j}": a[:, j].astype(np.float64) for j in range(a.shape[1])}  # noqa: E731
    store.add_samples(np.arange(len(x)), split="train", labels=y, inputs=x, columns=cols(x))
    store.add_samples(1000 + np.arange(len(xl)), split="val", labels=yl, inputs=xl, columns=cols(xl))
    seen = []
    progress = lambda it, total=None, desc="": (seen.append(desc), it)[1]  # noqa: E731
    yield SimpleNamespace(store=store, progress=progress, truth=y, seen=seen)
    store.close()


def elite(ctx, **kwargs):
    fn = REGISTRY.get("ELITE")
    return fn.fn(ctx, **fn.check_arguments({**FAST, **kwargs}))


def test_registered_with_its_signature():
    fn = REGISTRY.get("ELITE")
    assert [c for c, _ in fn.columns] == ["sample_id", "anomaly_score", "is_anomaly"]
    assert fn.params["data"].hint is SetName and fn.params["labeled"].hint is SetName
    assert fn.params["score"].default == "svdd" and fn.params["label_column"].default == "label"
    with pytest.raises(BinderException, match="labeled"):
        fn.check_arguments({"data": "train"})


@pytest.mark.parametrize("features", ["", "f0,f1,f2,f3"])
def test_scores_every_sample_of_the_data_set(ctx, features):
    table = elite(ctx, data="train", labeled="val", features=features)
    assert table.schema.types == [pa.int64(), pa.float64(), pa.bool_()]
    assert table.column("sample_id").to_pylist() == list(range(180))
    scores = table.column("anomaly_score").to_numpy()
    assert roc_auc_score(ctx.truth, scores) > 0.95
    flagged, truth = table.column("is_anomaly").to_numpy(), ctx.truth.astype(bool)
    assert 0.5 * (flagged[truth].mean() + (~flagged[~truth]).mean()) > 0.85   # balanced accuracy
    assert "ELITE" in ctx.seen                                   # training went through ctx.progress


def test_the_trained_detector_is_kept_in_the_store(ctx):
    table = elite(ctx, data="train", labeled="val", score="ae")
    det = EliteDetector.load(ctx.store.artifact_dir("elite", "train"))
    assert det.score == "ae"
    again = det.decision_function(ctx.store.inputs(np.arange(180)))
    assert np.allclose(again, table.column("anomaly_score").to_numpy())


def test_the_anomaly_loss_reaches_the_detector(ctx):
    table = elite(ctx, data="train", labeled="val", anomaly_loss="linear")
    assert EliteDetector.load(ctx.store.artifact_dir("elite", "train")).anomaly_loss == "linear"
    assert roc_auc_score(ctx.truth, table.column("anomaly_score").to_numpy()) > 0.95
    with pytest.raises(InvalidInputException, match="anomaly_loss"):
        elite(ctx, data="train", labeled="val", anomaly_loss="squared")


def test_labeled_samples_inside_the_data_set_are_scored_not_trained_on(ctx):
    ctx.store.create_set("some_train", "SELECT sample_id FROM samples WHERE split = 'train' AND sample_id < 4 "
                                       "OR sample_id >= 170 AND sample_id < 174")
    table = elite(ctx, data="train", labeled="some_train")
    assert table.num_rows == 180


def test_labels_outside_anomaly_and_normal_label_are_refused(ctx):
    ctx.store.add_samples([2000], split="odd", labels=[7], inputs=np.zeros((1, 4), np.float32),
                          columns={f"f{j}": [0.0] for j in range(4)})
    ctx.store.create_set("mixed", "SELECT sample_id FROM samples WHERE split IN ('val', 'odd')")
    with pytest.raises(InvalidInputException, match="neither"):
        elite(ctx, data="train", labeled="mixed")


def test_custom_label_values(ctx):
    # with anomaly_label=0 the 'normal' samples of val become the anomalies: only the labels' meaning flips
    table = elite(ctx, data="train", labeled="val", anomaly_label=0, normal_label=1)
    assert table.num_rows == 180


def test_sql_end_to_end(tmp_path):
    import metaql

    con = metaql.connect(str(tmp_path / "e2e.mq"), config={"progress": False})
    x, y = polluted(0, 120, 20)
    xl, yl = polluted(1, 4, 4)
    con.add_samples(np.arange(len(x)), split="train", labels=y, inputs=x)
    con.add_samples(500 + np.arange(len(xl)), split="val", labels=yl, inputs=xl)
    rel = con.execute("SELECT * FROM ELITE(data=train, labeled=val, score='svdd', epochs=20, lr=0.001)")
    out = rel.fetchnumpy()
    con.close()
    assert roc_auc_score(y, out["anomaly_score"]) > 0.95
