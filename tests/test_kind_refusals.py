"""Kinds refuse what they do not model, with the reason (issue #17): nn.MultiheadAttention's limits,
layers whose rows are not one per sample, tied weights. Exactness: tests/test_kind_registry_exact.py."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaql
from metaql.storage.hooks import select_layers


class Attn(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True, **kwargs)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x)[0].mean(1))


def test_what_the_kind_does_not_model_is_skipped_or_refused_with_the_reason():
    sel = select_layers(Attn(kdim=3, vdim=3), "*")
    assert list(sel.modules) == ["head"] and "kdim/vdim other than embed_dim" in sel.skipped["attn"]
    assert "add_bias_kv" in select_layers(Attn(add_bias_kv=True), "*").skipped["attn"]
    with pytest.raises(metaql.BinderException, match=r"'attn.out_proj' is captured as part of layer 'attn'"):
        select_layers(Attn(), ["attn.out_proj"])
    assert list(select_layers(Attn(), "attn*").modules) == ["attn"]     # out_proj is not a layer of its own


def test_attention_dropout_in_train_mode_is_refused_before_storing():
    torch.manual_seed(0)
    model, x, y = Attn(dropout=0.5).train(), torch.randn(4, 3, 4), torch.randint(0, 3, (4,))
    with metaql.connect(":memory:") as con, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        con.add_samples(np.arange(4), "train", y.numpy(), x)
        with pytest.raises(metaql.InvalidInputException, match=r"layer 'attn' uses attention dropout .* eval mode"):
            with con.capture(model, layers=["attn", "head"], checkpoint="c0") as cap:
                cap.backward(F.cross_entropy(model(x), y), np.arange(4))
        assert len(con.store.stored_ids("c0", "head")) == 0
        model.eval()                 # eval mode: no dropout, captured exactly
        with con.capture(model, layers=["attn", "head"], checkpoint="c1") as cap:
            cap.backward(F.cross_entropy(model(x), y), np.arange(4))
        assert sorted(con.store.stored_ids("c1", "attn").tolist()) == [0, 1, 2, 3]


def test_tied_weights_warn():
    emb, head = nn.Embedding(5, 4), nn.Linear(4, 5, bias=False)
    head.weight = emb.weight
    with pytest.warns(metaql.Warning, match=r"'0' and '1' share a parameter \(tied weights\)"):
        select_layers(nn.Sequential(emb, head), "*")


class Rows(nn.Module):
    """Position embeddings broadcast over the batch; a Linear over the batch's tokens merged into rows."""

    def __init__(self):
        super().__init__()
        self.emb, self.pos = nn.Embedding(6, 4), nn.Embedding(3, 4)
        self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = self.emb(x) + self.pos(torch.arange(3).unsqueeze(0))
        return self.head(self.fc(h.reshape(-1, 4)).reshape(x.shape[0], 3, 4).mean(1))


def test_layers_whose_rows_are_not_one_per_sample_are_skipped_or_refused():
    torch.manual_seed(0)
    model, x, y = Rows(), torch.randint(0, 6, (5, 3)), torch.randint(0, 3, (5,))
    with metaql.connect(":memory:") as con:
        con.add_samples(np.arange(5), "train", y.numpy(), x)
        with pytest.warns(metaql.Warning, match=r"'pos' \(is called on inputs of leading dimension 1, not the "
                                                r"batch's 5.*'fc' \(is called on inputs of leading dimension 15"):
            with con.capture(model, layers="*", checkpoint="c0") as cap:
                cap.backward(F.cross_entropy(model(x), y), np.arange(5))
        assert [r["name"] for r in con.store.layers()] == ["emb", "head"]
        # named alone, the old code stored the batch's summed gradient under one id (or failed on indexing)
        with pytest.raises(metaql.InvalidInputException, match=r"layer 'pos' is called on inputs of leading dim"):
            with con.capture(model, layers=["pos"], checkpoint="c1") as cap:
                cap.backward(F.cross_entropy(model(x), y), np.arange(5))
        assert [r["name"] for r in con.store.layers()] == ["emb", "head"]     # nothing of pos stored
