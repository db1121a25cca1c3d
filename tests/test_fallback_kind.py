"""The fallback kind (issue #17): any module with parameters of its own that no specialised kind
captures gets exact per-sample gradients (torch.func), stored full and scored by the engine."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaql
from tests.bruteforce import flat_layer, per_sample_grads, rel_err, stored_full


class Twice(nn.Module):
    """A user's module: its parameter used twice per call, and the module called twice."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return torch.tanh(x * self.scale) * self.scale


class Pair(nn.Module):
    """Two tensors in: nothing the fallback kind can replay per sample."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))

    def forward(self, a, b):
        return a * self.w + b


# (module, input shape per sample, numbers per sample out of it)
BODIES = {
    "prelu": (lambda: nn.PReLU(4), (4,), 4),
    "groupnorm": (lambda: nn.GroupNorm(2, 4), (4, 3), 12),
    "rmsnorm": (lambda: nn.RMSNorm(3), (4, 3), 12),
    "convtranspose": (lambda: nn.ConvTranspose2d(4, 2, 2, stride=2), (4, 2, 2), 32),
    "conv3d": (lambda: nn.Conv3d(4, 2, 2), (4, 2, 2, 2), 2),
    "twice": (lambda: Twice(), (4,), 4),
}


class Body(nn.Module):
    def __init__(self, body: str):
        super().__init__()
        self.metaql_config = {"body": body}
        self.pre = nn.Linear(4, 4)
        self.body = BODIES[body][0]()
        self.head = nn.Linear(BODIES[body][2], 3)

    def forward(self, x):
        h = self.pre(x.transpose(1, -1)).transpose(1, -1)
        h = self.body(h)
        if isinstance(self.body, Twice):
            h = self.body(h)
        return self.head(h.flatten(1))


def _model(body: str, n: int):
    torch.manual_seed(3)
    x = torch.randn(n, *BODIES[body][1])
    model = Body(body)
    with torch.no_grad():
        for p in model.body.parameters():
            p.add_(0.5 * torch.randn_like(p))    # away from the identity init: every term matters
    return model, x, torch.randint(0, 3, (n,))


@pytest.mark.parametrize("body", sorted(BODIES))
def test_fallback_captures_exactly(body):
    model, x, y = _model(body, 5)
    ids = np.arange(5)
    with metaql.connect(":memory:") as con:
        con.add_samples(ids, "train", y.numpy(), x)
        with con.capture(model, layers="*", checkpoint="c0", lr=0.1) as cap:
            cap.backward(F.cross_entropy(model(x), y), ids)
        kinds = {r["name"]: (r["kind"], r["storage"]) for r in con.store.layers()}
        assert kinds["body"] == ("fallback", "full")
        expected = per_sample_grads(model, x, y)
        meta, full = stored_full(con.store, "c0", "body", ids)
        assert rel_err(full, flat_layer(expected, "body", meta)) < 1e-5


def test_fallback_influence_equals_bruteforce():
    model, x, y = _model("groupnorm", 9)
    with metaql.connect(":memory:") as con:
        con.add_samples(np.arange(6), "train", y[:6].numpy(), x[:6])
        con.add_samples(np.arange(6, 9), "test", y[6:].numpy(), x[6:])
        con.checkpoint(model, "c0", lr=0.5)
        con.replay("c0", "train")
        got = con.execute("SELECT score FROM INFLUENCE(query=batch(test)) ORDER BY sample_id").fetchnumpy()["score"]
    flat = lambda g: torch.cat([v.reshape(v.shape[0], -1) for v in g.values()], 1).double()   # noqa: E731
    g, gq = flat(per_sample_grads(model, x[:6], y[:6])), flat(per_sample_grads(model, x[6:], y[6:])).mean(0)
    assert rel_err(torch.from_numpy(got), 0.5 * g @ gq) < 1e-5


class WithPair(nn.Module):
    def __init__(self):
        super().__init__()
        self.metaql_config = {}
        self.pair = Pair()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.pair(x, x))


def test_call_the_fallback_cannot_replay():
    x, y, ids = torch.randn(4, 4), torch.randint(0, 3, (4,)), np.arange(4)
    with metaql.connect(":memory:") as con:
        con.add_samples(ids, "train", y.numpy(), x)
        model = WithPair()
        with pytest.warns(metaql.Warning, match=r"'pair' \(is called with other than one tensor"):
            with con.capture(model, layers="*", checkpoint="c0") as cap:
                cap.backward(F.cross_entropy(model(x), y), ids)
        assert [r["name"] for r in con.store.layers()] == ["head"]
        with pytest.raises(metaql.InvalidInputException, match=r"layer 'pair' is called with other than one tensor"):
            with con.capture(model, layers=["pair", "head"], checkpoint="c1") as cap:
                cap.backward(F.cross_entropy(model(x), y), ids)
        assert len(con.store.stored_ids("c1", "head")) == 0


def test_modules_of_several_inputs_are_skipped_up_front():
    model = nn.Sequential(nn.Linear(3, 3), nn.Bilinear(3, 3, 3))
    with metaql.connect(":memory:") as con:
        with pytest.raises(metaql.BinderException, match=r"layer '1' is a Bilinear that takes several inputs"):
            con.capture(model, layers=["1"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cap = con.capture(model, layers="*")
        assert list(cap.hooks.modules) == ["0"] and "1" in cap.hooks.skipped


def test_pattern_leaves_out_huge_full_only_layers_but_a_name_takes_them():
    from metaql.storage.hooks import PATTERN_MAX_FULL, select_layers
    model = nn.Sequential(nn.Linear(3, 3), nn.PReLU(PATTERN_MAX_FULL + 1))
    sel = select_layers(model, "*")
    assert list(sel.modules) == ["0"] and "would store all its" in sel.skipped["1"]
    assert list(select_layers(model, ["0", "1"]).modules) == ["0", "1"]
    with pytest.raises(metaql.BinderException, match="layers= is empty"):
        select_layers(model, [])


class RecurrentNet(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.rnn, self.head = cell(4, 5, batch_first=True), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("cell", [nn.GRU, nn.RNN])
def test_gru_and_rnn_are_captured_exactly_by_the_fallback(cell):
    """nn.GRU and nn.RNN were refused ('takes several inputs'): torch.func cannot vmap their initial
    state. The fallback now takes them one sample at a time where vmap fails: SELF_INFLUENCE equals
    per-sample autograd."""
    torch.manual_seed(0)
    model, x, y = RecurrentNet(cell), torch.randn(5, 6, 4), torch.randint(0, 3, (5,))
    with metaql.connect(":memory:", config={"progress": False}) as con, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        con.add_samples(np.arange(5), "train", y.numpy(), x)
        with con.capture(model, layers="*", checkpoint="c0") as cap:
            cap.backward(F.cross_entropy(model(x), y), np.arange(5))
        kinds = dict(con.execute("SELECT name, kind FROM layers").fetchall())
        got = dict(con.execute("SELECT sample_id, score FROM SELF_INFLUENCE(layers=[rnn])").fetchall())
    assert kinds["rnn"] == "fallback"
    for i in range(5):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), list(model.rnn.parameters()))
        want = sum(float((g.double() ** 2).sum()) for g in grads)
        assert abs(got[i] - want) <= 1e-5 * want, (i, got[i], want)
