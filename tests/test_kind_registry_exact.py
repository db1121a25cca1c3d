"""Every registered layer kind, the fallback included, taken from the registry itself: its stored
factors rebuild torch.func's per-sample gradients on shapes drawn by hypothesis, and INFLUENCE /
SELF_INFLUENCE through SQL equal brute force. A kind registered without an entry in EXAMPLES fails
here, so no kind lands untested."""
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
from metaql.storage.layers import base, kind_named
from tests.bruteforce import rel_err, stored_full

CLASSES, NTRAIN, NTEST, LR = 3, 4, 2, 0.5


class Net(nn.Module):
    """`body` (the layer under test) called by `call`, then tanh, flatten and a linear head."""

    def __init__(self, body: nn.Module, call, x: torch.Tensor):
        super().__init__()
        self.body, self.call = body, call
        with torch.no_grad():
            width = torch.tanh(call(body, x[:1])).flatten(1).shape[1]
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x):
        return self.head(torch.tanh(self.call(self.body, x)).flatten(1))


def _plain(body, x):
    return body(x)


def linear(draw):
    din, dout, rows = draw(st.integers(1, 5)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    return nn.Linear(din, dout, bias=draw(st.booleans())), _plain, torch.randn(NTRAIN + NTEST, rows, din)


def conv(draw):
    dims, k = draw(st.sampled_from([1, 2])), draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2]))
    cls = nn.Conv1d if dims == 1 else nn.Conv2d
    body = cls(2, 2 * draw(st.integers(1, 2)), k, stride=draw(st.integers(1, 2)), padding=draw(st.integers(0, 1)),
               groups=groups, bias=draw(st.booleans()))
    return body, _plain, torch.randn(NTRAIN + NTEST, 2, *(draw(st.integers(k, 5)),) * dims)


def embedding(draw):
    vocab, dim = draw(st.integers(2, 7)), draw(st.integers(1, 4))
    padding = draw(st.one_of(st.none(), st.integers(0, vocab - 1)))
    return nn.Embedding(vocab, dim, padding_idx=padding), _plain, \
        torch.randint(0, vocab, (NTRAIN + NTEST, draw(st.integers(1, 4))))


def layernorm(draw):
    dim = draw(st.integers(2, 5))
    return nn.LayerNorm(dim, elementwise_affine=True, bias=draw(st.booleans())), _plain, \
        torch.randn(NTRAIN + NTEST, draw(st.integers(1, 3)), dim)


def batchnorm(draw):
    dims, c = draw(st.sampled_from([1, 2])), draw(st.integers(1, 3))
    body = (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(c)
    with torch.no_grad():      # eval mode (capture and replay alike): running statistics away from 0/1
        body.running_mean.uniform_(-1, 1), body.running_var.uniform_(0.5, 2)
    return body, _plain, torch.randn(NTRAIN + NTEST, c, *(3,) * dims)


def multihead_attention(draw):
    heads, batch_first, cross = draw(st.sampled_from([1, 2])), draw(st.booleans()), draw(st.booleans())
    e, t = 2 * draw(st.integers(1, 3)), draw(st.integers(2, 4))
    body = nn.MultiheadAttention(e, heads, bias=draw(st.booleans()), batch_first=batch_first)
    masked = draw(st.booleans())

    def call(m, x):
        kv = torch.tanh(x) if cross else x
        mask = (x[:, -1:, 0] > 0).expand(-1, x.shape[1]).clone() if masked else None
        if mask is not None:
            mask[:, :-1] = False        # only the last key may be masked: no row masked whole
        q, kv = (x, kv) if batch_first else (x.transpose(0, 1), kv.transpose(0, 1))
        out = m(q, kv if cross else q, kv if cross else q, key_padding_mask=mask, need_weights=masked)[0]
        return out if batch_first else out.transpose(0, 1)
    return body, call, torch.randn(NTRAIN + NTEST, t, e)


class Scaled(nn.Module):
    """A user's module with a parameter used twice: only the fallback kind captures it."""

    def __init__(self, n):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(n))

    def forward(self, x):
        scale = self.scale.reshape(-1, *[1] * (x.dim() - 2))     # per channel (dim 1), as the examples give
        return torch.tanh(x * scale) * scale


def fallback(draw):
    n = draw(st.integers(2, 4))
    body = draw(st.sampled_from([lambda: nn.PReLU(n), lambda: nn.GroupNorm(1, n), lambda: Scaled(n),
                                 lambda: nn.ConvTranspose1d(n, 2, 2)]))()
    return body, _plain, torch.randn(NTRAIN + NTEST, n, 3)


