"""Every layer kind's stored factors rebuild torch.func per-sample gradients exactly."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

import metaql
from metaql.storage.attention import ExplicitMultiheadAttention, make_capturable
from tests.bruteforce import flat_layer, per_sample_grads, rel_err, stored_full
from tests.layer_models import BNNet, ConvNet, TextNet


def _capture_and_compare(model, x, y, layers, replay=False, storage=None):
    expected = per_sample_grads(model, x, y)
    ids = np.arange(len(x))
    with metaql.connect(":memory:") as con:
        con.add_samples(ids, "train", y.numpy(), x)
        factory = f"{type(model).__module__}:{type(model).__name__}"
        if replay:
            con.store.begin_checkpoint("c0", model, lr=1.0, factory=factory, kwargs=model.metaql_config)
            con.replay("c0", layers=layers, storage=storage)
        else:
            with con.capture(model, layers=layers, checkpoint="c0", factory=factory, kwargs=model.metaql_config,
                             storage=storage) as cap:
                cap.backward(F.cross_entropy(model(x), y, reduction="sum"), ids, reduction="sum")
        for layer in layers:
            meta, full = stored_full(con.store, "c0", layer, ids)
            assert rel_err(full, flat_layer(expected, layer, meta)) < 1e-5, layer
        return {r["name"]: r for r in con.store.layers()}


conv_params = st.fixed_dictionaries({
    "dims": st.sampled_from([1, 2]), "groups": st.sampled_from([1, 2]), "cin_per": st.integers(1, 2),
    "cout_per": st.integers(1, 3), "k": st.integers(1, 3), "stride": st.integers(1, 2),
    "padding": st.sampled_from([0, 1, "same"]), "dilation": st.integers(1, 2), "bias": st.booleans(),
    "padding_mode": st.sampled_from(["zeros", "reflect", "circular"]), "twice": st.booleans(),
    "b": st.integers(1, 4), "seed": st.integers(0, 2**16)})


@given(conv_params)
def test_conv(p):
    assume(not (p["padding"] == "same" and p["stride"] > 1))
    torch.manual_seed(p["seed"])
    cin, cout = p["cin_per"] * p["groups"], p["cout_per"] * p["groups"]
    model = ConvNet(p["dims"], cin, cout, p["k"], p["stride"], p["padding"], p["dilation"], p["groups"], p["bias"],
                    p["padding_mode"], size=6, twice=p["twice"])
    x = torch.randn((p["b"], cin) + (6,) * p["dims"])
    _capture_and_compare(model, x, torch.randint(0, 3, (p["b"],)), ["conv", "fc"])


def test_conv_storage_choice_follows_the_space_formula():
    torch.manual_seed(0)
    # 3->64 on 32x32: the raw input and output gradient (3*1024 + 64*1024) exceed 64*27 weights: full
    wide = ConvNet(2, 3, 64, 3, padding=1, size=32)
    layers = _capture_and_compare(wide, torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), ["conv"])
    assert layers["conv"]["storage"] == "full"
    # 64->64 on 2x2: 64*4 + 64*4 numbers against 64*64*9 weights: factored
    deep = ConvNet(2, 64, 64, 3, padding=1, size=2)
    layers = _capture_and_compare(deep, torch.randn(2, 64, 2, 2), torch.tensor([0, 1]), ["conv"])
    assert layers["conv"]["storage"] == "factored"
    assert layers["conv"]["factored_numbers"] == 64 * 4 * 2 and layers["conv"]["full_numbers"] == 64 * 64 * 9 + 64


@pytest.mark.parametrize("replay", [False, True])
def test_storage_override_by_capture_and_by_replay(replay):
    """The space formula keeps a 3->64 conv on 32x32 full; an override stores it factored, exactly."""
    torch.manual_seed(0)
    wide = ConvNet(2, 3, 64, 3, padding=1, size=32)
    layers = _capture_and_compare(wide, torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), ["conv"], replay=replay,
                                  storage={"conv": "factored"})
    assert layers["conv"]["storage"] == "factored"


def test_storage_override_contradicting_the_store_is_refused_up_front():
    torch.manual_seed(0)
    wide = ConvNet(2, 3, 64, 3, padding=1, size=32)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    with metaql.connect(":memory:") as con:
        con.add_samples([0, 1], "train", y.numpy(), x)
        with con.capture(wide, layers=["conv"], checkpoint="c0") as cap:
            cap.backward(F.cross_entropy(wide(x), y), [0, 1])
        with pytest.raises(metaql.InvalidInputException, match="stored full in this store"):
            con.capture(wide, layers=["conv"], checkpoint="c1", storage={"conv": "factored"})
        assert con.execute("SELECT storage FROM layers").fetchall() == [("full",)]


@given(st.integers(1, 4), st.integers(2, 6), st.integers(0, 2**16))
def test_embedding_attention_layernorm(b, t, seed):
    torch.manual_seed(seed)
    model = TextNet()
    x, y = torch.randint(0, 11, (b, t)), torch.randint(0, 3, (b,))
    layers = ["emb", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "norm", "head"]
    rows = _capture_and_compare(model, x, y, layers)
    assert rows["norm"]["storage"] == "full" and rows["emb"]["kind"] == "embedding"


def test_qkv_share_one_stored_suffix():
    torch.manual_seed(0)
    model, x, y = TextNet(dim=16), torch.randint(0, 11, (6, 5)), torch.randint(0, 3, (6,))
    with metaql.connect(":memory:") as con:
        con.add_samples(np.arange(6), "train", y.numpy(), x)
        with con.capture(model, layers=["attn.q_proj", "attn.k_proj", "attn.v_proj"], checkpoint="c0") as cap:
            cap.backward(F.cross_entropy(model(x), y), np.arange(6))
        rows = {r[0]: r[1:] for r in con.execute(
            "SELECT layer, suffix_file, bytes FROM shards WHERE kind = 'factors'").fetchall()}
        owner = [l for l, (suffix, _) in rows.items() if suffix is None]
        assert len(owner) == 1
        assert all(suffix is not None for l, (suffix, _) in rows.items() if l not in owner)
        assert all(rows[l][1] < rows[owner[0]][1] for l in rows if l not in owner)


def test_multihead_attention_equivalent_is_identical():
    torch.manual_seed(0)
    for batch_first in (True, False):
        mha = nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
        explicit = ExplicitMultiheadAttention.from_torch(mha).eval()
        x = torch.randn(3, 5, 8)
        mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
        if not batch_first:
            ref = mha(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), key_padding_mask=mask)
            got = explicit(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), key_padding_mask=mask)
        else:
            ref, got = mha(x, x, x, key_padding_mask=mask), explicit(x, x, x, key_padding_mask=mask)
        assert torch.allclose(ref[0], got[0], atol=1e-6) and torch.allclose(ref[1], got[1], atol=1e-6)
    model = make_capturable(nn.Sequential(nn.MultiheadAttention(8, 2)))
    assert isinstance(model[0], ExplicitMultiheadAttention)


def test_batchnorm_by_replay_in_eval_mode():
    torch.manual_seed(0)
    model = BNNet()
    model.bn.running_mean.normal_()
    model.bn.running_var.uniform_(0.5, 2)
    model.eval()
    x, y = torch.randn(4, 2, 5, 5), torch.randint(0, 3, (4,))
    rows = _capture_and_compare(model, x, y, ["conv", "bn", "fc"], replay=True)
    assert rows["bn"]["kind"] == "batchnorm" and rows["bn"]["storage"] == "full"


def test_norm_layers_cannot_be_forced_factored():
    model = TextNet()
    with metaql.connect(":memory:") as con:
        con.add_samples(np.arange(2), "train", [0, 1], torch.zeros(2, 3, dtype=torch.long))
        with pytest.raises(metaql.InvalidInputException, match="must be full"):
            with con.capture(model, layers=["norm"], storage={"norm": "factored"}) as cap:
                x = torch.zeros(2, 3, dtype=torch.long)
                cap.backward(F.cross_entropy(model(x), torch.tensor([0, 1])), [0, 1])
