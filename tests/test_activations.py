"""Activations in the store (issue #22): captured by replay with forward hooks, read by ACTIVATIONS,
the paper's query sets S1/S2/S3 as SQL against numpy on activations taken directly by hooks, and
a layer output reused from a stored factor input X instead of being written twice."""
import numpy as np
import pytest
import torch
from torch import nn

import metaql
from metaql.diagnosis import querysets as qs


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()
        self.conv2, self.act2 = nn.Conv2d(4, 6, 3), nn.ReLU()
        self.fc1, self.act3, self.fc2 = nn.Linear(6 * 4 * 4, 12), nn.ReLU(), nn.Linear(12, 3)

    def forward(self, x):
        h = self.act2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.fc2(self.act3(self.fc1(h.flatten(1))))


N = 30


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    model = SmallCNN()
    with torch.no_grad():       # non-trivial batch-norm statistics, so eval mode matters
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.5, 2.0)
    x, y = torch.randn(N, 1, 8, 8), torch.randint(0, 3, (N,))
    path = tmp_path_factory.mktemp("act") / "store.mq"
    con = metaql.connect(str(path))
    con.add_samples(np.arange(N), "test", y.numpy(), x)
    con.checkpoint(model, "c0", lr=0.1)
    con.update_predictions("c0")
    yield con, model.eval(), x, y, path
    con.close()


def hooked(model, x, name):
    seen = {}
    h = dict(model.named_modules())[name].register_forward_hook(lambda m, i, o: seen.setdefault("o", o))
    with torch.no_grad():
        model(x)
    h.remove()
    return seen["o"]


def act_matrix(con, layer, samples="test", reduce="max"):
    t = con.execute(f"SELECT sample_id, neuron, value FROM ACTIVATIONS(layer={layer}, samples={samples}, "
                    f"checkpoint=c0, reduce='{reduce}') ORDER BY sample_id, neuron").fetchnumpy()
    ids = np.unique(t["sample_id"])
    return ids, t["value"].reshape(len(ids), -1)


@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_conv_channels_reduced_as_asked(setup, reduce):
    con, model, x, _, _ = setup
    out = con.capture_activations(["conv2"], samples="test", checkpoint="c0", reduce=reduce).fetchnumpy()
    assert out["rows_held"][0] == N
    ids, got = act_matrix(con, "conv2", reduce=reduce)
    o = hooked(model, x, "conv2").flatten(2)
    want = (o.amax(2) if reduce == "max" else o.mean(2)).numpy()
    assert list(ids) == list(range(N)) and got.shape == (N, 6)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    row = con.execute("SELECT DISTINCT storage FROM shards WHERE kind = 'activations' AND layer = 'conv2' "
                      "AND storage = ?", [reduce]).fetchall()
    assert row == [(reduce,)]


def test_capture_is_idempotent_and_sql_face(setup):
    con, model, x, _, _ = setup
    first = con.execute("SELECT * FROM CAPTURE_ACTIVATIONS(layers=[fc1], samples=test, checkpoint=c0)").fetchnumpy()
    again = con.execute("SELECT * FROM CAPTURE_ACTIVATIONS(layers=[fc1], samples=test, checkpoint=c0)").fetchnumpy()
    assert (first["rows_written"][0], again["rows_written"][0], again["rows_held"][0]) == (N, 0, N)
    _, got = act_matrix(con, "fc1")
    np.testing.assert_allclose(got, hooked(model, x, "fc1").numpy(), rtol=1e-6, atol=1e-6)
    assert con.verify() == []


def test_query_sets_equal_numpy(setup):
    con, model, x, y, _ = setup
    con.capture_activations(["act2"], samples="test", checkpoint="c0", reduce="mean")
    raw = hooked(model, x, "act2").flatten(2).mean(2).numpy().astype(np.float64)
    act = "ACTIVATIONS(layer=act2, samples=test, checkpoint=c0, reduce='mean')"
    k = 3
    s1 = con.execute(qs.S1_SQL.format(act=act, k=k)).fetchnumpy()["neuron"]
    assert list(s1) == list(qs.s1_topk(raw, k))
    s2 = con.execute(qs.S2_SQL.format(act=act)).fetchnumpy()["mean"]
    np.testing.assert_allclose(s2, qs.s2_mean(raw), rtol=1e-9)
    s3 = con.execute(qs.S3_SQL.format(act=act)).fetchnumpy()
    hist = np.zeros(raw.shape[1], np.int64)
    hist[s3["neuron"]] = s3["samples"]
    assert (hist == qs.s3_histogram(raw)).all()
    # grouped by class and correctness through a join with samples
    pred = con.execute("SELECT pred FROM samples ORDER BY sample_id").fetchnumpy()["pred"]
    g = con.execute(qs.S2_BY_GROUP_SQL.format(act=act)).fetchnumpy()
    for label in np.unique(y.numpy()):
        for correct in (True, False):
            rows = (y.numpy() == label) & ((pred == y.numpy()) == correct)
            sel = (g["label"] == label) & (g["correct"] == correct)
            if rows.any():
                np.testing.assert_allclose(g["mean"][sel], raw[rows].mean(0), rtol=1e-9)
            else:
                assert not sel.any()


