"""Projected storage (metaql.approx): projected inner products are unbiased and within the stated
bound over many seeds, against explicit full gradients; capture records and reuses the projection."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaql
from metaql.approx.kind import Projected
from metaql.approx.projection import chebyshev_radius, dims_for_error, matrices, variance_factor
from metaql.errors import InvalidInputException
from metaql.storage.hooks import watched_modules
from metaql.storage.layers import kind_named
from metaql.storage.layers.base import LayerMeta
from metaql.storage.replay import replay_factors
from tests.bruteforce import per_sample_grads
from tests.models import MLP, SeqModel


def _canonical(grads, layer) -> torch.Tensor:
    """Per-sample gradient matrices [W | b] (n, dout, din + 1) from torch.func."""
    return torch.cat([grads[layer + ".weight"], grads[layer + ".bias"].unsqueeze(-1)], -1).double()


def _projected(G: torch.Tensor, spec: dict) -> torch.Tensor:
    """P_out^T G P_in built explicitly (the definition the stored factors must meet)."""
    p_in, p_out = matrices(spec["seed"], G.shape[2], spec["k_in"], G.shape[1], spec["k_out"])
    eye = lambda n: torch.eye(n, dtype=torch.double)    # noqa: E731
    pi = p_in.double() if p_in is not None else eye(G.shape[2])
    po = p_out.double() if p_out is not None else eye(G.shape[1])
    return po.T @ G @ pi


def _seq_data(n=12, t=5, seed=0):
    torch.manual_seed(seed)
    model = SeqModel(6, 9, 3)
    return model, torch.randn(n, t, 6), torch.randint(0, 3, (n,))


def test_projected_scores_unbiased_and_within_bound_over_seeds():
    """For one layer of 5-token sequences: over 400 seeds, each training sample's projected score
    against a query batch has mean within 4 standard errors of the exact one, variance within the
    bound v ||g_i||^2 ||g_q||^2 (up to sampling slack), and Chebyshev's tail at delta holds."""
    model, x, y = _seq_data()
    layer, ntrain = "proj", 9
    modules = watched_modules(model, [layer])
    raw = replay_factors(model, modules, x, y)[layer]            # base (linear) factors, unprojected
    G = _canonical(per_sample_grads(model, x, y), layer)        # (n, 9, 10) explicit gradients
    exact = (G[:ntrain] * G[ntrain:].mean(0)).sum((1, 2))
    scale = G[:ntrain].flatten(1).norm(dim=1) * G[ntrain:].mean(0).norm()
    base = kind_named("linear").meta(layer, modules[layer])
    k_in, k_out, seeds, delta = 4, 3, 400, 0.2
    kind = Projected()
    errs = []
    for seed in range(seeds):
        spec = {"seed": seed, "k_in": k_in, "k_out": k_out}
        meta = LayerMeta(layer, "projected", k_in, k_out, False, {}, {"projection": spec, "base": base.to_dict()})
        train = {k: v[:ntrain] for k, v in raw.items()}
        query = kind.average_of(meta, {k: v[ntrain:] for k, v in raw.items()})
        got = kind.average_scores(meta, train, query).double()
        # the factored path equals the explicit projection of the full gradients
        explicit = (_projected(G[:ntrain], spec) * _projected(G[ntrain:], spec).mean(0)).sum((1, 2))
        assert torch.allclose(got, explicit, rtol=1e-4, atol=1e-5 * float(scale.max()))
        errs.append(got - exact)
    errs = torch.stack(errs)                                     # (seeds, ntrain)
    sd = errs.std(0)
    assert (errs.mean(0).abs() <= 4 * sd / seeds ** 0.5 + 1e-9).all(), "projected scores are biased"
    v = variance_factor(k_in, k_out)
    assert (errs.var(0) <= 1.3 * v * scale ** 2).all(), "variance above the stated bound"
    eps = chebyshev_radius(k_in, k_out, delta)
    assert float((errs.abs() > eps * scale).double().mean()) <= delta
    assert float(sd.min()) > 0        # the projection does perturb: the test can fail


def test_dims_for_error_meet_the_bound():
    for err in (0.05, 0.1, 0.3, 0.7):
        for din, dout in ((4000, 5000), (50, 3000), (3000, 20), (8, 8)):
            k_in, k_out = dims_for_error(din, dout, err)
            assert variance_factor(k_in, k_out) ** 0.5 <= err + 1e-12
            assert (k_in is None or k_in < din) and (k_out is None or k_out < dout)
    with pytest.raises(InvalidInputException, match="max_error"):
        dims_for_error(10, 10, 0)


def _capture(con, model, x, y, ids, checkpoint="c0", **kw):
    with con.capture(model, layers="*", checkpoint=checkpoint, lr=0.5, factory="tests.models:SeqModel",
                     kwargs=model.metaql_config, **kw) as cap:
        cap.backward(F.cross_entropy(model(x[ids]), y[ids]), ids)


