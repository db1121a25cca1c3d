"""GRADNORM equals the norm of torch.func per-sample gradients of the same unsupervised loss at the
same weights, for every registered layer kind (the examples of test_kind_registry_exact)."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad, vmap

import metaql
from metaql.errors import BinderException
from tests.bruteforce import rel_err
from tests.test_kind_registry_exact import NTRAIN, _registered_kinds, example_model


def _entropy(logits):
    logp = F.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum()


def _grads(model, x, loss_of, prefix):
    """(B, P): each sample's gradient of loss_of(logits) over the parameters under `prefix`."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xi):
        return loss_of(functional_call(model, p, (xi.unsqueeze(0),)).reshape(1, -1))
    g = vmap(grad(one), in_dims=(None, 0))(params, x)
    return torch.cat([v.reshape(len(x), -1) for k, v in g.items() if k.startswith(prefix)], 1).double()


def brute_entropy_norm(model, x, prefix=""):
    return _grads(model, x, _entropy, prefix).norm(dim=1)


def brute_expected_norm(model, x, prefix=""):
    """sum_c p_c ||grad CE(x, c)||."""
    with torch.no_grad():
        p = torch.softmax(model(x).reshape(len(x), -1), 1).double()
    out = torch.zeros(len(x), dtype=torch.float64)
    for c in range(p.shape[1]):
        out += p[:, c] * _grads(model, x, lambda z, c=c: F.cross_entropy(z, torch.tensor([c])), prefix).norm(dim=1)
    return out


def _store(con, model, x, y, layers):
    ids = np.arange(len(x))
    con.add_samples(ids[:NTRAIN], "train", y[:NTRAIN].numpy(), x[:NTRAIN])
    con.add_samples(ids[NTRAIN:], "test", None, x[NTRAIN:])      # the pool: never labeled
    with con.capture(model, layers=layers, checkpoint="c0", lr=0.5) as cap:
        cap.backward(F.cross_entropy(model(x[:NTRAIN]), y[:NTRAIN]), ids[:NTRAIN])


def _scores(con, sql):
    return torch.from_numpy(con.execute(sql).fetchnumpy()["score"])


@pytest.mark.parametrize("kind", _registered_kinds())
@settings(max_examples=1, deadline=None, derandomize=True)
@given(data=st.data())
def test_gradnorm_is_exact_for_every_kind(kind, data):
    model, x, y = example_model(kind, data.draw)
    with metaql.connect(":memory:") as con, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _store(con, model, x, y, ["body"])
        ent = _scores(con, "SELECT score FROM GRADNORM(pool=test, loss=entropy, layers=[body]) ORDER BY sample_id")
        exp = _scores(con, "SELECT score FROM GRADNORM(pool=test, layers=[body], expectation=norm) "
                           "ORDER BY sample_id")
    assert rel_err(ent, brute_entropy_norm(model, x[NTRAIN:], "body.")) < 1e-4
    assert rel_err(exp, brute_expected_norm(model, x[NTRAIN:], "body.")) < 1e-4


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.metaql_config = {}
        self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def test_all_layers_expected_equals_entropy_and_brute_force():
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(10, 5)
    y = torch.randint(0, 4, (10,))
    with metaql.connect(":memory:") as con:
        _store(con, model, x, y, "*")
        exp = _scores(con, "SELECT score FROM GRADNORM(pool=test) ORDER BY sample_id")
        ent = _scores(con, "SELECT score FROM GRADNORM(pool=test, loss=entropy, layers='*') ORDER BY sample_id")
        norm = _scores(con, "SELECT score FROM GRADNORM(pool=test, expectation=norm) ORDER BY sample_id")
        ids = con.execute("SELECT sample_id FROM GRADNORM(pool=test) ORDER BY sample_id").fetchnumpy()["sample_id"]
        with pytest.raises(BinderException, match="loss=expected"):
            con.execute("SELECT * FROM GRADNORM(pool=test, loss=entropy, expectation=norm)")
    assert ids.tolist() == list(range(NTRAIN, 10))
    # sum_c p_c CE(c) with p attached is H(p): the two losses are one function
    assert rel_err(exp, ent) < 1e-12
    assert rel_err(exp, brute_entropy_norm(model, x[NTRAIN:])) < 1e-5
    assert rel_err(norm, brute_expected_norm(model, x[NTRAIN:])) < 1e-5
    # the readings differ: the expected norm is not the norm of the expected loss's gradient
    assert rel_err(norm, exp) > 1e-2


def test_detached_expectation_has_zero_gradient():
    """Why the detached reading of Eq. 6 is not offered: its gradient vanishes for softmax CE."""
    torch.manual_seed(1)
    model, x = MLP(), torch.randn(3, 5)

    def detached(z):
        p = torch.softmax(z, 1).detach()
        return sum(p[0, c] * F.cross_entropy(z, torch.tensor([c])) for c in range(z.shape[1]))
    g = _grads(model, x, detached, "")
    assert g.abs().max() < 1e-6 < brute_entropy_norm(model, x).min()
