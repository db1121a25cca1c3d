"""Layer selection (issue #17): glob patterns, `layers='*'` skipping what gets no gradient with one
notice, explicit layers refused by name, replay defaulting to the layers a store holds."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaql
from metaql.storage.hooks import watched_modules
from tests.bruteforce import per_sample_grads, rel_err, stored_full, flat_layer


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleDict({"q": nn.Linear(4, 4), "k": nn.Linear(4, 4)})
        self.mlp = nn.Linear(4, 4)

    def forward(self, x):
        return self.mlp(torch.tanh(self.attn["q"](x) + self.attn["k"](x)))


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.fc1, self.fc2, self.fc10 = nn.Linear(4, 4), nn.Linear(4, 3), nn.Linear(4, 4)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.fc2(torch.tanh(self.fc1(x)))


class Pooled(nn.Module):
    """A BERT-like head: `pooler` runs but the loss never uses it; `mha` keeps its own packed
    weights and calls `out_proj`'s weights without its forward (its kind captures both)."""

    def __init__(self):
        super().__init__()
        self.metaql_config = {}
        self.emb = nn.Linear(4, 6)
        self.mha = nn.MultiheadAttention(6, 2, batch_first=True)
        self.pooler = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.emb(x)
        a, _ = self.mha(h, h, h, need_weights=False)
        self.pooled = torch.tanh(self.pooler(h[:, 0]))
        return self.head((h + a).mean(1))


def test_glob_patterns_pick_matching_layers():
    model = Blocks()
    got = list(watched_modules(model, ["blocks.*.attn.*", "fc?"]))
    assert got == ["blocks.0.attn.q", "blocks.0.attn.k", "blocks.1.attn.q", "blocks.1.attn.k", "fc1", "fc2"]
    assert list(watched_modules(model, "blocks.1.*")) == ["blocks.1.attn.q", "blocks.1.attn.k", "blocks.1.mlp"]


def test_pattern_matching_nothing_lists_names():
    with pytest.raises(metaql.CatalogException, match=r"'bert\.\*' matches no module.*'blocks\.0\.attn\.q'"):
        watched_modules(Blocks(), "bert.*")


def test_pattern_capture_matches_torch_func():
    torch.manual_seed(0)
    model, x, y = Blocks(), torch.randn(5, 4), torch.randint(0, 3, (5,))
    with metaql.connect(":memory:") as con:
        con.add_samples(np.arange(5), "train", y.numpy(), x)
        with con.capture(model, layers=["blocks.*.attn.*"], checkpoint="c0") as cap:
            cap.backward(F.cross_entropy(model(x), y), np.arange(5))
        assert [r["name"] for r in con.store.layers()] == sorted(
            f"blocks.{i}.attn.{p}" for i in (0, 1) for p in "qk")
        expected = per_sample_grads(model, x, y)
        meta, full = stored_full(con.store, "c0", "blocks.1.attn.k", np.arange(5))
        assert rel_err(full, flat_layer(expected, "blocks.1.attn.k", meta)) < 1e-5


def _pooled_store(con, layers):
    torch.manual_seed(1)
    model, x, y = Pooled(), torch.randn(6, 3, 4), torch.randint(0, 3, (6,))
    con.add_samples(np.arange(6), "train", y.numpy(), x)
    with con.capture(model, layers=layers, checkpoint="c0", lr=0.1) as cap:
        for part in np.array_split(np.arange(6), 2):
            cap.backward(F.cross_entropy(model(x[part]), y[part]), part)
    return model, x, y


def test_star_skips_layers_without_gradient_with_one_notice():
    with metaql.connect(":memory:") as con:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            model, x, y = _pooled_store(con, "*")
        notices = [w for w in seen if issubclass(w.category, metaql.Warning)]
        assert len(notices) == 1, [str(w.message) for w in seen]
        text = str(notices[0].message)
        assert "'pooler'" in text and "0 gradients" in text
        # the attention is captured by its own kind, out_proj with it (not a layer of its own)
        assert "'mha" not in text
        assert [(r["name"], r["kind"]) for r in con.store.layers()] == [
            ("emb", "linear"), ("head", "linear"), ("mha", "multihead_attention")]
        assert con.store.checkpoint("c0")["status"] == "complete"
        assert con.verify() == []


def test_named_layer_without_gradient_is_refused_before_storing():
    with metaql.connect(":memory:") as con:
        with pytest.raises(metaql.InvalidInputException, match=r"layer 'pooler' saw 1 forward calls but 0 gradients"):
            _pooled_store(con, ["emb", "pooler"])
        assert len(con.store.stored_ids("c0", "emb")) == 0


def test_replay_defaults_to_the_layers_held():
    with metaql.connect(":memory:") as con:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, x, y = _pooled_store(con, "*")
            with con.capture(model, layers="*", checkpoint="c1", lr=0.1):
                pass     # weights only: nothing captured at c1
        con.attach_model(model)
        assert con.replay("c1", "train") == 6
        assert [r["name"] for r in con.store.layers()] == ["emb", "head", "mha"]
        assert sorted(con.store.stored_ids("c1", "mha").tolist()) == list(range(6))
        assert sorted(con.store.stored_ids("c1", "head").tolist()) == list(range(6))
        assert con.verify() == []


class Other(nn.Module):
    def __init__(self):
        super().__init__()
        self.metaql_config = {}
        self.a = nn.Linear(4, 3)

    def forward(self, x):
        return self.a(x.mean(1))


def test_replay_refuses_a_model_lacking_held_layers():
    with metaql.connect(":memory:") as con:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _pooled_store(con, ["emb", "head"])
        with con.capture(Other(), layers="*", checkpoint="other", lr=0.1):
            pass
        with pytest.raises(metaql.CatalogException, match=r"holds layers \['emb', 'head'\].*'other' lacks"):
            con.replay("other", "train")
