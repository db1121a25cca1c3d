"""The cost model and optimizer: choices flip where the formulas say, EXPLAIN shows them."""
import numpy as np
import torch
import torch.nn.functional as F

import metaql
from metaql.engine import cost
from tests.models import MLP

CONSTS = {"sec_per_flop": 1e-10, "sec_per_byte": 1e-10}


def pick(sh: cost.Shapes) -> str:
    ests = cost.estimates(sh)
    return min((k for k in ests if k not in cost.BASELINES), key=lambda k: cost.seconds(ests[k], CONSTS))


def test_strategy_flips_with_query_size_and_shape():
    # conv13 of VGG16 on CIFAR: 2x2 outputs, 512*9 wide patches, 512 outputs
    conv13 = dict(n=1000, s=4, sq=4, din=512 * 9 + 1, dout=512, stored="factored")
    assert pick(cost.Shapes(b=1, **conv13)) == "iterate"           # P2P: Gram products win
    assert pick(cost.Shapes(b=4096, **conv13)) == "batch_average"   # big batch: Lemma 7 wins
    # one row per sample: iterate costs N*B*(Din+Dout), the batch average (N+B)*Din*Dout
    fc = dict(n=100_000, s=1, sq=1, din=4097, dout=4096, stored="factored")
    assert pick(cost.Shapes(b=100, **fc)) == "iterate"
    assert pick(cost.Shapes(b=10_000, **fc)) == "batch_average"
    # reconstruction never beats the batch average: it does the same product plus a build
    for sh in (cost.Shapes(b=7, **conv13), cost.Shapes(b=7, **fc)):
        e = cost.estimates(sh)
        assert cost.seconds(e["reconstruct"], CONSTS) > cost.seconds(e["batch_average"], CONSTS)
    assert pick(cost.Shapes(b=3, n=10, s=1, sq=1, din=4, dout=2, stored="full")) == "full_dot"


def test_explain_shows_every_estimate_and_analyze_measures(store_dir):
    torch.manual_seed(0)
    model, x, y = MLP(), torch.randn(10, 6), torch.randint(0, 3, (10,))
    with metaql.connect(store_dir) as con:
        con.add_samples(np.arange(8), "train", y[:8].numpy(), x[:8])
        con.add_samples(np.arange(8, 10), "test", y[8:].numpy(), x[8:])
        with con.capture(model, checkpoint="c0", lr=0.1, factory="tests.models:MLP", kwargs=model.metaql_config) as cap:
            cap.backward(F.cross_entropy(model(x[:8]), y[:8]), np.arange(8))
        lines = [r[0] for r in con.execute("EXPLAIN SELECT TOPK(3) train FROM INFLUENCE(query=batch(test)) "
                                           "ORDER BY ASC").fetchall()]
        assert lines[0] == "TOP_K k=3 order=ASC"
        assert "INFLUENCE train=batch(train) (8 samples) query=batch(test) (2 samples)" in lines[1]
        fc1 = next(l for l in lines if "c0/fc1" in l)
        for name in ("iterate", "batch_average", "reconstruct", "recompute"):
            assert name in fc1
        chosen = fc1.split(": ")[1].split()[0]
        assert f"{chosen}*=" in fc1 and chosen != "recompute"
        analyzed = [r[0] for r in con.execute("EXPLAIN ANALYZE SELECT * FROM INFLUENCE(query=batch(test))").fetchall()]
        assert all("measured=" in l for l in analyzed if "c0/" in l) and analyzed[-1].startswith("total:")
        consts = con.execute("SELECT value FROM meta WHERE key = 'cost_constants'").fetchone()
        assert consts is not None and "sec_per_flop" in consts[0]


def test_a_read_only_store_measures_the_cost_constants_once_per_process(store_dir, monkeypatch):
    """A read-only store cannot keep the constants: on the old code every statement measured them
    again (about 0.2 s each, inside the user's query)."""
    torch.manual_seed(0)
    model, x, y = MLP(), torch.randn(10, 6), torch.randint(0, 3, (10,))
    with metaql.connect(store_dir) as con:
        con.add_samples(np.arange(8), "train", y[:8].numpy(), x[:8])
        con.add_samples(np.arange(8, 10), "test", y[8:].numpy(), x[8:])
        with con.capture(model, checkpoint="c0", lr=0.1) as cap:
            cap.backward(F.cross_entropy(model(x[:8]), y[:8]), np.arange(8))
    calls = []

    def measure():
        calls.append(1)
        return dict(CONSTS)
    monkeypatch.setattr(cost, "measure_constants", measure)
    with metaql.connect(store_dir, read_only=True) as con:
        for _ in range(3):
            con.execute("SELECT count(*) FROM SELF_INFLUENCE()").fetchall()
    assert len(calls) == 1


def test_self_influence_weighs_its_norm_forms():
    """SELF_INFLUENCE ran the Gram form whatever the shapes (S^2 (din + dout) per sample) and EXPLAIN
    showed no estimate for it; the per-sample gradient form costs S din dout, less when a sample
    has many rows against a small weight (digits conv2: S = 64, 145 x 32)."""
    conv2 = cost.estimates(cost.Shapes(n=1000, s=64, b=0, sq=64, din=145, dout=32, stored="factored",
                                       self_influence=True))
    fc = cost.estimates(cost.Shapes(n=1000, s=1, b=0, sq=1, din=513, dout=10, stored="factored",
                                    self_influence=True))
    assert set(conv2) == set(fc) == {"self_gram", "self_full"}
    assert min(conv2, key=lambda k: cost.seconds(conv2[k], CONSTS)) == "self_full"
    assert min(fc, key=lambda k: cost.seconds(fc[k], CONSTS)) == "self_gram"
    full = cost.estimates(cost.Shapes(n=10, s=1, b=0, sq=1, din=5, dout=3, stored="full", self_influence=True))
    assert set(full) == {"self_norm"}


def test_explain_self_influence_shows_the_norm_forms(store_dir):
    torch.manual_seed(0)
    model, x, y = MLP(), torch.randn(10, 6), torch.randint(0, 3, (10,))
    with metaql.connect(store_dir) as con:
        con.add_samples(np.arange(10), "train", y.numpy(), x)
        with con.capture(model, checkpoint="c0", lr=0.1) as cap:
            cap.backward(F.cross_entropy(model(x), y), np.arange(10))
        lines = [r[0] for r in con.execute("EXPLAIN SELECT * FROM SELF_INFLUENCE()").fetchall()]
    fc1 = next(l for l in lines if "c0/fc1" in l)
    assert "self_gram*=" in fc1 and "self_full=" in fc1 and "batch_average" not in fc1
