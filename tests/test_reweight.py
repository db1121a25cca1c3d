"""Meta re-weighting: the weights' meta-gradient from factors (Lemma 7) equals autograd through the
look-ahead update (Eq. 2-3); REWEIGHT stores weights per sample and checkpoint."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from torch.func import functional_call

import metaql
from metaql.pivotal.reweight import WeightGradient, meta_reweight
from tests.layer_models import ConvNet
from tests.models import MLP

MODELS = {
    "mlp": (lambda: MLP(), lambda n: torch.randn(n, 6)),
    "conv": (lambda: ConvNet(2, 2, 4, 3, padding=1, size=5), lambda n: torch.randn(n, 2, 5, 5)),
}


def _autograd_weight_grad(model, x, y, w, mx, my, c, lr):
    """dL_m(T - lr grad sum_j w_j f_j / B)/dw by differentiating through the look-ahead update."""
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().requires_grad_(True) for _, p in model.named_parameters()]
    w = w.clone().requires_grad_(True)
    logits = functional_call(model, dict(zip(names, params)), (x,))
    loss = (w * F.cross_entropy(logits, y, reduction="none")).sum() / len(y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    ahead = {n: p - lr * g for n, p, g in zip(names, params, grads)}
    meta = F.cross_entropy(functional_call(model, ahead, (mx,)), my, reduction="none")
    meta_loss = (c * meta).sum() / c.sum()
    return torch.autograd.grad(meta_loss, w)[0]


@settings(max_examples=4, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(st.fixed_dictionaries({"model": st.sampled_from(sorted(MODELS)), "b": st.integers(1, 6),
                              "m": st.integers(1, 4), "seed": st.integers(0, 2 ** 16),
                              "lr": st.floats(0.01, 1.0)}))
def test_weight_gradient_equals_autograd_through_lookahead(p):
    torch.manual_seed(p["seed"])
    make_model, make_x = MODELS[p["model"]]
    model = make_model()
    x, y = make_x(p["b"]), torch.randint(0, 3, (p["b"],))
    mx, my = make_x(p["m"]), torch.randint(0, 3, (p["m"],))
    w, c = torch.rand(p["b"]), torch.rand(p["m"], dtype=torch.float64) + 0.5
    got = WeightGradient(model)(model, x, y, w, mx, my, c, p["lr"])
    want = _autograd_weight_grad(model, x, y, w, mx, my, c.float(), p["lr"])
    assert torch.allclose(got.float(), want, rtol=1e-4, atol=1e-6 * float(want.abs().max()) + 1e-9)


def _blobs(n, flip, seed):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=gen)
    x = torch.randn(n, 6, generator=gen) * 0.5
    x[torch.arange(n), y] += 2.0
    noisy = y.clone()
    bad = torch.rand(n, generator=gen) < flip
    noisy[bad] = (y[bad] + 1) % 3
    return x, y, noisy, bad


def test_reweighting_down_weights_flipped_labels():
    torch.manual_seed(0)
    x, y, noisy, bad = _blobs(90, 0.4, 0)
    meta = torch.arange(6)
    out = meta_reweight(MLP(), x, noisy, x[meta], y[meta], epochs=3, batch_size=30, lr=0.3, weight_lr=0.3)
    w = torch.from_numpy(out.weights)
    assert len(out.history) == 3 and ((w >= 0) & (w <= 1)).all()
    assert float(w[bad].mean()) < float(w[~bad].mean()) - 0.2


def _noisy_store(con, n: int) -> None:
    """n blob samples with 30% flipped labels captured at checkpoint c0, and a meta set of the
    first 5 with their clean labels."""
    torch.manual_seed(1)
    x, y, noisy, _ = _blobs(n, 0.3, 1)
    model = MLP()
    ids = np.arange(n)
    con.add_samples(ids, "train", noisy.numpy(), x)
    with con.capture(model, checkpoint="c0", lr=0.1, factory="tests.models:MLP", kwargs=model.metaql_config) as cap:
        cap.backward(F.cross_entropy(model(x), noisy), ids)
    con.execute("CREATE SET meta AS SELECT sample_id FROM samples WHERE sample_id < 5")
    con.label(list(range(5)), y[:5].tolist())


def test_reweight_sql_stores_weights_and_checkpoint():
    with metaql.connect(":memory:") as con:
        _noisy_store(con, 60)
        rows = con.execute("SELECT * FROM REWEIGHT(data=train, meta=meta, epochs=2, batch_size=20, "
                           "save_as=rw)").fetchnumpy()
        assert sorted(rows["sample_id"].tolist()) == list(range(60))
        stored = con.execute("SELECT s.sample_id, w.weight FROM sample_weights w JOIN samples s USING (sample_id) "
                             "WHERE w.checkpoint = 'rw' ORDER BY s.sample_id").fetchnumpy()
        assert np.allclose(stored["weight"], rows["weight"][np.argsort(rows["sample_id"])])
        names = [r[0] for r in con.execute("SHOW CHECKPOINTS").fetchall()]
        assert names == ["c0", "rw"]
        # the re-weighted model is not a point of the training run: `all` and `last` leave it out
        # (on the old code every default query silently added or switched to it); named, it is used
        assert con.execute("SELECT derived_from FROM checkpoints WHERE name = 'rw'").fetchone() == ("c0",)
        plain = con.execute("SELECT score FROM SELF_INFLUENCE() ORDER BY sample_id").fetchnumpy()["score"]
        first = con.execute("SELECT score FROM SELF_INFLUENCE(checkpoints=[c0]) ORDER BY sample_id").fetchnumpy()["score"]
        both = con.execute("SELECT score FROM SELF_INFLUENCE(checkpoints=[c0, rw]) ORDER BY sample_id").fetchnumpy()["score"]
        assert np.allclose(plain, first) and not np.allclose(both, first)
        with pytest.raises(metaql.CatalogException, match="already exists"):
            con.execute("SELECT * FROM REWEIGHT(data=train, meta=meta, epochs=1, save_as=rw)")
        con.execute("CREATE SET unlabeled AS SELECT sample_id FROM samples WHERE sample_id BETWEEN 5 AND 7")
        with pytest.raises(metaql.InvalidInputException, match="label"):
            con.execute("SELECT * FROM REWEIGHT(data=train, meta=unlabeled, epochs=1, save_as=rw2)")


def test_reweight_interrupted_while_saving_leaves_nothing_scored(monkeypatch):
    """On the old code the checkpoint committed as complete before its factors were replayed: an
    interruption left a 'complete' checkpoint with factors for part of the data and no weights."""
    from metaql.storage import capture
    with metaql.connect(":memory:") as con:
        _noisy_store(con, 30)

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt
        monkeypatch.setattr(capture, "replay_into_store", interrupted)
        with pytest.raises(metaql.Error, match="cancelled"):      # the connection turns Ctrl-C into this
            con.execute("SELECT * FROM REWEIGHT(data=train, meta=meta, epochs=1, batch_size=10, save_as=rw)")
        assert con.execute("SELECT status FROM checkpoints WHERE name = 'rw'").fetchone() != ("complete",)
        assert con.execute("SELECT count(*) FROM sample_weights").fetchone() == (0,)
        with pytest.raises(metaql.Error, match="rw"):
            con.execute("SELECT * FROM SELF_INFLUENCE(checkpoints=[rw])").fetchall()
        with pytest.raises(metaql.InvalidInputException, match="identifier"):
            con.execute("SELECT * FROM REWEIGHT(data=train, meta=meta, epochs=1, save_as='bad name')")
