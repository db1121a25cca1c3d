"""Sound layer kinds (issue #17): a kind applies to its exact module type, or to a subclass that
computes the same thing (others get the exact fallback kind or are refused); a layer a train-mode BatchNorm couples across samples gets a warning."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaql
from tests.bruteforce import flat_layer, per_sample_grads, rel_err, stored_full
from tests.layer_models import BNNet


class Scaled(nn.Linear):
    """Its own forward: the gradient of its weight is twice what a plain Linear's factors give."""

    def forward(self, x):
        return F.linear(x, 2 * self.weight, self.bias)


class Tagged(nn.Linear):
    """A subclass that adds nothing to the computation: a Linear's factors are exact."""
    tag = "mine"


class Net(nn.Module):
    def __init__(self, first: type = Scaled):
        super().__init__()
        self.metaql_config = {}
        self.fc = first(5, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)))


def _capture(con, model, layers, x, y):
    ids = np.arange(len(x))
    con.add_samples(ids, "train", y.numpy(), x)
    with con.capture(model, layers=layers, checkpoint="c0", lr=0.1) as cap:
        cap.backward(F.cross_entropy(model(x), y), ids)
    return ids


def _data(n=6):
    torch.manual_seed(0)
    return torch.randn(n, 5), torch.randint(0, 3, (n,))


@pytest.mark.parametrize("layers", ["*", ["fc", "head"]])
def test_linear_subclass_with_own_forward_is_not_captured_as_linear(layers):
    """A plain Linear's factors of `Scaled` are off by a relative error of 0.5: it gets the exact
    fallback kind instead (storage/layers/fallback.py)."""
    x, y = _data()
    model = Net()
    with metaql.connect(":memory:") as con:
        ids = _capture(con, model, layers, x, y)
        assert {r["name"]: r["kind"] for r in con.store.layers()} == {"fc": "fallback", "head": "linear"}
        expected = per_sample_grads(model, x, y)
        for layer in ("fc", "head"):
            meta, full = stored_full(con.store, "c0", layer, ids)
            assert rel_err(full, flat_layer(expected, layer, meta)) < 1e-5


def test_subclass_without_own_forward_uses_the_parent_kind_exactly():
    x, y = _data()
    model = Net(Tagged)
    with metaql.connect(":memory:") as con:
        ids = _capture(con, model, ["fc", "head"], x, y)
        meta, full = stored_full(con.store, "c0", "fc", ids)
        assert meta.kind == "linear"
        assert rel_err(full, flat_layer(per_sample_grads(model, x, y), "fc", meta)) < 1e-5


def test_parametrized_weight_is_not_a_plain_linear():
    model = Net(nn.Linear)
    torch.nn.utils.parametrizations.weight_norm(model.fc)
    with metaql.connect(":memory:") as con:
        with pytest.raises(metaql.BinderException, match=r"layer 'fc' is a ParametrizedLinear that computes its weight through a parametrization"):
            con.capture(model, layers=["fc"])


def test_layer_below_train_mode_batchnorm_warns_and_replay_does_not():
    torch.manual_seed(0)
    model, x, y = BNNet(), torch.randn(6, 2, 5, 5), torch.randint(0, 3, (6,))
    with metaql.connect(":memory:") as con:
        with pytest.warns(metaql.Warning, match=r"inexact for 'conv' \(its output reaches 'bn'\).*con\.replay"):
            _capture(con, model, "*", x, y)
        with warnings.catch_warnings():
            warnings.simplefilter("error", metaql.Warning)
            con.checkpoint(model, "c1", lr=0.1)
            con.replay("c1", "train")       # eval mode: running statistics, no coupling
        model.eval()
        meta, full = stored_full(con.store, "c1", "conv", np.arange(6))
        assert rel_err(full, flat_layer(per_sample_grads(model, x, y), "conv", meta)) < 1e-5