def hf_conv1d(draw):
    from transformers.pytorch_utils import Conv1D
    nx, nf = draw(st.integers(1, 5)), draw(st.integers(1, 4))
    return Conv1D(nf, nx), _plain, torch.randn(NTRAIN + NTEST, draw(st.integers(1, 3)), nx)


EXAMPLES = {f.__name__: f for f in (linear, conv, embedding, layernorm, batchnorm, multihead_attention, fallback,
                                    hf_conv1d)}


def _registered_kinds() -> list[str]:
    """MetaQL's own kinds that capture modules (a test may register a user's kind, tests/user_kind.py;
    'projected' is a storage form of another kind's layer, metaql.approx, checked by tests/test_approx.py)."""
    return sorted(name for name, k in base._BY_NAME.items()
                  if type(k).__module__.startswith("metaql.") and name != "projected")


def test_every_registered_kind_has_an_example():
    assert set(EXAMPLES) >= set(_registered_kinds()), \
        f"kinds without an exactness example here: {sorted(set(_registered_kinds()) - set(EXAMPLES))}"


def _per_sample(model, x, y) -> torch.Tensor:
    """(B, P) torch.func gradients of each sample's cross-entropy over `body`'s parameters, in the
    layout of the kind's `full`."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))
    g = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    return {k[len("body."):]: v for k, v in g.items() if k.startswith("body.")}


def example_model(kind: str, draw):
    """A kind's example drawn by hypothesis: (the model around the layer `body`, inputs, labels),
    the layer's weights moved away from identity inits so that every term of its gradient matters."""
    torch.manual_seed(draw(st.integers(0, 2 ** 16), label="seed"))
    body, call, x = EXAMPLES[kind](draw)
    model = Net(body, call, x).eval()
    with torch.no_grad():
        for p in body.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return model, x, torch.randint(0, CLASSES, (len(x),))


@pytest.mark.parametrize("kind", _registered_kinds())
@settings(max_examples=3, deadline=None, derandomize=True)
@given(data=st.data())
def test_kind_is_exact(kind, data):
    assert kind in EXAMPLES, f"layer kind '{kind}' is registered without an exactness example in EXAMPLES"
    model, x, y = example_model(kind, data.draw)
    ids = np.arange(len(x))
    with metaql.connect(":memory:") as con, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        con.add_samples(ids[:NTRAIN], "train", y[:NTRAIN].numpy(), x[:NTRAIN])
        con.add_samples(ids[NTRAIN:], "test", y[NTRAIN:].numpy(), x[NTRAIN:])
        with con.capture(model, layers=["body"], checkpoint="c0", lr=LR) as cap:
            cap.backward(F.cross_entropy(model(x[:NTRAIN]), y[:NTRAIN]), ids[:NTRAIN])
        assert con.store.layers()[0]["kind"] == kind
        meta, full = stored_full(con.store, "c0", "body", ids[:NTRAIN])
        inf = con.execute("SELECT score FROM INFLUENCE(layers=[body], query=batch(test)) ORDER BY sample_id").fetchnumpy()
        self_inf = con.execute("SELECT score FROM SELF_INFLUENCE(layers=[body]) ORDER BY sample_id").fetchnumpy()
        forms = {}
        for form in ("self_gram", "self_full"):      # both self-norm forms, whichever cost picks
            con.config["force_strategy"] = form
            forms[form] = con.execute("SELECT score FROM SELF_INFLUENCE(layers=[body]) ORDER BY sample_id"
                                      ).fetchnumpy()["score"]
    flat = kind_named(kind).torch_grad_vector
    g = flat(meta, _per_sample(model, x[:NTRAIN], y[:NTRAIN])).double()
    gq = flat(meta, _per_sample(model, x[NTRAIN:], y[NTRAIN:])).double().mean(0)
    assert rel_err(full, g) < 1e-4
    assert rel_err(torch.from_numpy(inf["score"]), LR * g @ gq) < 1e-4
    assert rel_err(torch.from_numpy(self_inf["score"]), LR * (g * g).sum(1)) < 1e-4
    for form, scores in forms.items():      # a layer stored full has one form: forcing another is a no-op
        assert rel_err(torch.from_numpy(scores), LR * (g * g).sum(1)) < 1e-4, form
