"""A query's scores equal TracIn computed from explicitly built per-sample gradients."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import metaql
from tests.bruteforce import per_sample_grads, rel_err
from tests.layer_models import ConvNet, TextNet
from tests.models import MLP, SeqModel

MODELS = {
    "mlp": (lambda: MLP(), lambda n: torch.randn(n, 6)),
    "seq": (lambda: SeqModel(), lambda n: torch.randn(n, 3, 4)),
    "conv": (lambda: ConvNet(2, 2, 4, 3, padding=1, groups=2, size=5), lambda n: torch.randn(n, 2, 5, 5)),
    "text": (lambda: TextNet(), lambda n: torch.randint(0, 11, (n, 4))),
}


def _flat(grads: dict, layers) -> torch.Tensor:
    parts = [v.reshape(v.shape[0], -1) for k, v in grads.items() if k.rsplit(".", 1)[0] in layers]
    return torch.cat(parts, dim=1)


def _build(con, model, x, y, ntrain, checkpoints, lrs, seed):
    """Trains with capture; returns the weights at each checkpoint (as the store saves them)."""
    ids = np.arange(len(x))
    con.add_samples(ids[:ntrain], "train", y[:ntrain].numpy(), x[:ntrain])
    con.add_samples(ids[ntrain:], "test", y[ntrain:].numpy(), x[ntrain:])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    states = []
    for c, lr in zip(range(checkpoints), lrs):
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        with con.capture(model, checkpoint=f"c{c}", lr=lr, factory=f"{type(model).__module__}:{type(model).__name__}",
                         kwargs=model.metaql_config) as cap:
            cap.backward(F.cross_entropy(model(x[:ntrain]), y[:ntrain]), ids[:ntrain])
        # change the weights between checkpoints (capture happens before this update)
        with torch.no_grad():
            for prm in model.parameters():
                prm.add_(0.3 * torch.randn_like(prm))
    return states


def _query_grad(model, x, y, layers, target):
    return _flat(per_sample_grads(model, x, y, target), layers).double().mean(0)


def _expected(model, states, lrs, x, y, ntrain, query, layers, similarity="dot", self_inf=False, target="label"):
    total = torch.zeros(ntrain, dtype=torch.float64)
    for state, lr in zip(states, lrs):
        model.load_state_dict(state)
        g = _flat(per_sample_grads(model, x[:ntrain], y[:ntrain]), layers).double()
        if self_inf:
            total += lr * (g * g).sum(1)
            continue
        gq = _query_grad(model, x[query], y[query], layers, target)
        s = g @ gq
        if similarity == "cosine":
            s = s / (g.norm(dim=1) * gq.norm())
        total += lr * s
    return total


params = st.fixed_dictionaries({"model": st.sampled_from(sorted(MODELS)), "ntrain": st.integers(3, 12), "nq": st.integers(1, 4),
                                "ckpts": st.integers(1, 3), "seed": st.integers(0, 2**16),
                                "similarity": st.sampled_from(["dot", "cosine"]),
                                "strategy": st.sampled_from([None, "iterate", "batch_average", "reconstruct", "recompute"])})


@given(params)
def test_influence_equals_tracin_bruteforce(p):
    torch.manual_seed(p["seed"])
    n = p["ntrain"] + p["nq"]
    make_model, make_x = MODELS[p["model"]]
    model, x, y = make_model(), make_x(n), torch.randint(0, 3, (n,))
    lrs = [0.5, 0.25, 0.125][:p["ckpts"]]
    config = {"force_strategy": p["strategy"]} if p["strategy"] else None
    with metaql.connect(":memory:", config=config) as con:
        states = _build(con, model, x, y, p["ntrain"], p["ckpts"], lrs, p["seed"])
        layers = [r[0] for r in con.execute("SELECT name FROM layers ORDER BY name").fetchall()]
        got = con.execute(f"SELECT sample_id, score FROM INFLUENCE(layers=[{', '.join(layers)}], "
                          f"query=batch(test), similarity={p['similarity']}) ORDER BY sample_id").fetchnumpy()
    expected = _expected(model, states, lrs, x, y, p["ntrain"], slice(p["ntrain"], n), layers, p["similarity"])
    assert list(got["sample_id"]) == list(range(p["ntrain"]))
    assert rel_err(torch.from_numpy(got["score"]), expected) < 1e-5


def test_topk_order_and_self_influence(store_dir):
    torch.manual_seed(1)
    model, x, y = MLP(), torch.randn(14, 6), torch.randint(0, 3, (14,))
    lrs = [0.5, 0.1]
    with metaql.connect(store_dir) as con:
        states = _build(con, model, x, y, 10, 2, lrs, 1)
        asc = con.execute("SELECT TOPK(4) train FROM INFLUENCE(layers=*, query=batch(test)) ORDER BY ASC").fetchall()
        desc = con.execute("SELECT TOPK(3) train FROM SELF_INFLUENCE(layers=*) ORDER BY DESC").fetchall()
        point = con.execute("SELECT * FROM INFLUENCE(query=point(12), checkpoints=[c1])").fetchnumpy()
    inf = _expected(model, states, lrs, x, y, 10, slice(10, 14), ["fc1", "fc2"])
    assert [r[0] for r in asc] == torch.argsort(inf)[:4].tolist()
    assert np.allclose([r[1] for r in asc], torch.sort(inf).values[:4].numpy(), rtol=1e-5)
    selfinf = _expected(model, states, lrs, x, y, 10, None, ["fc1", "fc2"], self_inf=True)
    assert [r[0] for r in desc] == torch.argsort(selfinf, descending=True)[:3].tolist()
    one = _expected(model, states[1:], lrs[1:], x, y, 10, slice(12, 13), ["fc1", "fc2"])
    assert rel_err(torch.from_numpy(point["score"]), one) < 1e-5


def test_query_errors_name_what_exists(store_dir):
    torch.manual_seed(2)
    model, x, y = MLP(), torch.randn(8, 6), torch.randint(0, 3, (8,))
    with metaql.connect(store_dir) as con:
        _build(con, model, x, y, 6, 1, [0.1], 2)
        with pytest.raises(metaql.CatalogException, match="Did you mean 'fc2'"):
            con.execute("SELECT TOPK(3) train FROM INFLUENCE(layers=[fc3], query=batch(test)) ORDER BY ASC")
        with pytest.raises(metaql.CatalogException, match="unknown set 'tset'.*Did you mean 'test'"):
            con.execute("SELECT TOPK(3) train FROM INFLUENCE(query=batch(tset)) ORDER BY ASC")
        with pytest.raises(metaql.CatalogException, match="Did you mean INFLUENCE"):
            con.execute("SELECT * FROM INFLUENCES(query=batch(test))")
        with pytest.raises(metaql.BinderException, match="no argument 'querry'.*Did you mean 'query'"):
            con.execute("SELECT TOPK(3) train FROM INFLUENCE(querry=batch(test)) ORDER BY ASC")
        with pytest.raises(metaql.CatalogException, match="unknown checkpoint 'c9'"):
            con.execute("SELECT * FROM INFLUENCE(query=batch(test), checkpoints=[c9])")
        with pytest.raises(metaql.InvalidInputException, match="empty"):
            con.execute("CREATE SET nothing AS SELECT sample_id FROM samples WHERE false")
            con.execute("SELECT * FROM INFLUENCE(query=batch(nothing))")


@pytest.mark.parametrize("target", ["pred", "expected"])
def test_query_loss_targets_and_totals(store_dir, target):
    torch.manual_seed(3)
    model, x, y = MLP(), torch.randn(12, 6), torch.randint(0, 3, (12,))
    lrs = [0.3, 0.2]
    with metaql.connect(store_dir) as con:
        states = _build(con, model, x, y, 9, 2, lrs, 3)
        got = con.execute(f"SELECT score FROM INFLUENCE(query=batch(test), loss={target}) ORDER BY sample_id").fetchnumpy()
        con.execute("CREATE SET few AS SELECT sample_id FROM samples WHERE sample_id IN (1, 4, 5)")
        total = con.execute(f"SELECT * FROM INFLUENCE(train=batch(few), query=point(10), total=true)").fetchall()
        with pytest.raises(metaql.BinderException, match="cosine"):
            con.execute("SELECT * FROM INFLUENCE(query=point(10), total=true, similarity=cosine)")
    expected = _expected(model, states, lrs, x, y, 9, slice(9, 12), ["fc1", "fc2"], target=target)
    assert rel_err(torch.from_numpy(got["score"]), expected) < 1e-5
    one = _expected(model, states, lrs, x, y, 9, slice(10, 11), ["fc1", "fc2"])
    assert total[0][0] == 3 and abs(total[0][1] - float(one[[1, 4, 5]].sum())) < 1e-5 * abs(float(one[[1, 4, 5]].sum())) + 1e-9


@settings(max_examples=6, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 4), st.sampled_from([None, "iterate", "batch_average", "reconstruct"]))
def test_reduce_sum_is_the_sum_of_per_query_scores(seed, nq, strategy):
    """Issue #19: a batch's influence as the sum over its samples (captum's and TRAK's convention),
    not only their mean: equals sum_q <g_i, g_q> from explicitly built per-sample gradients."""
    torch.manual_seed(seed)
    ntrain = 6
    model, x, y = MLP(), torch.randn(ntrain + nq, 6), torch.randint(0, 3, (ntrain + nq,))
    lrs = [0.5, 0.25]
    with metaql.connect(":memory:", config={"force_strategy": strategy} if strategy else None) as con:
        states = _build(con, model, x, y, ntrain, 2, lrs, seed)
        got = {r: con.execute(f"SELECT score FROM INFLUENCE(layers=[fc1, fc2], query=batch(test), reduce={r}) "
                              "ORDER BY sample_id").fetchnumpy()["score"] for r in ("sum", "mean")}
        with pytest.raises(metaql.BinderException, match="reduce= should be one of mean, sum"):
            con.execute("SELECT * FROM INFLUENCE(query=batch(test), reduce=max)")
    want = torch.zeros(ntrain, dtype=torch.float64)
    for state, lr in zip(states, lrs):
        model.load_state_dict(state)
        g = _flat(per_sample_grads(model, x[:ntrain], y[:ntrain]), ["fc1", "fc2"]).double()
        gq = _flat(per_sample_grads(model, x[ntrain:], y[ntrain:]), ["fc1", "fc2"]).double()
        want += lr * (g @ gq.T).sum(1)
    assert rel_err(torch.from_numpy(got["sum"]), want) < 1e-5
    assert rel_err(torch.from_numpy(got["mean"]), want / nq) < 1e-5


def test_query_given_as_tensors_equals_the_registered_query(store_dir):
    """Issue #19: query samples passed by the caller (con.influence(query=(x, y))), not registered:
    the same scores as INFLUENCE over the same samples registered as a set, and as brute force."""
    torch.manual_seed(5)
    model, x, y = MLP(), torch.randn(14, 6), torch.randint(0, 3, (14,))
    lrs = [0.5, 0.1]
    with metaql.connect(store_dir) as con:
        states = _build(con, model, x, y, 10, 2, lrs, 5)
        registered = con.execute("SELECT sample_id, score FROM INFLUENCE(layers=*, query=batch(test)) "
                                 "ORDER BY sample_id").fetchall()
        given = con.influence(query=(x[10:], y[10:])).fetchall()
        summed = con.influence(query=(x[10:], y[10:]), layers=["fc2"], reduce="sum", checkpoints="last").fetchall()
        by_pred = con.influence(query=x[10:], loss="pred").fetchall()
        with pytest.raises(metaql.InvalidInputException, match="loss='label' needs the query's labels"):
            con.influence(query=x[10:])
        with pytest.raises(metaql.InvalidInputException, match="4 query inputs but 3 labels"):
            con.influence(query=(x[10:], y[10:13]))
        with pytest.raises(metaql.InvalidInputException, match="NaN"):
            con.influence(query=(torch.full((2, 6), float("nan")), y[:2]))
        # what the model cannot take is the caller's input error (a torch RuntimeError / IndexError before)
        for bad in ((torch.randn(4, 5), y[10:]), (x[10:], torch.tensor([0, 1, 2, 7]))):
            for each in (False, True):
                with pytest.raises(metaql.InvalidInputException, match="cannot take these samples"):
                    con.influence(query=bad, each=each)
        numpy_given = con.influence(query=(x[10:].numpy(), y[10:].numpy())).fetchall()
        assert con.execute("SELECT count(*) FROM samples").fetchone()[0] == 14     # nothing registered
    assert numpy_given == given
    assert [r[0] for r in given] == [r[0] for r in registered]
    assert np.allclose([r[1] for r in given], [r[1] for r in registered], rtol=1e-6)
    want = _expected(model, states, lrs, x, y, 10, slice(10, 14), ["fc1", "fc2"])
    assert rel_err(torch.tensor([r[1] for r in given]), want) < 1e-5
    last = _expected(model, states[1:], lrs[1:], x, y, 10, slice(10, 14), ["fc2"]) * 4
    assert rel_err(torch.tensor([r[1] for r in summed]), last) < 1e-5
    assert len(by_pred) == 10


def test_registered_samples_the_model_cannot_take_are_an_input_error(store_dir):
    """A registered query set with a class beyond the model's outputs: an InvalidInputException
    that says so (an InternalException "please report this" before), and the store still answers."""
    torch.manual_seed(6)
    model, x, y = MLP(), torch.randn(12, 6), torch.randint(0, 3, (12,))
    with metaql.connect(store_dir) as con:
        _build(con, model, x, y, 10, 1, [0.5], 6)
        con.add_samples([100, 101], "odd", [1, 7], torch.randn(2, 6))
        for query in ("batch(odd)", "each(odd)"):
            with pytest.raises(metaql.InvalidInputException, match="cannot take these samples.*Target 7"):
                con.execute(f"SELECT * FROM INFLUENCE(layers=*, query={query})")
        assert len(con.execute("SELECT * FROM INFLUENCE(layers=*, query=batch(test))").fetchall()) == 10


def test_a_training_side_without_stored_factors_is_refused_with_what_to_do(store_dir):
    """Ranking a set that was never captured (the test split) answered with no rows and no word
    why; it is refused, naming con.replay, and after the replay the same statement answers."""
    torch.manual_seed(7)
    model, x, y = MLP(), torch.randn(14, 6), torch.randint(0, 3, (14,))
    with metaql.connect(store_dir) as con:
        _build(con, model, x, y, 10, 2, [0.5, 0.1], 7)
        statements = ["SELECT TOPK(2) test FROM SELF_INFLUENCE(layers=*) ORDER BY DESC",
                      "SELECT * FROM INFLUENCE(layers=[fc2], query=batch(test), train=batch(test))",
                      "SELECT * FROM INFLUENCE(layers=*, query=each(test), train=test)",
                      "SELECT * FROM INFLUENCE(layers=*, query=batch(test), train=point(12))"]
        for sql in statements:
            with pytest.raises(metaql.InvalidInputException, match=r"no factors are stored .*con\.replay"):
                con.execute(sql)
        assert len(con.execute("SELECT * FROM INFLUENCE(layers=*, query=batch(test), train=point(3))").fetchall()) == 1
        con.replay("c1", samples="test")
        assert len(con.execute(statements[0]).fetchall()) == 2
        assert len(con.execute(statements[3]).fetchall()) == 1
