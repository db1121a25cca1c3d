"""Capture under gradient checkpointing (torch.utils.checkpoint; Hugging Face's
gradient_checkpointing_enable). Without reentry the checkpointed block's forward runs again inside
the backward pass: on the old code its layers 'saw 2 forward calls but 1 gradients' and a capture
naming them was refused (under layers='*' they were skipped with a warning). Each case must give
the per-sample gradients of torch.func on the same weights."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import metaql
from tests.bruteforce import per_sample_grads, rel_err


class CheckpointedMLP(nn.Module):
    def __init__(self, use_reentrant: bool):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.use_reentrant = use_reentrant

    def block(self, h):
        return torch.tanh(self.fc2(torch.tanh(self.fc1(h))))

    def forward(self, x):
        if self.training:
            return self.fc3(checkpoint(self.block, x, use_reentrant=self.use_reentrant))
        return self.fc3(self.block(x))


def _self_influence(con):
    return torch.from_numpy(con.execute("SELECT score FROM SELF_INFLUENCE() ORDER BY sample_id").fetchnumpy()["score"])


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointed_block_is_captured_exactly(use_reentrant):
    torch.manual_seed(0)
    model, x, y = CheckpointedMLP(use_reentrant), torch.randn(10, 6), torch.randint(0, 3, (10,))
    # with reentry, torch backpropagates into the block only if its input requires grad
    x_in = x.clone().requires_grad_(use_reentrant)
    with metaql.connect(":memory:") as con:
        con.add_samples(np.arange(10), "train", y.numpy(), x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)     # the model class lives in a test module
            with con.capture(model, layers=["fc1", "fc2", "fc3"], checkpoint="c", lr=1.0) as cap:
                cap.backward(F.cross_entropy(model(x_in), y), np.arange(10))
        got = _self_influence(con)
    g = per_sample_grads(model.eval(), x, y)
    g = torch.cat([v.reshape(10, -1) for v in g.values()], 1).double()
    assert rel_err(got, (g * g).sum(1)) < 1e-5


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gpt2_with_gradient_checkpointing_enabled(use_reentrant):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=8, resid_pdrop=0,
                                  embd_pdrop=0, attn_pdrop=0, tie_word_embeddings=False)
    model = transformers.GPT2LMHeadModel(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)     # renamed activation_checkpointing_enable in v5
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.train()                       # HF checkpoints only in training mode; dropout is 0
    tokens, layers = torch.randint(0, 50, (6, 8)), ["transformer.h.0.mlp.c_fc", "transformer.h.1.attn.c_attn", "lm_head"]
    with metaql.connect(":memory:") as con:
        con.add_samples(np.arange(6), "train", inputs=tokens)
        with con.capture(model, layers=layers, checkpoint="c", lr=1.0, task={"task": "causal_lm"}) as cap:
            cap.backward(cap.loss(model(tokens), inputs=tokens), np.arange(6))
        got = _self_influence(con)
    plain = transformers.GPT2LMHeadModel(cfg).eval()      # the same weights, never checkpointed
    plain.load_state_dict(model.state_dict())
    params = {k: v.detach() for k, v in plain.named_parameters()}

    def one(p, t):
        logits = torch.func.functional_call(plain, p, (t.unsqueeze(0),)).logits
        return F.cross_entropy(logits[0, :-1], t[1:])
    g = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0))(params, tokens)
    g = torch.cat([g[k].reshape(6, -1) for k in g if k.rsplit(".", 1)[0] in layers], 1).double()
    assert rel_err(got, (g * g).sum(1)) < 1e-4
