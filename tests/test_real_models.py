"""End to end on real models (issue #17): a small GPT-2 from a transformers config with its
token-level causal-LM loss, and a CNN with BatchNorm, Dropout and an LSTM head. Each query's scores
equal brute force (torch.func per-sample gradients) on the same weights. (An nn.Sequential model
replayed in a fresh process and the shell: tests/test_models_rebuild.py.)

Exactness with Dropout and BatchNorm: capture in training sees the batch's dropout masks and batch
statistics, which couple samples (MetaQL warns); the exact answer is replay at a checkpoint, in eval
mode (dropout off, running statistics), and that is what is compared with brute force."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import metaql
from tests.bruteforce import rel_err


def _flat_grads(model, layers, loss_one, x, y) -> torch.Tensor:
    """(B, P) per-sample gradients of each sample's own loss over the layers' own parameters."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xi, yi):
        return loss_one(functional_call(model, p, (xi.unsqueeze(0),)), yi)
    g = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    own = [k for k in g if k.rsplit(".", 1)[0] in layers]
    assert {k.rsplit(".", 1)[0] for k in own} == set(layers)
    return torch.cat([g[k].reshape(g[k].shape[0], -1) for k in own], 1).double()


def _scores(con):
    inf = con.execute("SELECT score FROM INFLUENCE(query=batch(test)) ORDER BY sample_id").fetchnumpy()["score"]
    self_inf = con.execute("SELECT score FROM SELF_INFLUENCE() ORDER BY sample_id").fetchnumpy()["score"]
    return torch.from_numpy(inf), torch.from_numpy(self_inf)


def _check(con, model, loss_one, x, y, ntrain, lr):
    layers = [r[0] for r in con.execute("SELECT name FROM layers").fetchall()]
    inf, self_inf = _scores(con)
    g = _flat_grads(model, layers, loss_one, x[:ntrain], y[:ntrain])
    gq = _flat_grads(model, layers, loss_one, x[ntrain:], y[ntrain:]).mean(0)
    assert rel_err(inf, lr * g @ gq) < 1e-4
    assert rel_err(self_inf, lr * (g * g).sum(1)) < 1e-4
    return layers


def _lm_loss(logits, tokens):
    """Mean next-token cross-entropy of one sample (written independently of storage/tasks.py)."""
    return F.cross_entropy(logits.logits[0, :-1], tokens[1:])


def test_gpt2_causal_lm_end_to_end():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16, resid_pdrop=0,
                                  embd_pdrop=0, attn_pdrop=0, tie_word_embeddings=False, bos_token_id=1,
                                  eos_token_id=1)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    x = torch.randint(1, 100, (7, 8))
    ids, ntrain, lr = np.arange(7), 5, 0.3
    with metaql.connect(":memory:") as con:
        con.add_samples(ids[:ntrain], "train", inputs=x[:ntrain])
        con.add_samples(ids[ntrain:], "test", inputs=x[ntrain:])
        with pytest.warns(metaql.Warning, match=r"'transformer.wpe' \(is called on inputs of leading dimension 1"):
            with con.capture(model, layers="*", checkpoint="c0", lr=lr, task={"task": "causal_lm"}) as cap:
                cap.backward(cap.loss(model(x[:ntrain]), inputs=x[:ntrain]), ids[:ntrain])
        kinds = dict(con.execute("SELECT name, kind FROM layers").fetchall())
        layers = _check(con, model, _lm_loss, x, x, ntrain, lr)
    assert kinds["transformer.h.0.attn.c_attn"] == "hf_conv1d" and kinds["lm_head"] == "linear"
    assert kinds["transformer.wte"] == "embedding" and kinds["transformer.h.1.ln_2"] == "layernorm"
    assert len(layers) == 1 + 2 * 6 + 1 + 1      # wte, 6 per block, ln_f, lm_head (wpe skipped)


class ConvLSTM(nn.Module):
    """Conv -> BatchNorm -> ReLU -> Dropout -> columns as a sequence -> LSTM -> last step -> head."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.metaql_config = {"classes": classes}
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.3)
        self.lstm = nn.LSTM(4 * 4, 6, batch_first=True)
        self.head = nn.Linear(6, classes)

    def forward(self, x):
        h = self.drop(torch.relu(self.bn(self.conv(x))))         # (B, 4, 4, W)
        seq = h.permute(0, 3, 1, 2).flatten(2)                    # (B, W, 16)
        out, _ = self.lstm(seq)
        return self.head(out[:, -1])


def _ce(out, yi):
    return F.cross_entropy(out, yi.unsqueeze(0))


def test_cnn_with_batchnorm_dropout_and_lstm_end_to_end():
    torch.manual_seed(4)
    model, x, y = ConvLSTM(), torch.randn(9, 1, 4, 5), torch.randint(0, 3, (9,))
    ids, ntrain, lr = np.arange(9), 6, 0.2
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with metaql.connect(":memory:") as con:
        con.add_samples(ids[:ntrain], "train", y[:ntrain].numpy(), x[:ntrain])
        con.add_samples(ids[ntrain:], "test", y[ntrain:].numpy(), x[ntrain:])
        model.train()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with con.capture(model, layers="*", checkpoint="train0", lr=lr) as cap:
                for part in np.array_split(ids[:ntrain], 2):
                    opt.zero_grad()
                    cap.backward(F.cross_entropy(model(x[part]), y[part]), part)
                    opt.step()
        coupled = [str(w.message) for w in seen if "inexact" in str(w.message)]
        assert coupled and "'conv'" in coupled[0] and "'bn'" in coupled[0]     # capture in training warns
        # the exact answer: the trained weights registered as a checkpoint and replayed (eval mode)
        con.checkpoint(model, "c1", lr=lr)
        assert con.replay("c1", "train") == ntrain
        model.eval()
        inf = con.execute("SELECT score FROM INFLUENCE(query=batch(test), checkpoints=[c1]) "
                          "ORDER BY sample_id").fetchnumpy()["score"]
        self_inf = con.execute("SELECT score FROM SELF_INFLUENCE(checkpoints=[c1]) "
                               "ORDER BY sample_id").fetchnumpy()["score"]
        layers = [r[0] for r in con.execute("SELECT name FROM layers").fetchall()]
        kinds = dict(con.execute("SELECT name, kind FROM layers").fetchall())
    assert kinds == {"conv": "conv", "bn": "batchnorm", "lstm": "fallback", "head": "linear"}
    g = _flat_grads(model, layers, _ce, x[:ntrain], y[:ntrain])
    gq = _flat_grads(model, layers, _ce, x[ntrain:], y[ntrain:]).mean(0)
    assert rel_err(torch.from_numpy(inf), lr * g @ gq) < 1e-4
    assert rel_err(torch.from_numpy(self_inf), lr * (g * g).sum(1)) < 1e-4