def test_layer_input_reused_from_stored_factors(setup):
    con, model, x, _, _ = setup
    con.replay("c0", "test", layers=["fc2"])          # fc2's factor X is act3's output, stored once
    before = con.execute("SELECT count(*) FROM shards WHERE kind = 'activations' AND layer = 'act3'").fetchone()[0]
    out = con.capture_activations(["act3"], samples="test", checkpoint="c0").fetchnumpy()
    assert before == 0 and (out["rows_written"][0], out["rows_held"][0]) == (0, N)
    files = con.execute("SELECT a.bytes, f.kind FROM shards a JOIN shards f ON a.file = f.file AND f.kind = 'factors' "
                        "WHERE a.kind = 'activations' AND a.layer = 'act3'").fetchall()
    assert files and all(b == 0 and k == "factors" for b, k in files)
    _, got = act_matrix(con, "act3")
    np.testing.assert_allclose(got, hooked(model, x, "act3").numpy(), rtol=1e-5, atol=1e-6)
    assert con.verify() == []


def test_no_reuse_of_training_mode_factors(tmp_path):
    """Factors captured in the training loop (train mode, batch-norm batch statistics) are not the
    eval-mode activations: the probe sees they differ and the activations are written."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    x, y = torch.randn(16, 5), torch.randint(0, 2, (16,))
    with metaql.connect(str(tmp_path / "s.mq")) as con:
        con.add_samples(np.arange(16), "train", y.numpy(), x)
        saved = {k: v.clone() for k, v in model.state_dict().items()}    # what the checkpoint holds
        with con.capture(model, layers=["3"], checkpoint="c0", lr=0.1) as cap:
            cap.backward(cap.loss(model(x), y), np.arange(16))
        out = con.capture_activations(["2"], samples="train", checkpoint="c0").fetchnumpy()
        assert out["rows_written"][0] == 16
        _, got = act_matrix(con, "'2'", samples="train")
        model.load_state_dict(saved)
        np.testing.assert_allclose(got, hooked(model.eval(), x, "2").numpy(), rtol=1e-5, atol=1e-6)


def test_errors_and_read_only(setup):
    con, _, _, _, path = setup
    with pytest.raises(metaql.CatalogException, match="capture them first"):
        con.execute("SELECT * FROM ACTIVATIONS(layer=conv1, samples=test, checkpoint=c0)")
    with pytest.raises(metaql.CatalogException, match="unknown layer 'conv9'"):
        con.capture_activations(["conv9"], samples="test", checkpoint="c0")
    with pytest.raises(metaql.Error, match="reduce"):
        con.capture_activations(["conv1"], samples="test", checkpoint="c0", reduce="median")
    con.capture_activations(["fc1"], samples="test", checkpoint="c0")
    con.store.committed()
    with metaql.connect(str(path), read_only=True) as ro:
        n = ro.execute("SELECT count(*) FROM ACTIVATIONS(layer=fc1, samples=test, checkpoint=c0)").fetchone()[0]
        assert n == N * 12
        with pytest.raises(metaql.Error, match="read-only"):
            ro.execute("SELECT * FROM CAPTURE_ACTIVATIONS(layers=[conv1], samples=test, checkpoint=c0)")


def test_no_reuse_of_factors_captured_after_the_weights_moved(tmp_path):
    """Captured in the training loop without BatchNorm or dropout, the first batch's factors are the
    checkpoint's own activations and the later ones are not (SGD moved the weights): on the old
    code one probe of the first shard let every shard be referenced, and ACTIVATIONS of the second
    batch came out at the wrong weights (max error 0.12)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))
    x, y = torch.randn(128, 5), torch.randint(0, 2, (128,))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with metaql.connect(str(tmp_path / "s.mq")) as con:
        con.add_samples(np.arange(128), "train", y.numpy(), x)
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        with con.capture(model, layers=["2"], checkpoint="c0", lr=0.5, shard_size=64) as cap:
            for b in range(2):
                rows = slice(64 * b, 64 * b + 64)
                cap.backward(torch.nn.functional.cross_entropy(model(x[rows]), y[rows]), np.arange(128)[rows])
                opt.step()
                opt.zero_grad()
        model.load_state_dict(saved)
        con.attach_model(model)
        con.capture_activations(["1"], samples="train", checkpoint="c0")
        _, got = act_matrix(con, "'1'", samples="train")
    np.testing.assert_allclose(got, hooked(model.eval(), x, "1").numpy(), rtol=1e-5, atol=1e-6)
