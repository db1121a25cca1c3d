"""Captured nn.Linear factors rebuild torch.func per-sample gradients exactly."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import metaql
from metaql.storage.hooks import watched_modules
from metaql.storage.layers import kind_named
from metaql.storage.replay import replay_factors
from tests.bruteforce import flat_layer, per_sample_grads, rel_err
from tests.models import MLP, SeqModel

shapes = st.fixed_dictionaries({
    "b": st.integers(1, 6), "din": st.integers(1, 7), "hidden": st.integers(1, 6),
    "classes": st.integers(2, 4), "bias": st.booleans(), "seq": st.sampled_from([0, 1, 3]),
    "reduction": st.sampled_from(["mean", "sum", "none"]), "seed": st.integers(0, 2**16),
})


def _model_and_data(p):
    torch.manual_seed(p["seed"])
    if p["seq"]:
        model = SeqModel(p["din"], p["hidden"], p["classes"], p["bias"])
        x = torch.randn(p["b"], p["seq"], p["din"])
    else:
        model = MLP(p["din"], p["hidden"], p["classes"], p["bias"])
        x = torch.randn(p["b"], p["din"])
    return model, x, torch.randint(0, p["classes"], (p["b"],))


def _stored_full(con, layer, ids):
    meta, _ = con.store.layer_meta(layer)
    kind = kind_named(meta.kind)
    out = {}
    for row in con.store.factor_shards("c0", layer):
        shard = con.store.open_shard(row["file"], row["checksum"])
        tensors = {n: shard.tensor(n) for n in shard.names()}
        full = tensors["G"] if "G" in tensors else kind.full(meta, tensors)
        out.update({int(i): full[k] for k, i in enumerate(shard.ids)})
    return meta, torch.stack([out[int(i)] for i in ids])


@given(shapes)
def test_training_capture_matches_torch_func(p):
    model, x, y = _model_and_data(p)
    expected = per_sample_grads(model, x, y)
    ids = np.arange(100, 100 + p["b"])
    with metaql.connect(":memory:") as con:
        con.add_samples(ids, "train", y.numpy(), x)
        with con.capture(model, layers="*", checkpoint="c0", lr=0.1, factory="tests.models:"
                         + type(model).__name__, kwargs=model.metaql_config) as cap:
            losses = F.cross_entropy(model(x), y, reduction="none" if p["reduction"] == "none" else p["reduction"])
            cap.backward(losses, ids, reduction="sum" if p["reduction"] == "sum" else "mean")
        for layer in [n for n, _ in model.named_children()]:
            meta, full = _stored_full(con, layer, ids)
            assert rel_err(full, flat_layer(expected, layer, meta)) < 1e-5


@given(shapes)
def test_replay_matches_torch_func(p):
    model, x, y = _model_and_data(p)
    expected = per_sample_grads(model, x, y)
    modules = watched_modules(model, "*")
    factors = replay_factors(model, modules, x, y, batch_size=4)
    for layer, module in modules.items():
        kind = kind_named("linear")
        meta = kind.meta(layer, module)
        assert rel_err(kind.full(meta, factors[layer]), flat_layer(expected, layer, meta)) < 1e-5


def test_training_capture_equals_replay():
    torch.manual_seed(0)
    model = SeqModel()
    x, y = torch.randn(9, 3, 4), torch.randint(0, 3, (9,))
    ids = np.arange(9)
    with metaql.connect(":memory:") as con:
        con.add_samples(ids, "train", y.numpy(), x)
        with con.capture(model, checkpoint="c0", factory="tests.models:SeqModel", kwargs=model.metaql_config) as cap:
            for part in np.array_split(ids, 3):
                cap.backward(F.cross_entropy(model(x[part]), y[part]), part)
        modules = watched_modules(model, "*")
        replayed = replay_factors(model, modules, x, y)
        for layer in modules:
            meta, full = _stored_full(con, layer, ids)
            assert rel_err(full, kind_named("linear").full(meta, replayed[layer])) < 1e-5


def test_unsupported_layer_names_layer_and_kinds():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Bilinear(3, 3, 3))
    with metaql.connect(":memory:") as con, pytest.raises(metaql.BinderException, match=r"layer '1' is a Bilinear.*Linear"):
        con.capture(model, layers=["1"])


def test_unknown_layer_name_suggests():
    with metaql.connect(":memory:") as con, pytest.raises(metaql.CatalogException, match="Did you mean 'fc1'"):
        con.capture(MLP(), layers=["fc_1"])