def test_capture_projected_scores_equal_explicit_projection_of_bruteforce():
    """INFLUENCE over a projected store equals the inner products of the explicitly projected
    torch.func gradients (the query side replayed and projected with the recorded seed), over two
    checkpoints; the second capture (no storage= given) keeps each layer's projection."""
    model, x, y = _seq_data(n=14)
    ids = np.arange(14)
    with metaql.connect(":memory:") as con:
        con.add_samples(ids[:10], "train", y[:10].numpy(), x[:10])
        con.add_samples(ids[10:], "test", y[10:].numpy(), x[10:])
        _capture(con, model, x, y, ids[:10], storage={"proj": "projected", "tok": "projected"}, proj_dim=6,
                 proj_seed=7)
        states = [{k: v.clone() for k, v in model.state_dict().items()}]
        with torch.no_grad():
            model.proj.weight.add_(0.3)
        _capture(con, model, x, y, ids[:10], checkpoint="c1")
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        rows = {r[0]: r[1:] for r in con.execute("SELECT name, kind, din, dout, storage FROM layers").fetchall()}
        assert rows["proj"][0] == "projected" and rows["tok"][0] == "projected" and rows["head"][0] == "linear"
        got = con.execute("SELECT sample_id, score FROM INFLUENCE(layers=*, query=batch(test), error=1)"
                          " ORDER BY sample_id").fetchnumpy()
        expected = np.zeros(10)
        for state in states:
            model.load_state_dict(state)
            g = per_sample_grads(model, x, y)
            for layer in ("tok", "proj", "head"):
                meta, _ = con.store.layer_meta(layer)
                G = _canonical(g, layer)
                if meta.kind == "projected":
                    spec = meta.extra["projection"]
                    assert spec["k_in"] in (6, None) and spec["k_out"] in (6, None)
                    G = _projected(G, spec)
                expected += 0.5 * (G[:10] * G[10:].mean(0)).sum((1, 2)).numpy()
        np.testing.assert_allclose(got["score"], expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


def test_auto_projects_only_when_smaller_and_allowed():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3))
    x, y = torch.randn(6, 8, 64), torch.randint(0, 3, (6,))
    ids = np.arange(6)

    def kinds(**kw):
        with metaql.connect(":memory:") as con:
            con.add_samples(ids, "train", y.numpy(), x)
            with con.capture(model, layers="*", checkpoint="c0", **kw) as cap:
                cap.backward(F.cross_entropy(model(x).mean(1), y), ids)
            return {r[0]: (r[1], r[2]) for r in con.execute("SELECT name, kind, storage FROM layers").fetchall()}

    assert kinds(storage="auto") == kinds() == {"0": ("linear", "factored"), "2": ("linear", "full")}
    # k = 17 at max_error=0.5: layer 0 stores 8 * (17 + 17) numbers instead of 8 * (65 + 64);
    # layer 2 (64 -> 3) projects its input side only (k = 2/0.25): 8 * 3 numbers against 65 * 3
    picked = kinds(storage="auto", max_error=0.5)
    assert picked == {"0": ("projected", "factored"), "2": ("projected", "full")}
    # a bound too tight to save space keeps the layer exact
    assert kinds(storage="auto", max_error={"0": 0.5, "2": 0.01})["2"] == ("linear", "full")


def test_refusals():
    model, x, y = _seq_data(n=4)
    ids = np.arange(4)
    with metaql.connect(":memory:") as con:
        con.add_samples(ids, "train", y.numpy(), x)
        with pytest.raises(InvalidInputException, match="max_error"):
            _capture(con, model, x, y, ids, storage="projected")
        with pytest.raises(InvalidInputException, match="storage mode"):
            _capture(con, model, x, y, ids, storage="sketched")
        _capture(con, model, x, y, ids, storage={"proj": "projected"}, proj_dim=3)
        with pytest.raises(InvalidInputException, match="stored projected"):
            _capture(con, model, x, y, ids, checkpoint="c1", storage={"proj": "factored"})
        with pytest.raises(InvalidInputException, match="stored exactly"):
            _capture(con, model, x, y, ids, checkpoint="c1", storage={"tok": "projected"}, proj_dim=3)
    emb = nn.Sequential(nn.Embedding(50, 8), nn.Flatten(), nn.Linear(16, 2))
    with metaql.connect(":memory:") as con:
        t = torch.randint(0, 50, (3, 2))
        con.add_samples(np.arange(3), "train", np.zeros(3, int), t)
        with pytest.raises(InvalidInputException, match="cannot be stored projected"):
            with con.capture(emb, layers=["0"], storage="projected", proj_dim=2) as cap:
                cap.backward(F.cross_entropy(emb(t), torch.zeros(3, dtype=torch.long)), np.arange(3))
